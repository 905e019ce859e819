"""The Gaussian diffusion process: forward marginals, posteriors, reverse-step moments, losses.

Shapes: x0, x_t, eps are [B, H, W, C] float32 (images in [-1, 1]); t is [B] int32 in [0, T).
Every function is pure; noise comes in as an argument or is drawn from a key passed in.
"""

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule, extract

VARIANCES = ("fixed_large", "fixed_small")

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t ~ q(x_t | x0) = N(√ᾱ_t x0, (1 - ᾱ_t) I), given the noise ε.

  Args:
    schedule: the noise schedule.
    x0: [B, ...] clean data.
    t: [B] int timesteps.
    noise: ε, same shape as x0.

  Returns:
    x_t = √ᾱ_t x0 + √(1 - ᾱ_t) ε, same shape as x0.
  """
  chex.assert_equal_shape([x0, noise])
  return (
    extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
  )


def q_posterior_mean_variance(
  schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q(x_{t-1} | x_t, x0) = N(μ̃_t, β̃_t I).

  Args:
    schedule: the noise schedule.
    x0: [B, ...] clean data (or a prediction of it).
    x_t: [B, ...] noisy data at step t.
    t: [B] int timesteps.

  Returns:
    (mean [B, ...], variance [B, 1, ...], clipped log-variance [B, 1, ...]).
  """
  chex.assert_equal_shape([x0, x_t])
  mean = (
    extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
    + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
  )
  variance = extract(schedule.posterior_variance, t, x_t.ndim)
  log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
  return mean, variance, log_variance


def predict_x0_from_eps(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
  """x̂0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t.

  Args:
    schedule: the noise schedule.
    x_t: [B, ...] noisy data.
    t: [B] int timesteps.
    eps: predicted noise, same shape as x_t.

  Returns:
    The implied clean data, same shape as x_t (not clipped).
  """
  chex.assert_equal_shape([x_t, eps])
  return (x_t - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * eps) / extract(
    schedule.sqrt_alphas_cumprod, t, x_t.ndim
  )


def reverse_variance(
  schedule: Schedule, t: jax.Array, variance: str, ndim: int
) -> tuple[jax.Array, jax.Array]:
  """σ_t² of the reverse step and its log, shaped [B, 1, ...].

  "fixed_large" is β_t (with β̃_1 at t=0, as the original DDPM code, so the log stays finite);
  "fixed_small" is the posterior variance β̃_t with the clipped log.
  """
  if variance == "fixed_large":
    var = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
    return extract(var, t, ndim), extract(jnp.log(var), t, ndim)
  if variance == "fixed_small":
    return (
      extract(schedule.posterior_variance, t, ndim),
      extract(schedule.posterior_log_variance_clipped, t, ndim),
    )
  raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")


def p_mean_variance(
  schedule: Schedule,
  model_output: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  variance: str = "fixed_large",
  clip_x0: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """p_θ(x_{t-1} | x_t) = N(μ_θ, σ_t² I) for the ε-parameterisation.

  μ_θ is the posterior mean μ̃_t(x̂0, x_t) with x̂0 from the predicted ε; without clipping this
  equals (1/√α_t)(x_t - β_t/√(1-ᾱ_t) ε_θ).

  Args:
    schedule: the noise schedule.
    model_output: ε_θ(x_t, t), same shape as x_t.
    x_t: [B, ...] noisy data.
    t: [B] int timesteps.
    variance: "fixed_large" (σ² = β_t) or "fixed_small" (σ² = β̃_t).
    clip_x0: clip x̂0 to [-1, 1] before forming the mean.

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...], pred_x0 [B, ...]).
  """
  var, log_var = reverse_variance(schedule, t, variance, x_t.ndim)
  pred_x0 = predict_x0_from_eps(schedule, x_t, t, model_output)
  if clip_x0:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
  return mean, jnp.broadcast_to(var, log_var.shape), log_var, pred_x0


def simple_loss(
  schedule: Schedule, denoise_fn: DenoiseFn, x0: jax.Array, key: jax.Array
) -> jax.Array:
  """L_simple = ||ε - ε_θ(x_t, t)||² per example, t ~ U{0..T-1}, ε ~ N(0, I) drawn from `key`.

  Args:
    schedule: the noise schedule.
    denoise_fn: (x_t [B, ...], t [B] int32) -> predicted ε, same shape as x_t.
    x0: [B, ...] clean data in [-1, 1].
    key: the PRNG key the timesteps and noise are drawn from.

  Returns:
    [B] float32 mean squared error per example (mean over all non-batch dimensions).
  """
  t_key, noise_key = jax.random.split(key)
  t = jax.random.randint(t_key, x0.shape[:1], 0, schedule.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(noise_key, x0.shape, dtype=jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  eps = denoise_fn(x_t, t).astype(jnp.float32)
  chex.assert_equal_shape([eps, noise])
  return jnp.mean(jnp.square(eps - noise), axis=tuple(range(1, x0.ndim)))
