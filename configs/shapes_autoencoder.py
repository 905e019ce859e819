"""The first stage of latent diffusion on the shapes set: a KL autoencoder, 64x64 -> 8x8x4.

Run:
  python main.py --config=shapes_autoencoder --workdir=runs/shapes_autoencoder
  python main.py --workdir=runs/shapes_autoencoder --mode=eval   # PSNR, SSIM, KL on held-out images

The network is LDM's autoencoder (Stable Diffusion's VAE) at a width a laptop CPU trains: four
levels (f = 8) of 16, 32, 64 and 64 channels, one ResBlock per level, four latent channels, the L1
reconstruction loss and LDM's KL weight 1e-6, no discriminator. The grids under samples/ show
held-out images (odd rows) above their reconstructions (even rows).

Expected (1,000 steps, about 9 minutes on 2 cores, benchmarks/results/latent_diffusion.md): 978,103
parameters; on 1,000 test images PSNR 29.3 dB, SSIM 0.93, and the judge reads the same colour and
shape on every reconstruction as on its original.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "autoencoder"
  config.data.dataset = "shapes"
  config.data.image_size = 64
  config.data.num_examples = 20_000
  config.data.random_flip = True

  autoencoder = config.autoencoder
  autoencoder.channels = 16
  autoencoder.channel_mult = (1, 2, 4, 4)
  autoencoder.num_res_blocks = 1
  autoencoder.z_channels = 4
  autoencoder.num_groups = 8
  autoencoder.reconstruction = "l1"
  autoencoder.kl_weight = 1e-6

  config.train.batch_size = 16
  config.train.num_steps = 1000
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 100
  config.train.cooldown_steps = 300
  config.train.ema_decay = 0.999
  config.train.grad_clip = 0.0  # LDM clips nothing; the loss is a sum over pixels.
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.train.sample_every = 500
  config.train.num_grid_samples = 64

  config.eval.split = "test"
  config.eval.num_examples = 1000
  config.eval.batch_size = 100
  return config
