"""Imagen's cascade on the shapes set: shapes_text draws 16x16 images from a prompt, shapes_sr
enlarges them to 64x64 (diffusion_jax/experiment/cascade.py).

Run:
  python main.py --config=shapes_cascade --mode=train   # trains both stages, one after the other
  python main.py --config=shapes_cascade --mode=sample --config.sample.prompt="a red circle"

The stages train in runs/shapes_cascade/shapes_text and runs/shapes_cascade/shapes_sr (about 27 and
17 minutes on an idle 2-core CPU); runs trained on their own join with
--config.cascade.workdirs=runs/shapes_text,runs/shapes_sr. Sampling writes
samples/cascade_seed0_stage0.{png,npz} (16x16) and cascade_seed0_stage1.{png,npz} (64x64, each
input left of its output). The base samples with guidance 3 (its prompt decides colour and
shape); the upsampler with guidance 1 and its input noised to sr.aug_level = 0.1.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.cascade.configs = "shapes_text,shapes_sr"
  config.cascade.samplers = "ddim,ddim"
  config.cascade.num_steps = "100,50"
  config.cascade.guidance_scales = "3,1"
  config.cascade.aug_levels = ",0.1"
  config.sample.num_samples = 8  # Per prompt; one prompt per class without sample.prompt.
  return config
