"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance (Ho & Salimans 2022).

Run:
  python main.py --config=cifar10_cond --workdir=runs/cifar10_cond
  python main.py --config=cifar10_cond --workdir=runs/cifar10_cond --mode=sample \\
    --config.sample.prompt=cat --config.sample.guidance_scale=3

The DDPM CIFAR-10 setting (configs/cifar10.py) with a label embedding added to the timestep
embedding: 10 classes plus a learned "no label" entry, which replaces the label of 10% of the
training examples so that the same network is also the unconditional model that guidance needs.
Sampling draws sample.num_samples images per class (or per prompt: a class name such as "cat" or
"a cat"; "" for unconditional samples) with sample.guidance_scale (1: the plain conditional
model). Network: 35,751,939 parameters (the unconditional one plus the 11 x 512 label table).
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.num_classes = 10
  config.train.cond_drop_prob = 0.1
  config.sample.guidance_scale = 1.0
  config.sample.num_samples = 16  # Per class: a 10 x 16 grid.
  return config
