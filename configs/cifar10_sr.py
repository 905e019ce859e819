"""Super-resolution 32x32 -> 64x64 in the style of the CIFAR-10 models: Imagen's second stage
for a 32x32 base (cifar10 or cifar10_cond), on any data set with 64x64 images.

Run (a folder of images, resized and centre-cropped to 64x64; class sub-folders are ignored):
  python main.py --config=cifar10_sr --config.data.path=/path/to/images --workdir=runs/cifar10_sr
  python main.py --config=shapes_cascade --config.cascade.configs=cifar10,cifar10_sr \\
    --config.cascade.guidance_scales=, --mode=sample   # the cascade with a cifar10 base
Or a tfds set: --config.data.dataset=imagenet_resized/64x64.

Network: 36,078,467 parameters, the DDPM CIFAR-10 U-Net's widths (128 channels, (1, 2, 2, 2),
2 ResBlocks per level, attention at 16x16) on 64x64 inputs with the upsampled 32x32 image
concatenated to x_t, and the augmentation level embedded next to the timestep. For GPUs and
TPUs; a CPU manages smoke tests.
Imagen trains its upsamplers with augmentation levels over all of [0, 1] and samples at 0.1-0.3.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "folder"
  config.data.image_size = 64
  config.data.random_flip = True

  config.model.low_res_size = 32
  config.model.channels = 128
  config.model.channel_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1

  config.sr.max_train_aug_level = 1.0
  config.sr.aug_level = 0.2

  config.train.batch_size = 64
  config.train.num_steps = 400_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 5000
  config.train.ema_decay = 0.9999
  config.train.checkpoint_every = 10_000
  config.train.sample_every = 50_000

  config.sample.sampler = "ddim"
  config.sample.num_steps = 100
  return config
