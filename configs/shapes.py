"""The embedded default: generated coloured shapes, a small U-Net, minutes on a laptop CPU.

Run:
  python main.py --config=shapes

Data: 20,000 generated 32x32 images of circles, squares and triangles in four colours on a dark
background (no download). Network: ~1M parameters. Expected cost: about 10 minutes on a 2-core
CPU; the final grid in runs/shapes/samples/ shows recognisable shapes in distinct colours.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "shapes"
  config.data.image_size = 32
  config.data.num_examples = 20_000

  config.model.channels = 16
  config.model.channel_mult = (1, 2, 4)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0
  config.model.num_groups = 8

  config.diffusion.num_timesteps = 400
  config.diffusion.beta_end = 0.05

  config.train.batch_size = 32
  config.train.num_steps = 1200
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 200
  config.train.ema_decay = 0.999
  config.train.log_every = 50
  config.train.checkpoint_every = 300
  config.train.sample_every = 600
  config.train.num_grid_samples = 64

  config.sample.num_samples = 64
  return config
