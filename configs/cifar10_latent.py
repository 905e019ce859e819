"""Latent diffusion on CIFAR-10 (or an image folder): the DDPM U-Net on f = 4 latents.

Run (one command trains cifar10_autoencoder into WORKDIR/autoencoder, then the latent model):
  python main.py --config=cifar10_latent --workdir=runs/cifar10_latent
  python main.py --config=cifar10_latent \\
    --config.latent.autoencoder_workdir=runs/cifar10_autoencoder     # a trained first stage
  python main.py --config=cifar10_latent --config.data.dataset=folder --config.data.path=DIR

The U-Net sees 8x8x4 latents (16 times fewer positions than the 32x32 pixels): base 128 channels,
multipliers (1, 2, 2), attention at 4x4, eps-prediction with the linear schedule of DDPM. Meant for
a GPU or TPU; on a CPU it trains for smoke tests only.
"""

from configs import cifar10, cifar10_autoencoder


def get_config():
  config = cifar10.get_config()
  config.latent.autoencoder_config = "cifar10_autoencoder"
  # The first stage's network (the run copies it from the autoencoder run when it starts).
  config.autoencoder = cifar10_autoencoder.get_config().autoencoder
  config.model.out_channels = config.autoencoder.z_channels
  config.model.channel_mult = (1, 2, 2)
  config.model.attn_resolutions = (4,)
  config.train.num_steps = 400_000
  return config
