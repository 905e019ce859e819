"""DDPM from published weights (a diffusers DDPMPipeline folder such as google/ddpm-cifar10-32).

Run:
  python main.py --config=ddpm_pretrained --config.pretrained=DIR --mode=sample
  python main.py --config=ddpm_pretrained --config.pretrained=DIR --mode=sample \\
    --config.sample.sampler=ddim --config.sample.num_steps=50

google/ddpm-cifar10-32 is the network of configs/cifar10.py (35.7M parameters) with the paper's
linear schedule; its published images come from all 1000 ancestral steps.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.sample.num_samples = 16
  config.sample.batch_size = 16
  return config
