"""The Gaussian diffusion process: forward marginals, posteriors, reverse-step moments, losses.

Shapes: x0, x_t, eps are [B, H, W, C] float32 (images in [-1, 1]); t is [B] int32 in [0, T).
Every function is pure; noise comes in as an argument or is drawn from a key passed in.
"""

import numbers
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.core.schedules import Schedule, extract

# The reverse-step variance σ_t²: β_t ("fixed_large"), β̃_t ("fixed_small"), or learned per pixel
# between the two on a log scale ("learned_range", improved DDPM): the network then outputs twice
# the image's channels, see `split_output`.
VARIANCES = ("fixed_large", "fixed_small", "learned_range")
# What the network predicts: the noise ε (DDPM), the clean image x0, or the velocity
# v = √ᾱ_t ε - √(1 - ᾱ_t) x0 (Salimans & Ho 2022).
PREDICTIONS = ("eps", "x0", "v")
# How a reverse step treats the predicted x̂0: clip to [-1, 1] ("static"), Imagen's per-sample
# percentile rescaling ("dynamic", Saharia et al. 2022), or leave it ("none"); `threshold_x0`.
THRESHOLDS = ("static", "dynamic", "none")

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


def predict_eps_from_x0(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array
) -> jax.Array:
  """ε̂ = (x_t - √ᾱ_t x0) / √(1 - ᾱ_t), the inverse of `predict_x0_from_eps`."""
  chex.assert_equal_shape([x_t, x0])
  return (x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x0) / extract(
    schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim
  )


def v_target(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """v = √ᾱ_t ε - √(1 - ᾱ_t) x0, the velocity target of the v-parameterisation."""
  chex.assert_equal_shape([x0, noise])
  return (
    extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
    - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
  )


def predict_x0(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, model_output: jax.Array, prediction: str
) -> jax.Array:
  """x̂0 implied by the network's output under `prediction` (one of PREDICTIONS), not clipped.

  For "v": x̂0 = √ᾱ_t x_t - √(1 - ᾱ_t) v, since x_t = √ᾱ_t x0 + √(1 - ᾱ_t) ε.
  """
  chex.assert_equal_shape([x_t, model_output])
  if prediction == "eps":
    return predict_x0_from_eps(schedule, x_t, t, model_output)
  if prediction == "x0":
    return model_output
  if prediction == "v":
    return (
      extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
      - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * model_output
    )
  raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def output_channels(image_channels: int, variance: str) -> int:
  """Channels the network outputs: 2C for "learned_range" (prediction, then v), else C.

  Args:
    image_channels: C, the channels of the images.
    variance: one of VARIANCES.

  Returns:
    The value for the config's `model.out_channels`.
  """
  _check_variance(variance)
  return 2 * image_channels if variance == "learned_range" else image_channels


def split_output(model_output: jax.Array, variance: str) -> tuple[jax.Array, jax.Array | None]:
  """Splits the network's output into its prediction part and its variance part.

  Args:
    model_output: [B, ..., C'] the network's output: C' = C for the fixed variances, C' = 2C for
      "learned_range", whose first C channels are the prediction (ε, x0 or v) and last C the
      variance interpolation value v of `learned_range_log_variance`.
    variance: one of VARIANCES.

  Returns:
    (prediction [B, ..., C], v [B, ..., C] or None for the fixed variances). A sampler that does
    not use the variance takes the first part and ignores the second.
  """
  _check_variance(variance)
  if variance != "learned_range":
    return model_output, None
  if model_output.shape[-1] % 2:
    raise ValueError(
      f"variance 'learned_range' needs an even number of output channels (the prediction, then "
      f"v), got {model_output.shape[-1]}; set model.out_channels = 2 * image channels"
    )
  prediction, v = jnp.split(model_output, 2, axis=-1)
  return prediction, v


def learned_range_log_variance(schedule: Schedule, t: jax.Array, v: jax.Array) -> jax.Array:
  """log σ_t² = f log β_t + (1 - f) log β̃_t with f = (v + 1) / 2 (Nichol & Dhariwal 2021).

  log β̃_t is the clipped posterior log-variance (log β̃ at t=1 in place of log 0 at t=0). The
  upper end is log β_t at every t, t=0 included, unlike "fixed_large" (which uses β̃ at t=1 there):
  so the decoder p(x0 | x1) at t=0 keeps a learnable range from β̃[1] to β[0] (β̃[1] is about
  β[0]/2 when β changes slowly), and its upper end β[0] is the decoder variance that makes the
  likelihood bound tight for smooth data as T grows. Hence v = +1 gives exactly the
  "fixed_large" log-variance for t >= 1 (and log β[0] at t=0), and v = -1 exactly the
  "fixed_small" log-variance for every t. v is not clipped: as in the paper, values outside
  [-1, 1] extrapolate beyond the range (a trained network hardly produces them).

  Args:
    schedule: the noise schedule.
    t: [B] int timesteps.
    v: [B, ...] the network's variance output, nominally in [-1, 1].

  Returns:
    [B, ...] float32 log-variance, per pixel.
  """
  max_log = extract(jnp.log(schedule.betas), t, v.ndim)
  min_log = extract(schedule.posterior_log_variance_clipped, t, v.ndim)
  frac = (v.astype(jnp.float32) + 1.0) / 2.0
  return frac * max_log + (1.0 - frac) * min_log


def reverse_variance(
  schedule: Schedule, t: jax.Array, variance: str, ndim: int
) -> tuple[jax.Array, jax.Array]:
  """σ_t² of the reverse step and its log for the fixed variances, shaped [B, 1, ...].

  "fixed_large" is β_t (with β̃_1 at t=0, as the original DDPM code, so the log stays finite);
  "fixed_small" is the posterior variance β̃_t with the clipped log. ("learned_range" depends
  on the network's output: see `learned_range_log_variance`.)
  """
  _check_variance(variance)
  if variance == "fixed_large":
    var = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
    return extract(var, t, ndim), extract(jnp.log(var), t, ndim)
  if variance == "fixed_small":
    return (
      extract(schedule.posterior_variance, t, ndim),
      extract(schedule.posterior_log_variance_clipped, t, ndim),
    )
  raise ValueError("variance 'learned_range' depends on the network: use p_mean_variance")


def _check_variance(variance: str) -> None:
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")


def check_threshold(threshold: str, percentile: float = 0.995, *, prefix: str = "") -> None:
  """Raises ValueError (one line) for an unknown threshold or a percentile outside (0, 1].

  Args:
    threshold: one of THRESHOLDS.
    percentile: p of dynamic thresholding, a Python number in (0, 1].
    prefix: put before the field names in the message (e.g. "diffusion.").
  """
  if threshold not in THRESHOLDS:
    raise ValueError(f"{prefix}threshold={threshold!r} is unknown; valid: {', '.join(THRESHOLDS)}")
  if (
    isinstance(percentile, bool)
    or not isinstance(percentile, numbers.Real)
    or not 0.0 < percentile <= 1.0
  ):
    raise ValueError(
      f"{prefix}threshold_percentile={percentile!r} must be in (0, 1] (Imagen: 0.995)"
    )


def x0_threshold(clip_x0: bool, threshold: str | None) -> str:
  """The thresholding a sampler applies: `threshold` when given, else the `clip_x0` flag's
  ("static" for True, "none" for False)."""
  if threshold is not None:
    return threshold
  return "static" if clip_x0 else "none"


def threshold_x0(x0: jax.Array, threshold: str = "static", percentile: float = 0.995) -> jax.Array:
  """x̂0 thresholded before it forms a reverse step.

    "static":  clip(x̂0, -1, 1);
    "dynamic": s = max(1, p-th percentile of |x̂0| over each sample's elements),
               clip(x̂0, -s, s) / s                                 (Imagen, Saharia et al. 2022);
    "none":    x̂0.

  The percentile interpolates linearly between order statistics (NumPy's default). With every
  |x̂0| <= 1, s = 1 and "dynamic" equals "static".

  Args:
    x0: [B, ...] float, the predicted clean data.
    threshold: one of THRESHOLDS (static Python string).
    percentile: p in (0, 1] for "dynamic" (Imagen: 0.995; 1 rescales by the largest |x̂0|).

  Returns:
    [B, ...] of x0's dtype; in [-1, 1] unless threshold is "none".
  """
  check_threshold(threshold, percentile)
  if threshold == "none":
    return x0
  if threshold == "static":
    return jnp.clip(x0, -1.0, 1.0)
  s = jnp.quantile(jnp.abs(x0).reshape(x0.shape[0], -1), percentile, axis=1)
  s = jnp.maximum(s, 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def p_mean_variance(
  schedule: Schedule,
  model_output: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  variance: str = "fixed_large",
  clip_x0: bool = True,
  prediction: str = "eps",
  threshold: str | None = None,
  threshold_percentile: float = 0.995,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """p_θ(x_{t-1} | x_t) = N(μ_θ, σ_t² I).

  μ_θ is the posterior mean μ̃_t(x̂0, x_t) with x̂0 implied by the network's output; for the
  ε-parameterisation without clipping this equals (1/√α_t)(x_t - β_t/√(1-ᾱ_t) ε_θ).

  Args:
    schedule: the noise schedule.
    model_output: the network's output at (x_t, t): [B, ..., C] with ε, x0 or v as `prediction`
      says; for "learned_range" [B, ..., 2C], that prediction followed by the variance value v
      (`split_output`).
    x_t: [B, ..., C] noisy data.
    t: [B] int timesteps.
    variance: "fixed_large" (σ² = β_t), "fixed_small" (σ² = β̃_t) or "learned_range"
      (`learned_range_log_variance`).
    clip_x0: clip x̂0 to [-1, 1] before forming the mean (threshold "static"; False: "none").
    prediction: one of PREDICTIONS.
    threshold: None (follow `clip_x0`) or one of THRESHOLDS, which then takes precedence
      (`threshold_x0`).
    threshold_percentile: p of "dynamic" thresholding, in (0, 1].

  Returns:
    (mean [B, ...], variance, log_variance, pred_x0 [B, ...]); the variances are [B, 1, ...] for
    the fixed variances and [B, ..., C] (per pixel) for "learned_range".
  """
  output, v = split_output(model_output, variance)
  if v is None:
    var, log_var = reverse_variance(schedule, t, variance, x_t.ndim)
    var = jnp.broadcast_to(var, log_var.shape)
  else:
    chex.assert_equal_shape([v, x_t])
    log_var = learned_range_log_variance(schedule, t, v)
    var = jnp.exp(log_var)
  pred_x0 = predict_x0(schedule, x_t, t, output, prediction)
  pred_x0 = threshold_x0(pred_x0, x0_threshold(clip_x0, threshold), threshold_percentile)
  mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
  return mean, var, log_var, pred_x0


def draw_t_and_noise(
  schedule: Schedule,
  key: jax.Array,
  shape: tuple[int, ...],
  *,
  t_probs: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The random inputs of a training loss: t [B] int32 and ε ~ N(0, I) of `shape` [B, ...].

  Args:
    schedule: the noise schedule.
    key: the PRNG key both are drawn from.
    shape: [B, ...] the shape of x0.
    t_probs: None for t ~ U{0..T-1}, or [T] probabilities p_t to draw t from (importance
      sampling; the noise is the same either way).

  Returns:
    (t [B] int32, ε [B, ...] float32).
  """
  t_key, noise_key = jax.random.split(key)
  if t_probs is None:
    t = jax.random.randint(t_key, shape[:1], 0, schedule.num_timesteps, dtype=jnp.int32)
  else:
    chex.assert_shape(t_probs, (schedule.num_timesteps,))
    t = jax.random.categorical(t_key, jnp.log(t_probs), shape=shape[:1]).astype(jnp.int32)
  return t, jax.random.normal(noise_key, shape, dtype=jnp.float32)


def simple_loss(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x0: jax.Array,
  key: jax.Array,
  *,
  prediction: str = "eps",
) -> jax.Array:
  """L_simple = ||target - f_θ(x_t, t)||² per example, t ~ U{0..T-1}, ε ~ N(0, I) from `key`.

  The target is ε, x0 or v = √ᾱ_t ε - √(1 - ᾱ_t) x0 as `prediction` says. In terms of the
  x0 error these weight noise level t by SNR_t (ε), 1 (x0) and 1 + SNR_t (v): v keeps the
  ε loss's emphasis on fine detail and adds weight at high noise, where the global layout of an
  image is decided.

  Args:
    schedule: the noise schedule.
    denoise_fn: (x_t [B, ...], t [B] int32) -> the network's output, same shape as x_t.
    x0: [B, ...] clean data in [-1, 1].
    key: the PRNG key the timesteps and noise are drawn from (`draw_t_and_noise`).
    prediction: one of PREDICTIONS.

  Returns:
    [B] float32 mean squared error per example (mean over all non-batch dimensions).
  """
  t, noise = draw_t_and_noise(schedule, key, x0.shape)
  return _simple_loss_given(schedule, denoise_fn, x0, t, noise, prediction)


def simple_loss_per_example_keys(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x0: jax.Array,
  keys: jax.Array,
  *,
  prediction: str = "eps",
) -> jax.Array:
  """L_simple with example j's t and ε drawn from keys[j], in one call of `denoise_fn`.

  Row j equals `simple_loss(schedule, denoise_fn, x0[j:j+1], keys[j])[0]`: the draws of an
  example do not depend on the batch it is in.

  Args:
    keys: [B] PRNG keys, one per example of x0 [B, ...].
    (the others as in `simple_loss`)
  """
  draw = lambda key: draw_t_and_noise(schedule, key, (1, *x0.shape[1:]))
  t, noise = jax.vmap(draw)(keys)
  return _simple_loss_given(schedule, denoise_fn, x0, t[:, 0], noise[:, 0], prediction)


def _simple_loss_given(schedule, denoise_fn, x0, t, noise, prediction: str) -> jax.Array:
  x_t = q_sample(schedule, x0, t, noise)
  targets = {"eps": lambda: noise, "x0": lambda: x0, "v": lambda: v_target(schedule, x0, t, noise)}
  if prediction not in targets:
    raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
  output = denoise_fn(x_t, t).astype(jnp.float32)
  chex.assert_equal_shape([output, noise])
  return jnp.mean(jnp.square(output - targets[prediction]()), axis=tuple(range(1, x0.ndim)))
