"""Denoising diffusion models in JAX/Flax: the public API.

  import diffusion_jax as dj
  schedule = dj.make_schedule("linear", 1000)
  x_t = dj.q_sample(schedule, x0, t, noise)
  images = dj.sample(denoise_fn, schedule, (16, 32, 32, 3), key, sampler="ddim", num_steps=50)

These names stay importable from here wherever the modules behind them live (DESIGN.md, section
3). The layers below: core (pure math), sampling, models, pretrained (published weights), text,
data, evaluation, runtime; the experiment package (training and the modes of main.py) is imported
on its own.
"""

from diffusion_jax.core.diffusion import (
  PREDICTIONS,
  VARIANCES,
  DenoiseFn,
  p_mean_variance,
  predict_eps_from_x0,
  predict_x0,
  predict_x0_from_eps,
  q_posterior_mean_variance,
  q_sample,
  v_target,
)
from diffusion_jax.core.likelihood import bits_per_dim
from diffusion_jax.core.losses import LOSS_TYPES, training_loss
from diffusion_jax.core.rng import example_keys
from diffusion_jax.core.schedules import Schedule, make_schedule
from diffusion_jax.core.sds import sds_grad, sds_loss, sds_weight
from diffusion_jax.models import (
  FastPaths,
  TextEncoder,
  TextUNet,
  UNet,
  UNetConfig,
  condition_kind,
  make_model,
)
from diffusion_jax.pretrained import DDPM, StableDiffusion, WeightsError, load_pretrained
from diffusion_jax.sampling.guidance import guided
from diffusion_jax.sampling.samplers import SAMPLERS, sample

__all__ = [
  "LOSS_TYPES",
  "PREDICTIONS",
  "SAMPLERS",
  "VARIANCES",
  "DDPM",
  "DenoiseFn",
  "FastPaths",
  "Schedule",
  "StableDiffusion",
  "TextEncoder",
  "TextUNet",
  "UNet",
  "UNetConfig",
  "WeightsError",
  "bits_per_dim",
  "condition_kind",
  "example_keys",
  "guided",
  "load_pretrained",
  "make_model",
  "make_schedule",
  "p_mean_variance",
  "predict_eps_from_x0",
  "predict_x0",
  "predict_x0_from_eps",
  "q_posterior_mean_variance",
  "q_sample",
  "sample",
  "sds_grad",
  "sds_loss",
  "sds_weight",
  "training_loss",
  "v_target",
]
