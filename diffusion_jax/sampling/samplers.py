"""Reverse-time samplers: from x_T ~ N(0, I) to x_0, one compiled `lax.scan` each.

  ddpm          ancestral sampling (Ho et al. 2020) on all T steps or a respaced subsequence
                (Nichol & Dhariwal 2021); num_steps model calls.
  ddim          DDIM (Song et al. 2021) with noise η (0: deterministic); num_steps model calls.
  dpm_solver++  DPM-Solver++(2M) (Lu et al. 2022), in solvers.py; num_steps model calls.
  heun          EDM's Heun sampler (Karras et al. 2022), in solvers.py; 2 num_steps - 1 calls.

All of them work with one trained model, whatever its prediction (ε, x0, v). Randomness is per
sample: image i of a call is a pure function of `fold_in(key, first_index + i)` (its starting noise
and every step's noise are drawn from that key alone, with `vmap`), so the same key gives the same
images for any batch size or device count, and the same x_T for every sampler.
"""

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from diffusion_jax.core import rng
from diffusion_jax.core.diffusion import DenoiseFn, check_threshold, p_mean_variance
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.core.timesteps import SKIPS, respace, spaced_timesteps
from diffusion_jax.sampling.solvers import (
  dpm_solver_pp_sample,
  heun_sample,
  model_predictions,
  prediction_channels,
)

SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "heun")
FIXED_VARIANCES = ("fixed_large", "fixed_small")
# num_steps=None: every timestep for ddpm and ddim; DPM-Solver++'s and EDM's usual settings
# for the others (20 model calls; 18 noise levels = 35 model calls).
DEFAULT_NUM_STEPS = {"dpm_solver++": 20, "heun": 18}
MIN_NUM_STEPS = {"ddpm": 2, "ddim": 1, "dpm_solver++": 1, "heun": 1}
# The timestep spacing each sampler uses when `skip` is not given; heun has its own σ grid.
DEFAULT_SKIP = {"ddpm": "uniform", "ddim": "uniform", "dpm_solver++": "logsnr"}
# The options every sampler takes, and those each one takes besides them.
_COMMON_OPTIONS = ("prediction", "clip_x0", "threshold", "threshold_percentile", "first_index")
_OPTIONS = {
  "ddpm": ("variance", "skip"),
  "ddim": ("eta", "skip"),
  "dpm_solver++": ("skip", "lower_order_final"),
  "heun": ("rho",),
}


def per_sample_keys(key: jax.Array, batch_size: int, first_index: int | jax.Array = 0) -> jax.Array:
  """Keys [B] with keys[i] = fold_in(key, first_index + i)."""
  return rng.example_keys(key, first_index + jnp.arange(batch_size, dtype=jnp.uint32))


def _normal(keys: jax.Array, shape: Sequence[int]) -> jax.Array:
  """One standard normal draw of `shape` per key: [B, *shape] float32."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype=jnp.float32))(keys)


def initial_noise(
  key: jax.Array, shape: Sequence[int], first_index: int | jax.Array = 0
) -> tuple[jax.Array, jax.Array]:
  """x_T ~ N(0, I) [B, ...] and the per-sample keys [B] of the later steps' noise.

  Sample i splits fold_in(key, first_index + i) into the key of its x_T and the key its step
  noise is folded from (`fold_in(step_key, t)` at timestep t).
  """
  keys = per_sample_keys(key, shape[0], first_index)
  init_keys, step_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  return _normal(init_keys, shape[1:]), step_keys


def _step_noise(step_keys: jax.Array, t: jax.Array, shape: Sequence[int]) -> jax.Array:
  return _normal(jax.vmap(jax.random.fold_in, (0, None))(step_keys, t), shape)


def ddpm_sample(
  denoise_fn: DenoiseFn,
  schedule: Schedule,
  shape: Sequence[int],
  key: jax.Array,
  *,
  num_steps: int | None = None,
  skip: str = "uniform",
  variance: str = "fixed_large",
  clip_x0: bool = True,
  threshold: str | None = None,
  threshold_percentile: float = 0.995,
  prediction: str = "eps",
  first_index: int | jax.Array = 0,
) -> jax.Array:
  """Ancestral sampling: x_{t'} = μ_θ(x_t, t) + σ_t z over the kept timesteps, no noise at t = 0.

  With S < T steps the schedule is respaced (`timesteps.respace`, as improved-diffusion): the
  steps between kept timesteps t' < t use β' = 1 - ᾱ_t / ᾱ_{t'} and the posterior of that
  schedule, and the model is still called at the original t. S = T is the original chain. With
  a fixed `variance`, a [..., 2C] output (a learned-variance model's) is used for its prediction
  half only; any other variance gets the whole output through `diffusion.p_mean_variance`.

  Args:
    denoise_fn: (x_t [B, ...], t [B] int32) -> the network's output (ε, x0 or v).
    schedule: the noise schedule the model was trained with.
    shape: (B, H, W, C) of the samples.
    key: the PRNG key of the whole call; sample i uses fold_in(key, first_index + i).
    num_steps: S in [2, T] model calls (static); None means T.
    skip: how the S timesteps are spread, one of timesteps.SKIPS.
    variance: the reverse-step variance of the (respaced) schedule, "fixed_large" (β') or
      "fixed_small" (β̃').
    clip_x0: clip the predicted x0 to [-1, 1] in every step.
    threshold: None (follow `clip_x0`) or one of diffusion.THRESHOLDS, which takes precedence
      (`diffusion.threshold_x0`; "dynamic" is Imagen's).
    threshold_percentile: p of "dynamic" thresholding, in (0, 1].
    prediction: what denoise_fn predicts, one of diffusion.PREDICTIONS.
    first_index: global index of the first sample of this batch.

  Returns:
    x_0: [B, H, W, C] float32, images in about [-1, 1].
  """
  num_timesteps = schedule.num_timesteps
  num_steps = num_timesteps if num_steps is None else num_steps
  if num_steps == num_timesteps:
    timesteps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
    spaced = schedule
  else:
    timesteps = spaced_timesteps(schedule, num_steps, skip)
    spaced = respace(schedule, timesteps[::-1])
  x_init, step_keys = initial_noise(key, shape, first_index)

  def step(x_t, inputs):
    k, t = inputs  # index k of the respaced schedule, the model's timestep t
    k_batch = jnp.full((shape[0],), k, dtype=jnp.int32)
    output = denoise_fn(x_t, jnp.full_like(k_batch, t))
    if variance in FIXED_VARIANCES:  # a learned variance reads the whole output itself
      output = prediction_channels(output, shape[-1])
    mean, _, log_variance, _ = p_mean_variance(
      spaced,
      output,
      x_t,
      k_batch,
      variance=variance,
      clip_x0=clip_x0,
      prediction=prediction,
      threshold=threshold,
      threshold_percentile=threshold_percentile,
    )
    z = _step_noise(step_keys, t, shape[1:])
    x_prev = jnp.where(k == 0, mean, mean + jnp.exp(0.5 * log_variance) * z)
    return x_prev, None

  indices = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
  x0, _ = jax.lax.scan(step, x_init, (indices, timesteps))
  return x0


def ddim_sample(
  denoise_fn: DenoiseFn,
  schedule: Schedule,
  shape: Sequence[int],
  key: jax.Array,
  *,
  num_steps: int | None = None,
  skip: str = "uniform",
  eta: float = 0.0,
  clip_x0: bool = True,
  threshold: str | None = None,
  threshold_percentile: float = 0.995,
  prediction: str = "eps",
  first_index: int | jax.Array = 0,
) -> jax.Array:
  """DDIM: x_{t'} = √ᾱ_{t'} x̂0 + √(1 - ᾱ_{t'} - s²) ε̂ + s z from t to the previous kept t'.

  s = η √((1 - ᾱ_{t'}) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_{t'}); after t = 0 comes ᾱ = 1, where the
  step gives x̂0. η = 0 is deterministic (given x_T), the first-order solver of the
  probability-flow ODE; η = 1 with all T steps is the DDPM chain with the posterior variance β̃.

  Args:
    denoise_fn: (x_t [B, ...], t [B] int32) -> the network's output (ε, x0 or v).
    schedule: the noise schedule the model was trained with.
    shape: (B, H, W, C) of the samples.
    key: the PRNG key of the whole call; sample i uses fold_in(key, first_index + i).
    num_steps: S in [1, T] model calls (static); None means T.
    skip: how the S timesteps are spread, one of timesteps.SKIPS.
    eta: η in [0, 1].
    clip_x0: clip the predicted x0 to [-1, 1] in every step.
    threshold: None (follow `clip_x0`) or one of diffusion.THRESHOLDS, which takes precedence
      (`diffusion.threshold_x0`; "dynamic" is Imagen's).
    threshold_percentile: p of "dynamic" thresholding, in (0, 1].
    prediction: what denoise_fn predicts, one of diffusion.PREDICTIONS.
    first_index: global index of the first sample of this batch.

  Returns:
    x_0: [B, H, W, C] float32.
  """
  num_steps = schedule.num_timesteps if num_steps is None else num_steps
  timesteps = spaced_timesteps(schedule, num_steps, skip)
  alphas_cumprod = schedule.alphas_cumprod[timesteps]
  alphas_cumprod_next = jnp.append(alphas_cumprod[1:], 1.0)
  one_minus = jnp.square(schedule.sqrt_one_minus_alphas_cumprod[timesteps])
  one_minus_next = jnp.append(one_minus[1:], 0.0)
  noise_std = eta * jnp.sqrt(
    one_minus_next / one_minus * -jnp.expm1(jnp.log(alphas_cumprod) - jnp.log(alphas_cumprod_next))
  )
  eps_coef = jnp.sqrt(jnp.maximum(one_minus_next - jnp.square(noise_std), 0.0))
  x_init, step_keys = initial_noise(key, shape, first_index)

  def step(x_t, inputs):
    t, alpha, sigma, alpha_next, c_eps, c_noise = inputs
    x0, eps = model_predictions(
      denoise_fn,
      x_t,
      t,
      alpha,
      sigma,
      prediction=prediction,
      clip_x0=clip_x0,
      threshold=threshold,
      threshold_percentile=threshold_percentile,
    )
    x_next = alpha_next * x0 + c_eps * eps
    if eta == 0:  # static: deterministic DDIM draws no noise
      return x_next, None
    return x_next + c_noise * _step_noise(step_keys, t, shape[1:]), None

  inputs = (
    timesteps,
    schedule.sqrt_alphas_cumprod[timesteps],
    schedule.sqrt_one_minus_alphas_cumprod[timesteps],
    jnp.sqrt(alphas_cumprod_next),
    eps_coef,
    noise_std,
  )
  x0, _ = jax.lax.scan(step, x_init, inputs)
  return x0


def _dpm_solver_pp(denoise_fn, schedule, shape, key, *, first_index=0, **options):
  x_init, _ = initial_noise(key, shape, first_index)
  return dpm_solver_pp_sample(denoise_fn, schedule, x_init, **options)


def _heun(denoise_fn, schedule, shape, key, *, first_index=0, **options):
  x_init, _ = initial_noise(key, shape, first_index)
  return heun_sample(denoise_fn, schedule, x_init, **options)


_SAMPLE_FNS = {
  "ddpm": ddpm_sample,
  "ddim": ddim_sample,
  "dpm_solver++": _dpm_solver_pp,
  "heun": _heun,
}


def num_function_evaluations(sampler: str, num_steps: int) -> int:
  """Model calls of one sample: num_steps, or 2 num_steps - 1 for heun."""
  return 2 * num_steps - 1 if sampler == "heun" else num_steps


def check_sampler(
  sampler: str,
  num_steps: int | None,
  num_timesteps: int,
  *,
  skip: str | None = None,
  eta: float = 0.0,
) -> None:
  """Raises ValueError (one line, naming the valid choices) for an unusable sampler setting.

  Args:
    sampler: one of SAMPLERS.
    num_steps: None or an int in [MIN_NUM_STEPS[sampler], num_timesteps].
    num_timesteps: T of the model's schedule.
    skip: None, "" (the sampler's default) or one of timesteps.SKIPS; heun takes none.
    eta: ddim's η, in [0, 1].
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler={sampler!r} is unknown; valid: {', '.join(SAMPLERS)}")
  low = MIN_NUM_STEPS[sampler]
  if num_steps is not None and not (
    isinstance(num_steps, numbers.Integral) and low <= num_steps <= num_timesteps
  ):
    raise ValueError(
      f"sample.num_steps={num_steps} is out of range for sampler {sampler!r}; "
      f"valid: None or an integer from {low} to {num_timesteps} (the schedule's num_timesteps)"
    )
  if skip and sampler in DEFAULT_SKIP and skip not in SKIPS:
    raise ValueError(f"sample.skip={skip!r} is unknown; valid: '' (default), {', '.join(SKIPS)}")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"sample.eta={eta} must be in [0, 1] (0: deterministic DDIM)")


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
    denoise_fn: (x_t [B, H, W, C], t [B] int32, or float32 for heun) -> the model output (ε, x0
      or v; [..., 2C] outputs use their first C channels).
    schedule: the noise schedule the model was trained with.
    shape: (B, H, W, C) of the samples.
    key: PRNG key; sample i depends only on fold_in(key, first_index + i).
    sampler: one of SAMPLERS.
    num_steps: None (T for ddpm and ddim, DEFAULT_NUM_STEPS for the others) or the number of
      steps: model calls for ddpm, ddim and dpm_solver++, noise levels for heun (2N - 1 calls).
    **options: prediction, clip_x0 (default True for every sampler), threshold (None: follow
      clip_x0; "static", "dynamic" or "none" take precedence), threshold_percentile (0.995) and
      first_index for all;
      variance (ddpm); eta (ddim); skip (ddpm, ddim, dpm_solver++; None or "" for the
      sampler's default, DEFAULT_SKIP); lower_order_final (dpm_solver++); rho (heun). Options
      of other samplers are ignored, so one set of options serves every sampler.

  Returns:
    x_0: [B, H, W, C] float32 in about [-1, 1].
  """
  known = set(_COMMON_OPTIONS).union(*_OPTIONS.values())
  unknown = sorted(set(options) - known)
  if unknown:
    raise TypeError(f"unknown sampler options {unknown}; valid: {', '.join(sorted(known))}")
  check_sampler(
    sampler,
    num_steps,
    schedule.num_timesteps,
    skip=options.get("skip"),
    eta=options.get("eta", 0.0),
  )
  threshold = options.get("threshold")
  check_threshold(
    "static" if threshold is None else threshold, options.get("threshold_percentile", 0.995)
  )
  if num_steps is None:
    num_steps = DEFAULT_NUM_STEPS.get(sampler, schedule.num_timesteps)
  used = {*_COMMON_OPTIONS, *_OPTIONS[sampler]}
  kwargs = {name: value for name, value in options.items() if name in used}
  if not kwargs.get("skip", True):  # None or "": the sampler's default
    kwargs["skip"] = DEFAULT_SKIP[sampler]
  return _SAMPLE_FNS[sampler](
    denoise_fn, schedule, tuple(shape), key, num_steps=num_steps, **kwargs
  )
