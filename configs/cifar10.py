"""DDPM on CIFAR-10 (Ho et al. 2020): the paper's network and training setting.

Run:
  python main.py --config=cifar10 --workdir=runs/cifar10

Network: 35,746,307 parameters (base 128 channels, multipliers (1, 2, 2, 2), 2 ResBlocks per level,
attention at 16x16, dropout 0.1). T = 1000, linear betas 1e-4..0.02, eps-prediction, fixed-large
variance. Adam at 2e-4 with 5,000 warm-up steps, batch 128, gradient clipping 1.0, EMA 0.9999,
random flips, 800k steps.

Expected cost: the original ran 10.6 h on a TPU v3-8 (21 steps/s); on one modern GPU expect the
same order; on a CPU it is for smoke tests only. The paper reports FID 3.17 with 1000-step
sampling. Without internet, pass the official archive: --config.data.manual_dir=DIR (see README).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.data.random_flip = True
  config.train.batch_size = 128
  config.train.num_steps = 800_000
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 5000
  config.train.ema_decay = 0.9999
  config.train.checkpoint_every = 10_000
  config.train.sample_every = 50_000
  return config
