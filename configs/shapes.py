"""The embedded default: generated coloured shapes, a small U-Net, minutes on a laptop CPU.

Run:
  python3 dev.py quickstart        # or: python main.py --config=shapes

Data: 20,000 generated images of circles, squares and triangles in red, green, blue and yellow
on a dark background (no download). The data set is drawn at 32x32 by default; this config
trains at 16x16 so that a 2-core laptop CPU gets enough steps in under 10 minutes (the U-Net
costs 4x less per image). `--config.data.image_size=32` trains at full size for about 4x the
time. Network: 687,347 parameters predicting v (not eps), cosine schedule with T = 400.

Why v: the eps loss weights the error of the implied clean image by the signal-to-noise ratio, so
it hardly trains the noisiest steps, where the layout of the image (the background, the size
and colour of the object) is decided; trained that way for 3,000 steps, about half of the
samples came out as large blobs on grey backgrounds. The v loss adds weight there, and with it
every sample has a dark background and one plain-coloured object.

Expected after 4,500 steps (about 9 minutes on 2 cores): one plain-coloured object per image, in
all four colours; many recognisable discs, triangles and squares, some still rounded or
irregular. More steps (--config.train.num_steps) sharpen them.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "shapes"
  config.data.image_size = 16
  config.data.num_examples = 20_000

  config.model.channels = 16
  config.model.channel_mult = (1, 2, 4)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.0
  config.model.num_groups = 8

  # The cosine schedule spends fewer steps at near-zero signal than the linear one, which matters
  # most for small images (Nichol & Dhariwal 2021).
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 400
  config.diffusion.prediction = "v"

  config.train.batch_size = 32
  config.train.num_steps = 4500
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 200
  config.train.cooldown_steps = 1000  # The last 1,000 steps anneal the learning rate to 0.
  config.train.ema_decay = 0.999
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.train.sample_every = 2250
  config.train.num_grid_samples = 64

  config.sample.num_samples = 64
  return config
