"""Readers (and writers) of published weights: diffusers folders and original single-file
checkpoints, mapped by name onto the project's modules, with the `safetensors` package's NumPy API
and no torch."""

from diffusion_jax.pretrained.files import WeightsError, read_config, read_safetensors
from diffusion_jax.pretrained.scheduler import SchedulerConfig, inference_timesteps, load_scheduler
from diffusion_jax.pretrained.vae import (
  NAMINGS,
  SD_SCALING_FACTOR,
  diffusers_vae_config,
  load_ldm_vae,
  load_vae,
  save_vae,
  vae_config_from_diffusers,
  vae_state_dict,
  weight_map,
)

__all__ = [
  "NAMINGS",
  "SD_SCALING_FACTOR",
  "SchedulerConfig",
  "WeightsError",
  "diffusers_vae_config",
  "inference_timesteps",
  "load_ldm_vae",
  "load_scheduler",
  "load_vae",
  "read_config",
  "read_safetensors",
  "save_vae",
  "vae_config_from_diffusers",
  "vae_state_dict",
  "weight_map",
]
