"""Readers (and writers) of published weights: diffusers folders and original single-file
checkpoints, mapped by name onto the project's modules, with the `safetensors` package's NumPy API
and no torch; and the pipelines built on them (`load_pretrained`: DDPM, Stable Diffusion)."""

from diffusion_jax.pretrained.clip import (
  load_ldm_text_encoder,
  load_text_encoder,
  save_text_encoder,
  text_config_from_transformers,
  text_encoder_state_dict,
  transformers_text_config,
)
from diffusion_jax.pretrained.ddpm import DDPM, load_ddpm
from diffusion_jax.pretrained.ddpm_unet import (
  UNET_NAMINGS,
  ddpm_unet_config_from_diffusers,
  ddpm_unet_state_dict,
  diffusers_ddpm_unet_config,
  load_ddpm_unet,
  save_ddpm_unet,
)
from diffusion_jax.pretrained.files import WeightsError, read_config, read_safetensors
from diffusion_jax.pretrained.inception import load_fid_inception, read_torch_state_dict
from diffusion_jax.pretrained.pipeline import PIPELINES, load_pretrained
from diffusion_jax.pretrained.scheduler import SchedulerConfig, inference_timesteps, load_scheduler
from diffusion_jax.pretrained.stable_diffusion import StableDiffusion, load_stable_diffusion
from diffusion_jax.pretrained.unet import (
  diffusers_unet_config,
  load_ldm_unet,
  load_unet,
  save_unet,
  unet_config_from_diffusers,
  unet_state_dict,
)
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
  "DDPM",
  "NAMINGS",
  "PIPELINES",
  "SD_SCALING_FACTOR",
  "UNET_NAMINGS",
  "SchedulerConfig",
  "StableDiffusion",
  "WeightsError",
  "ddpm_unet_config_from_diffusers",
  "ddpm_unet_state_dict",
  "diffusers_ddpm_unet_config",
  "diffusers_unet_config",
  "diffusers_vae_config",
  "inference_timesteps",
  "load_ddpm",
  "load_fid_inception",
  "load_ddpm_unet",
  "load_ldm_text_encoder",
  "load_ldm_unet",
  "load_ldm_vae",
  "load_pretrained",
  "load_scheduler",
  "load_stable_diffusion",
  "load_text_encoder",
  "load_unet",
  "load_vae",
  "read_config",
  "read_safetensors",
  "read_torch_state_dict",
  "save_ddpm_unet",
  "save_text_encoder",
  "save_unet",
  "save_vae",
  "text_config_from_transformers",
  "text_encoder_state_dict",
  "transformers_text_config",
  "unet_config_from_diffusers",
  "unet_state_dict",
  "vae_config_from_diffusers",
  "vae_state_dict",
  "weight_map",
]
