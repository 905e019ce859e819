"""The first stage of latent diffusion on CIFAR-10 (or an image folder): a KL autoencoder, f = 4.

Run:
  python main.py --config=cifar10_autoencoder --workdir=runs/cifar10_autoencoder
  python main.py --config=cifar10_autoencoder --config.data.dataset=folder \\
    --config.data.path=DIR --config.data.image_size=64        # any folder of images

LDM's autoencoder with three levels (f = 4: 32x32x3 images to 8x8x4 latents) of 64, 128 and 128
channels and two ResBlocks each, L1 reconstruction plus 1e-6 x KL, Adam 1e-4 at batch 64. It is
meant for a GPU or TPU; on a CPU it trains for smoke tests only.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "autoencoder"
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.random_flip = True

  autoencoder = config.autoencoder
  autoencoder.channels = 64
  autoencoder.channel_mult = (1, 2, 2)
  autoencoder.num_res_blocks = 2
  autoencoder.z_channels = 4
  autoencoder.num_groups = 32
  autoencoder.reconstruction = "l1"
  autoencoder.kl_weight = 1e-6

  config.train.batch_size = 64
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.grad_clip = 0.0  # LDM clips nothing; the loss is a sum over pixels.
  config.train.ema_decay = 0.999
  config.train.checkpoint_every = 5000
  config.train.sample_every = 10_000
  config.eval.num_examples = 10_000
  config.eval.batch_size = 100
  return config
