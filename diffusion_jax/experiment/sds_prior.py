"""The frozen prior of --mode=sds: a trained run (pixel or latent) or Stable Diffusion from disk.

A prior maps rendered pixels in [-1, 1] to the diffusion model's data space (the identity for a
pixel-space run; for a latent run or Stable Diffusion its autoencoder's scaled posterior mean, with
the gradient flowing back through the encoder) and gives the guided ε̂ for the prompt there. Its
weights are an argument of the jitted step, not constants folded into the program.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.core.schedules import Schedule
from diffusion_jax.models.autoencoder import Autoencoder
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import guidance


@dataclasses.dataclass(frozen=True)
class Prior:
  """What score distillation needs of a frozen diffusion model, for one prompt.

  Attributes:
    kind: "pixel", "latent" (a latent diffusion run) or "stable_diffusion".
    params: the frozen weights (and the prompt's text embeddings), passed to the functions below.
    schedule, prediction, variance: the model's noise schedule and output.
    image_size: the pixel size the model (or its encoder) takes.
    denoiser: (params, batch) -> denoise_fn(x_t, t) of the model, guided towards the prompt.
    encode: (params, images [B, S, S, 3] in [-1, 1]) -> the model's inputs x0 (differentiable).
  """

  kind: str
  params: Any
  schedule: Schedule
  prediction: str
  variance: str
  image_size: int
  denoiser: Callable[[Any, int], Callable[[jax.Array, jax.Array], jax.Array]]
  encode: Callable[[Any, jax.Array], jax.Array]


def check_run(run, workdir: str) -> None:
  """A ConfigError unless `run` is text- or class-conditional and not a super-resolution stage."""
  if run.cond_kind == "none" or run.low_res_size:
    raise ConfigError(
      f"sds.prior_workdir={workdir!r}: the prior must be a text- or class-conditional model "
      "(pixel or latent space), not an unconditional one or a super-resolution stage"
    )


def from_run(run, ema_params, prompt: str, guidance_scale: float) -> Prior:
  """The prior of a trained text- or class-conditional run (`check_run`), pixel or latent."""
  condition = {k: jnp.asarray(v) for k, v in run.prompt_condition([prompt]).items()}

  def denoiser(params, batch):
    apply_fn = lambda x_t, t, **c: run.model.apply({"params": params["model"]}, x_t, t, **c)
    cond = {k: jnp.repeat(v, batch, axis=0) for k, v in condition.items()}
    kwargs = {"num_classes": run.num_classes, "data_channels": run.image_shape[-1]}
    return guidance.guided(
      lambda x_t, t, **c: apply_fn(x_t, t, train=False, **c), cond, guidance_scale, **kwargs
    )

  common = {
    "schedule": run.schedule,
    "prediction": run.diffusion.prediction,
    "variance": run.diffusion.variance,
    "denoiser": denoiser,
  }
  if run.latent is None:
    return Prior(
      kind="pixel",
      params={"model": ema_params},
      image_size=run.image_shape[0],
      encode=lambda params, images: images,
      **common,
    )
  space = run.latent

  def encode(params, images):
    variables = {"params": params["autoencoder"]}
    posterior = space.model.apply(variables, images, method=Autoencoder.encode)
    return space.scale_factor * posterior.mean

  return Prior(
    kind="latent",
    params={"model": ema_params, "autoencoder": space.params},
    image_size=int(run.config.data.image_size),
    encode=encode,
    **common,
  )


def from_stable_diffusion(sd, prompt: str, negative_prompt: str, guidance_scale: float) -> Prior:
  """The prior of a loaded `pretrained.StableDiffusion`: its VAE encoder, its U-Net guided as
  diffusers guides it (no guidance up to 1), at its native size (sample_size × the VAE's factor).

  Raises:
    ConfigError: an inpainting U-Net (it needs a mask and an image).
  """
  if sd.unet_model.config.in_channels != sd.latent_channels:
    raise ConfigError("config.pretrained: an inpainting U-Net cannot be a score distillation prior")
  context = jnp.concatenate([sd.encode_prompt([prompt]), sd.encode_prompt([negative_prompt])])
  params = {"unet": sd.params["unet"], "vae": sd.params["vae"], "context": context}

  def denoiser(params, batch):
    cond, uncond = (jnp.repeat(c[None], batch, axis=0) for c in params["context"])
    return sd.denoiser(params["unet"], jnp.concatenate([cond, uncond]), guidance_scale)

  return Prior(
    kind="stable_diffusion",
    params=params,
    schedule=sd.schedule,
    prediction=sd.scheduler.prediction,
    variance="fixed_small",
    image_size=(sd.info.get("sample_size") or 64) * sd.vae_factor,
    denoiser=denoiser,
    encode=lambda params, images: sd.latents_of(params["vae"], images),
  )
