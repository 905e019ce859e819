"""Reverse-time samplers: from x_T ~ N(0, I) to x_0, one compiled `lax.scan` each.

Randomness is per sample: image i of a call is a pure function of `fold_in(key, first_index + i)`
(its starting noise and every step's noise are drawn from that key alone, with `vmap`), so the
same key gives the same images for any batch size or device count.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import DenoiseFn, p_mean_variance
from diffusion_jax.schedules import Schedule

SAMPLERS = ("ddpm",)


def per_sample_keys(key: jax.Array, batch_size: int, first_index: int | jax.Array = 0) -> jax.Array:
  """Keys [B] with keys[i] = fold_in(key, first_index + i)."""
  indices = first_index + jnp.arange(batch_size, dtype=jnp.uint32)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def _normal(keys: jax.Array, shape: Sequence[int]) -> jax.Array:
  """One standard normal draw of `shape` per key: [B, *shape] float32."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype=jnp.float32))(keys)


def ddpm_sample(
  denoise_fn: DenoiseFn,
  schedule: Schedule,
  shape: Sequence[int],
  key: jax.Array,
  *,
  variance: str = "fixed_large",
  clip_x0: bool = True,
  prediction: str = "eps",
  first_index: int | jax.Array = 0,
) -> jax.Array:
  """Ancestral sampling over all T steps: x_{t-1} = μ_θ(x_t, t) + σ_t z, no noise at t = 0.

  Args:
    denoise_fn: (x_t [B, ...], t [B] int32) -> the network's output (ε, x0 or v).
    schedule: the noise schedule the model was trained with.
    shape: (B, H, W, C) of the samples.
    key: the PRNG key of the whole call; sample i uses fold_in(key, first_index + i).
    variance: the reverse-step variance, "fixed_large" or "fixed_small".
    clip_x0: clip the predicted x0 to [-1, 1] in every step.
    prediction: what denoise_fn predicts, one of diffusion.PREDICTIONS.
    first_index: global index of the first sample of this batch.

  Returns:
    x_0: [B, H, W, C] float32, images in about [-1, 1].
  """
  batch_size = shape[0]
  keys = per_sample_keys(key, batch_size, first_index)
  init_keys, step_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  x_init = _normal(init_keys, shape[1:])

  def step(x_t, t):
    t_batch = jnp.full((batch_size,), t, dtype=jnp.int32)
    mean, _, log_variance, _ = p_mean_variance(
      schedule,
      denoise_fn(x_t, t_batch),
      x_t,
      t_batch,
      variance=variance,
      clip_x0=clip_x0,
      prediction=prediction,
    )
    z = _normal(jax.vmap(jax.random.fold_in, (0, None))(step_keys, t), shape[1:])
    x_prev = jnp.where(t == 0, mean, mean + jnp.exp(0.5 * log_variance) * z)
    return x_prev, None

  timesteps = jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  x0, _ = jax.lax.scan(step, x_init, timesteps)
  return x0


def check_sampler(sampler: str, num_steps: int | None, num_timesteps: int) -> None:
  """Raises ValueError (one line, naming the valid choices) for an unusable sampler setting."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r} is unknown; valid: {', '.join(SAMPLERS)}")
  if num_steps is not None and num_steps != num_timesteps:
    raise ValueError(
      f"sample.num_steps={num_steps} is not supported by sampler {sampler!r}; "
      f"valid: None or {num_timesteps} (the schedule's num_timesteps)"
    )


def sample(
  denoise_fn: DenoiseFn,
  schedule: Schedule,
  shape: Sequence[int],
  key: jax.Array,
  *,
  sampler: str = "ddpm",
  num_steps: int | None = None,
  **options,
) -> jax.Array:
  """Draws samples with the named sampler.

  Args:
    denoise_fn: (x_t [B, H, W, C], t [B] int32) -> the model output (ε, x0 or v).
    schedule: the noise schedule the model was trained with.
    shape: (B, H, W, C) of the samples.
    key: PRNG key; sample i depends only on fold_in(key, first_index + i).
    sampler: one of SAMPLERS.
    num_steps: number of reverse steps; None means all of the schedule's steps.
    **options: passed to the sampler (variance, clip_x0, prediction, first_index).

  Returns:
    x_0: [B, H, W, C] float32 in about [-1, 1].
  """
  check_sampler(sampler, num_steps, schedule.num_timesteps)
  return ddpm_sample(denoise_fn, schedule, tuple(shape), key, **options)
