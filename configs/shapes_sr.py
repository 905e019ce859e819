"""Super-resolution on the shapes set, 16x16 -> 64x64, text-conditional (Imagen's second stage).

Run:
  python main.py --config=shapes_sr --workdir=runs/shapes_sr
  python main.py --workdir=runs/shapes_sr --mode=sample --config.sample.prompt="a blue triangle"

Data: the generated shapes set drawn at 64x64 with the captions of configs/shapes_text.py. Each
training image is its own target: the train step averages its 4x4 blocks into the 16x16 input
(diffusion_jax/core/super_resolution.py), noises that input to a level s ~ U[0, 0.5] and gives s
to the network (noise-conditioning augmentation). The U-Net sees the 16x16 image upsampled
bilinearly and concatenated to x_t; with model.patch_size=2 it runs at 32x32, a quarter of the
cost of full resolution. Grids and --mode=sample enlarge training images of each prompted class
(noised to sr.aug_level=0.1) and show each input left of its sample; the npz keeps the inputs
("low_res").

Expected: 405,724 parameters; 3,500 steps took 16.6 minutes on an idle 2-core CPU (3.6
steps/s; 0.28-0.57 s/step when shared with other jobs). At step 3,500 the judge reads 98.3% of
1,000 enlarged held-out images as the same colour and shape as the originals
(benchmarks/super_resolution.py; benchmarks/results/imagen_shapes.md). After 2,400 steps the samples
have the input's class, colour, size and position with ragged edges; after 4,200 (that run
resumed for 1,800 more with a second cooldown) the shapes are clean and sharp. Their PSNR against
the true 64x64 images is 23.1 dB (18.7 at 1,200 steps, 21.4 at 2,400), below the 25.4 dB of the
blurred bilinear upsampling, which PSNR favours; downsampled, they match the 16x16 inputs to
27.1 dB.
"""

from configs import shapes_text


def get_config():
  config = shapes_text.get_config()
  config.data.image_size = 64
  config.data.exclude_classes = ""  # Enlarging does not need held-out compositions.

  config.model.low_res_size = 16
  config.model.patch_size = 2
  config.model.channels = 16
  config.model.channel_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.cross_attn_resolutions = (8,)

  # Half of the augmentation range: a 20-minute model spends its capacity near the sampling
  # level instead of on inputs that are nearly pure noise.
  config.sr.max_train_aug_level = 0.5
  config.sr.aug_level = 0.1

  config.train.batch_size = 16
  config.train.num_steps = 3500
  config.train.cooldown_steps = 1000
  config.train.sample_every = 1750
  config.train.num_grid_samples = 24

  config.sample.num_steps = 50
  config.sample.num_samples = 8
  config.sample.batch_size = 24
  config.sample.guidance_scale = 1.0
  return config
