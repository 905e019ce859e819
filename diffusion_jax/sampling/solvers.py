"""Solvers of the probability-flow ODE: DPM-Solver++(2M) and EDM's Heun method, from a given x_T.

With exact model predictions, x_t = α_t x0 + σ_t ε has the marginals of the forward process when
it follows the probability-flow ODE. In the scaled variable x̃ = x / α and the noise level
σ̃ = σ / α = e^{-λ} the ODE reads (Karras et al. 2022)

    dx̃/dσ̃ = (x̃ - D(x̃; σ̃)) / σ̃,     D = the model's prediction of x0,

and it depends only on the data, not on the schedule. DDIM with η = 0 is its first-order
exponential integrator in λ; DPM-Solver++(2M) (Lu et al. 2022) the second-order multistep one;
Heun's method (EDM) integrates it in σ̃. Each solver here starts from x_T at t = T-1 and ends with
the model's x0 at t = 0, so all of them approximate the same map x_T -> x0.

The solvers are deterministic: randomness (x_T) comes from the caller, `samplers.sample`.
"""

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.core.diffusion import DenoiseFn, threshold_x0, x0_threshold
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.core.timesteps import (
  karras_sigmas,
  log_snr,
  noise_to_signal,
  spaced_timesteps,
  timestep_from_sigma,
)


def prediction_channels(output: jax.Array, channels: int) -> jax.Array:
  """The prediction part of a model output: its first C channels if it has 2C.

  A model with a learned variance outputs [..., 2C]: the prediction (ε, x0 or v), then the
  variance interpolation; samplers here use only the prediction.
  """
  if output.shape[-1] == 2 * channels:
    return output[..., :channels]
  return output


def model_predictions(
  denoise_fn: DenoiseFn,
  x: jax.Array,
  t: jax.Array,
  alpha: jax.Array,
  sigma: jax.Array,
  *,
  prediction: str,
  clip_x0: bool,
  threshold: str | None = None,
  threshold_percentile: float = 0.995,
) -> tuple[jax.Array, jax.Array]:
  """(x̂0, ε̂) at x = α x0 + σ ε from one call of the model.

    "eps": x̂0 = (x - σ ε̂) / α;   "x0": ε̂ = (x - α x̂0) / σ;   "v": x̂0 = α x - σ v, ε̂ = σ x + α v.

  With `clip_x0` (or a `threshold` other than "none"), x̂0 is thresholded (`threshold_x0`) and
  ε̂ recomputed from it, so that the pair stays consistent with x (as improved-diffusion's DDIM
  does).

  Args:
    denoise_fn: (x [B, ...], t [B]) -> model output [B, ...] (or [B, ..., 2C], see
      `prediction_channels`).
    x: [B, ...] float32, the state at noise level (α, σ).
    t: [] int32 or float32, the timestep of (α, σ) passed to the model for every example.
    alpha, sigma: [] float32, α > 0 and σ > 0.
    prediction: "eps", "x0" or "v" (diffusion.PREDICTIONS).
    clip_x0: clip x̂0 to [-1, 1] (threshold "static"; False: "none").
    threshold: None (follow `clip_x0`) or one of diffusion.THRESHOLDS, which takes precedence.
    threshold_percentile: p of "dynamic" thresholding, in (0, 1].

  Returns:
    (x̂0, ε̂), each [B, ...] float32.
  """
  t_batch = jnp.full(x.shape[:1], t, dtype=jnp.asarray(t).dtype)
  output = prediction_channels(denoise_fn(x, t_batch).astype(jnp.float32), x.shape[-1])
  chex.assert_equal_shape([output, x])
  if prediction == "eps":
    x0, eps = (x - sigma * output) / alpha, output
  elif prediction == "x0":
    x0, eps = output, (x - alpha * output) / sigma
  elif prediction == "v":
    x0, eps = alpha * x - sigma * output, sigma * x + alpha * output
  else:
    raise ValueError(f"unknown prediction {prediction!r}; valid: eps, x0, v")
  threshold = x0_threshold(clip_x0, threshold)
  if threshold != "none":
    x0 = threshold_x0(x0, threshold, threshold_percentile)
    eps = (x - alpha * x0) / sigma
  return x0, eps


def dpm_solver_pp_sample(
  denoise_fn: DenoiseFn,
  schedule: Schedule,
  x_init: jax.Array,
  *,
  num_steps: int = 20,
  skip: str = "logsnr",
  lower_order_final: bool = False,
  prediction: str = "eps",
  clip_x0: bool = True,
  threshold: str | None = None,
  threshold_percentile: float = 0.995,
) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022), multistep, in data-prediction form; num_steps model calls.

  On the timesteps t_0 = T-1 > ... > t_{S-1} = 0 (`spaced_timesteps`) and a final level with
  σ = 0 (λ = ∞), with h_i = λ_{t_{i+1}} - λ_{t_i} and D_i the model's x̂0 at (x_i, t_i):

    x_{i+1} = (σ_{i+1} / σ_i) x_i + α_{i+1} (1 - e^{-h_i}) (D_i + (D_i - D_{i-1}) / (2 r_i)),
    r_i = h_{i-1} / h_i.

  The first step is first order (no D_{-1}), and so is the last one, to σ = 0, where it reduces
  to x0 = D_{S-1}; `lower_order_final` makes the step before it first order too.

  Args:
    denoise_fn: (x_t [B, ...], t [B] int32) -> the model output.
    schedule: the model's schedule.
    x_init: x_T [B, ...] float32, the state at t = T-1.
    num_steps: S in [1, T], the number of model calls (static).
    skip: timestep spacing, one of timesteps.SKIPS.
    lower_order_final: first order for the step into t = 0 as well.
    prediction: what the model predicts (diffusion.PREDICTIONS).
    clip_x0: clip x̂0 to [-1, 1] at every call (DPM-Solver++'s thresholding at 1).
    threshold, threshold_percentile: as in `model_predictions` (None follows `clip_x0`).

  Returns:
    x0: [B, ...] float32.
  """
  timesteps = spaced_timesteps(schedule, num_steps, skip)
  alpha = schedule.sqrt_alphas_cumprod[timesteps]
  sigma = schedule.sqrt_one_minus_alphas_cumprod[timesteps]
  lam = log_snr(schedule)[timesteps]
  h = lam[1:] - lam[:-1]  # [S-1] finite steps; the last step, to σ = 0, has h = ∞.
  alpha_next = jnp.append(alpha[1:], 1.0)
  sigma_ratio = jnp.append(sigma[1:] / sigma[:-1], 0.0)
  one_minus_exp = jnp.append(-jnp.expm1(-h), 1.0)
  # 1 / (2 r_i) for the second-order steps 1 <= i <= S-2; 0 marks a first-order step.
  second_order = jnp.arange(num_steps) >= 1
  second_order &= jnp.arange(num_steps) <= num_steps - (3 if lower_order_final else 2)
  h_prev = jnp.concatenate([jnp.ones((1,)), h[:-1], jnp.ones((1,))])[:num_steps]
  h_this = jnp.append(h, 1.0)
  weight = jnp.where(second_order, h_this / (2.0 * h_prev), 0.0)

  def step(carry, inputs):
    x, x0_prev = carry
    t, a, s, ratio, coef, w = inputs
    x0, _ = model_predictions(
      denoise_fn,
      x,
      t,
      a,
      s,
      prediction=prediction,
      clip_x0=clip_x0,
      threshold=threshold,
      threshold_percentile=threshold_percentile,
    )
    x_next = ratio * x + coef * (x0 + w * (x0 - x0_prev))
    return (x_next, x0), None

  inputs = (timesteps, alpha, sigma, sigma_ratio, alpha_next * one_minus_exp, weight)
  (x0, _), _ = jax.lax.scan(step, (x_init, jnp.zeros_like(x_init)), inputs)
  return x0


def heun_sample(
  denoise_fn: DenoiseFn,
  schedule: Schedule,
  x_init: jax.Array,
  *,
  num_steps: int = 18,
  rho: float = 7.0,
  prediction: str = "eps",
  clip_x0: bool = True,
  threshold: str | None = None,
  threshold_percentile: float = 0.995,
) -> jax.Array:
  """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Heun's method in σ̃.

  On σ̃_0 > ... > σ̃_{N-1} (`karras_sigmas` from σ̃_{T-1} to σ̃_0 of the schedule) and σ̃_N = 0,
  with d(x̃, σ̃) = (x̃ - D(x̃; σ̃)) / σ̃:

    x̃'      = x̃_i + (σ̃_{i+1} - σ̃_i) d(x̃_i, σ̃_i)                       (Euler predictor)
    x̃_{i+1} = x̃_i + (σ̃_{i+1} - σ̃_i) (d(x̃_i, σ̃_i) + d(x̃', σ̃_{i+1})) / 2   (trapezoidal corrector)

  and the last step, to σ̃ = 0, is the Euler step alone (x0 = D(x̃_{N-1}; σ̃_{N-1})): 2N - 1 model
  calls. x̃_0 = x_T / α_{T-1}. The model sees x = x̃ / √(1 + σ̃²) at the float timestep
  t(σ̃) (`timesteps.timestep_from_sigma`, log σ̃ linear between integer timesteps); the U-Net's
  sinusoidal embedding takes float t. One scan step is one model call: predictor and corrector
  calls alternate, selected by a per-step flag.

  Args:
    denoise_fn: (x_t [B, ...], t [B] float32) -> the model output.
    schedule: the model's schedule.
    x_init: x_T [B, ...] float32, the state at t = T-1.
    num_steps: N ≥ 1 noise levels (static); 2N - 1 model calls.
    rho: the grid's ρ (EDM: 7).
    prediction: what the model predicts (diffusion.PREDICTIONS).
    clip_x0: clip D to [-1, 1] at every call.
    threshold, threshold_percentile: as in `model_predictions` (None follows `clip_x0`).

  Returns:
    x0: [B, ...] float32.
  """
  table = noise_to_signal(schedule)
  sigmas = karras_sigmas(table[0], table[-1], num_steps, rho)
  sigmas_next = jnp.append(sigmas[1:], 0.0)
  # Calls P_0, C_0, P_1, C_1, ..., P_{N-2}, C_{N-2}, P_{N-1}: P_i evaluates at σ̃_i, C_i at σ̃_{i+1}.
  is_predictor = jnp.arange(2 * num_steps - 1) % 2 == 0
  level = jnp.arange(2 * num_steps - 1) // 2
  sigma_eval = jnp.where(is_predictor, sigmas[level], sigmas_next[level])
  step_size = sigmas_next[level] - sigmas[level]

  def step(carry, inputs):
    x_base, slope_base, x_eval = carry
    sigma, delta, predictor = inputs
    alpha = jax.lax.rsqrt(1.0 + jnp.square(sigma))
    t = timestep_from_sigma(schedule, sigma)
    x0, _ = model_predictions(
      denoise_fn,
      alpha * x_eval,
      t,
      alpha,
      alpha * sigma,
      prediction=prediction,
      clip_x0=clip_x0,
      threshold=threshold,
      threshold_percentile=threshold_percentile,
    )
    slope = (x_eval - x0) / sigma
    corrected = x_base + delta * 0.5 * (slope_base + slope)
    x_base = jnp.where(predictor, x_eval, corrected)
    slope_base = jnp.where(predictor, slope, slope_base)
    x_eval = jnp.where(predictor, x_eval + delta * slope, corrected)
    return (x_base, slope_base, x_eval), None

  x_tilde = x_init / schedule.sqrt_alphas_cumprod[-1]
  carry = (x_tilde, jnp.zeros_like(x_tilde), x_tilde)
  (_, _, x0), _ = jax.lax.scan(step, carry, (sigma_eval, step_size, is_predictor))
  return x0
