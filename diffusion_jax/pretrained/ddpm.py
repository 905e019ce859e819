"""DDPM from published weights (diffusers' DDPMPipeline folders such as google/ddpm-cifar10-32):
the project's U-Net and the checkpoint's schedule, sampled with the project's samplers.

`sampler="ddim"` steps through diffusers' own timestep grid (`DDIMScheduler.set_timesteps`), so
that from the same x_T it gives DDIMPipeline's images; the other samplers use the project's grids
on the checkpoint's schedule.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.unet import UNet
from diffusion_jax.pretrained import ddpm_unet, scheduler
from diffusion_jax.pretrained.files import WeightsError
from diffusion_jax.sampling import samplers
from diffusion_jax.sampling.ddim_grid import ddim_grid_sample


@dataclasses.dataclass
class DDPM:
  """A loaded DDPM: the U-Net, its parameters on the device, the scheduler and the image size.
  Build it with `load_ddpm`."""

  model: UNet
  params: dict
  scheduler: scheduler.SchedulerConfig
  image_size: int
  channels: int = 3

  @functools.cached_property
  def schedule(self):
    return scheduler.schedule(self.scheduler)

  @functools.cached_property
  def _apply(self):
    return jax.jit(lambda p, x, t: self.model.apply({"params": p}, x, t))

  def unet(self, x, t) -> jax.Array:
    """The U-Net's output (ε for DDPM's checkpoints) on x [B, H, W, C] at timesteps t [B]."""
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    return self._apply(self.params, x, t)

  def sample(
    self,
    num_images: int,
    *,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    seed: int = 0,
    first_index: int = 0,
    init_noise=None,
    return_float: bool = False,
  ) -> np.ndarray:
    """Images from the model.

    Args:
      num_images: N.
      sampler: one of the project's samplers ("ddpm", "ddim", "dpm_solver++", "heun").
      num_steps: steps; None: all T for ddpm, 50 for ddim, the sampler's default otherwise.
      seed: image i depends only on fold_in(key(seed), first_index + i).
      first_index: the global index of the first image (a batch of a larger set).
      init_noise: [N, H, W, C] x_T for sampler="ddim" instead of a draw from `seed`.
      return_float: return float32 images in [-1, 1] instead of uint8.

    Returns:
      [N, H, W, C] uint8 (or float32).
    """
    shape = (num_images, self.image_size, self.image_size, self.channels)
    if init_noise is not None and sampler != "ddim":
      raise ValueError(f"init_noise needs sampler='ddim', not {sampler!r}")
    if sampler == "ddim":
      num_steps = 50 if num_steps is None else num_steps
      samplers.check_sampler(sampler, num_steps, self.scheduler.num_train_timesteps)
      if init_noise is None:
        init_noise, _ = samplers.initial_noise(jax.random.key(seed), shape, first_index)
      x = self._ddim(self.params, jnp.asarray(init_noise, jnp.float32), num_steps=num_steps)
    else:
      key = jax.random.key(seed)
      run = functools.partial(self._sample, shape=shape, sampler=sampler, num_steps=num_steps)
      x = run(self.params, key, first_index)
    if return_float:
      return np.asarray(x)
    return np.asarray(jnp.round(jnp.clip(x / 2 + 0.5, 0, 1) * 255)).astype(np.uint8)

  def _denoise(self, params):
    return lambda x, t: self.model.apply({"params": params}, x, t)

  @functools.cached_property
  def _ddim(self):
    config = self.scheduler

    def run(params, noise, *, num_steps):
      return ddim_grid_sample(
        self._denoise(params),
        self.schedule,
        noise,
        scheduler.inference_timesteps(config, num_steps),
        config.num_train_timesteps // num_steps,
        final_alpha_cumprod=config.final_alpha_cumprod,
        prediction=config.prediction,
        clip_x0=config.clip_sample,
      )

    return jax.jit(run, static_argnames=("num_steps",))

  @functools.cached_property
  def _sample(self):
    def run(params, key, first_index, *, shape, sampler, num_steps):
      return samplers.sample(
        self._denoise(params),
        self.schedule,
        shape,
        key,
        sampler=sampler,
        num_steps=num_steps,
        prediction=self.scheduler.prediction,
        clip_x0=self.scheduler.clip_sample,
        first_index=first_index,
      )

    return jax.jit(run, static_argnames=("shape", "sampler", "num_steps"))


def load_ddpm(path: str, **options) -> DDPM:
  """A diffusers DDPM pipeline folder (`model_index.json`, `unet/`, `scheduler/`).

  Args:
    path: the folder.
    **options: `dtype`, `conv`, `attention`, ... of the U-Net (`ddpm_unet.load_ddpm_unet`).

  Raises:
    WeightsError: a missing or unfitting part, one line naming it.
  """
  if not os.path.isdir(path):
    raise WeightsError(f"{path}: no such folder (a diffusers DDPM pipeline folder)")
  model, params, image_size = ddpm_unet.load_ddpm_unet(path, **options)
  return DDPM(
    model=model,
    params=jax.device_put(params),
    scheduler=scheduler.load_scheduler(path),
    image_size=image_size,
    channels=model.config.out_channels,
  )
