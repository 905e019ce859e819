"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021): learned variances and the hybrid loss.

Run:
  python main.py --config=cifar10_iddpm --workdir=runs/cifar10_iddpm
  python main.py --config=cifar10_iddpm --workdir=runs/cifar10_iddpm --mode=eval   # bits/dim

The paper's CIFAR-10 setting: cosine schedule with T = 4000, ε-prediction with a learned-range
variance (the network outputs 6 channels: ε, then the variance value v), L_hybrid = L_simple +
0.001 L_vlb, uniform t. U-Net of base 128 channels, multipliers (1, 2, 2, 2), 3 ResBlocks per
level, attention with 4 heads at 16x16 and 8x8, dropout 0.3. Adam at 1e-4 without warm-up or
gradient clipping, batch 128, EMA 0.9999, random flips, 500k steps.

Differences from the published network: the ResBlocks here add the time embedding rather than
scaling and shifting the normalised activations (the paper's AdaGN), so its numbers are a
target, not a guarantee. For the best log-likelihood the paper trains with
--config.diffusion.loss=vlb --config.diffusion.t_sampling=importance instead (better bits/dim,
worse FID).

Cost: 4000 network evaluations per image, both for ancestral sampling and for the bits/dim of
--mode=eval (eval.num_examples images); more than the DDPM setting per step because of the
third ResBlock per level and the second attention resolution.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.random_flip = True

  config.model.channels = 128
  config.model.channel_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.num_heads = 4
  config.model.dropout = 0.3
  config.model.out_channels = 6  # diffusion.output_channels(3, "learned_range")

  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 4000
  config.diffusion.prediction = "eps"
  config.diffusion.variance = "learned_range"
  config.diffusion.loss = "hybrid"
  config.diffusion.vlb_weight = 0.001
  config.diffusion.t_sampling = "uniform"

  config.train.batch_size = 128
  config.train.num_steps = 500_000
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 0
  config.train.grad_clip = 0.0
  config.train.ema_decay = 0.9999
  config.train.checkpoint_every = 10_000
  config.train.sample_every = 50_000

  config.eval.split = "test"
  config.eval.num_examples = 10_000
  config.eval.batch_size = 128
  return config
