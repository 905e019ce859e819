"""Score distillation sampling (DreamFusion, Poole et al. 2022): a frozen diffusion model as a loss.

For images x = g(θ) rendered (or decoded) from parameters θ, with t drawn from a range of
timesteps, ε ~ N(0, I) and x_t = √ᾱ_t x + √(1 - ᾱ_t) ε,

    ∇_θ L_SDS = E_{t,ε}[ w(t) (ε̂(x_t; y, t) - ε) ∂x/∂θ ],

the gradient of the diffusion training loss with the U-Net's Jacobian ∂ε̂/∂x_t left out. Here
ε̂ passes through `stop_gradient`, and `sds_loss` is a surrogate scalar whose gradient with respect
to the images is that per-example gradient; `jax.grad` of `sds_loss(render(θ))` then applies the
chain rule through the renderer (or an autoencoder's encoder) alone.

The prompt y and classifier-free guidance live in the caller's denoise_fn:
`sampling.guidance.guided(apply_fn, cond, 100.0)` builds the guided ε̂ (DreamFusion used scale
100). The diffusion model stays frozen: its parameters are closed over by denoise_fn, never
optimised (every output of denoise_fn is stop-gradiented here).
"""

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.core import diffusion, rng
from diffusion_jax.core.diffusion import DenoiseFn
from diffusion_jax.core.schedules import Schedule, extract

# w(t): "dreamfusion" is 1 - ᾱ_t = σ_t², the paper's; "uniform" is 1 (as in SJC's gradient).
WEIGHTINGS = ("dreamfusion", "uniform")
REDUCTIONS = ("sum", "mean")


def sds_weight(schedule: Schedule, t: jax.Array, kind: str = "dreamfusion") -> jax.Array:
  """w(t) of the SDS gradient: 1 - ᾱ_t ("dreamfusion", σ_t²) or 1 ("uniform").

  Args:
    schedule: the noise schedule.
    t: [B] int timesteps in [0, T).
    kind: one of WEIGHTINGS.

  Returns:
    [B] float32, in (0, 1].
  """
  if kind == "dreamfusion":
    return 1.0 - schedule.alphas_cumprod[t]
  if kind == "uniform":
    return jnp.ones(t.shape, jnp.float32)
  raise ValueError(f"unknown SDS weighting {kind!r}; valid: {', '.join(WEIGHTINGS)}")


def timestep_bounds(num_timesteps: int, t_range: tuple[float, float]) -> tuple[int, int]:
  """The integer timesteps [t_min, t_max] (both included) that t_range · T covers.

  t_min = round(t_range[0] · T), t_max = min(round(t_range[1] · T), T - 1); DreamFusion's
  (0.02, 0.98) with T = 1000 gives [20, 980].

  Args:
    num_timesteps: T.
    t_range: (low, high) Python floats with 0 <= low <= high <= 1.

  Returns:
    (t_min, t_max) Python ints.
  """
  low, high = (float(v) for v in t_range)
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(
      f"t_range={t_range!r} must satisfy 0 <= low <= high <= 1 (DreamFusion: 0.02, 0.98)"
    )
  t_max = min(round(high * num_timesteps), num_timesteps - 1)
  return min(round(low * num_timesteps), t_max), t_max


def draw_sds_t_and_noise(
  schedule: Schedule,
  keys: jax.Array,
  shape: tuple[int, ...],
  *,
  t_range: tuple[float, float] = (0.02, 0.98),
) -> tuple[jax.Array, jax.Array]:
  """Per-example draws: example j splits keys[j] into (t key, noise key), t_j ~ U{t_min..t_max}.

  Args:
    schedule: the noise schedule.
    keys: [B] PRNG keys, one per example.
    shape: [B, ...] the shape of the images.
    t_range: fractions of T bounding the timesteps (`timestep_bounds`).

  Returns:
    (t [B] int32, ε [B, ...] float32 ~ N(0, I)).
  """
  t_min, t_max = timestep_bounds(schedule.num_timesteps, t_range)
  chex.assert_shape(keys, shape[:1])

  def draw(key):
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (), t_min, t_max + 1, dtype=jnp.int32)
    return t, jax.random.normal(noise_key, shape[1:], dtype=jnp.float32)

  return jax.vmap(draw)(keys)


def eps_from_output(
  schedule: Schedule, x_t: jax.Array, t: jax.Array, model_output: jax.Array, prediction: str
) -> jax.Array:
  """ε̂ implied by the network's output under `prediction` (one of PREDICTIONS).

  "eps": the output; "x0": ε̂ = (x_t - √ᾱ_t x̂0) / √(1 - ᾱ_t); "v": ε̂ = √ᾱ_t v + √(1 - ᾱ_t) x_t
  (from x_t = √ᾱ_t x0 + √(1 - ᾱ_t) ε and v = √ᾱ_t ε - √(1 - ᾱ_t) x0).

  Args:
    schedule: the noise schedule.
    x_t: [B, ...] noisy data.
    t: [B] int timesteps.
    model_output: the prediction, same shape as x_t.
    prediction: one of PREDICTIONS.

  Returns:
    [B, ...] float32.
  """
  chex.assert_equal_shape([x_t, model_output])
  if prediction == "eps":
    return model_output
  if prediction == "x0":
    return diffusion.predict_eps_from_x0(schedule, x_t, t, model_output)
  if prediction == "v":
    return (
      extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * model_output
      + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
    )
  raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(diffusion.PREDICTIONS)}")


def sds_grad(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  images: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  weighting: str = "dreamfusion",
  prediction: str = "eps",
  variance: str = "fixed_large",
) -> jax.Array:
  """The SDS gradient at given draws: w(t) (ε̂(x_t, t) - ε), x_t = q_sample(images, t, ε).

  No gradient flows through it (images and ε̂ are stop-gradiented), so the network's backward
  pass is never computed.

  Args:
    schedule: the noise schedule.
    denoise_fn: (x_t [B, ...], t [B] int32) -> the network's output (ε, x0 or v as `prediction`
      says; with twice the channels for variance "learned_range", whose variance half is dropped).
    images: [B, ...] x, in the model's data space (pixels in [-1, 1], or scaled latents).
    t: [B] int32 timesteps.
    noise: ε, same shape as images.
    weighting: one of WEIGHTINGS.
    prediction: one of PREDICTIONS.
    variance: one of VARIANCES (only "learned_range" matters: its output has 2C channels).

  Returns:
    [B, ...] float32, the gradient with respect to the images.
  """
  chex.assert_equal_shape([images, noise])
  x_t = diffusion.q_sample(schedule, jax.lax.stop_gradient(images), t, noise)
  output, _ = diffusion.split_output(denoise_fn(x_t, t), variance)
  eps = eps_from_output(schedule, x_t, t, output.astype(jnp.float32), prediction)
  weight = sds_weight(schedule, t, weighting).reshape((-1,) + (1,) * (images.ndim - 1))
  return jax.lax.stop_gradient(weight * (eps - noise))


def sds_loss(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  images: jax.Array,
  key: jax.Array,
  *,
  t_range: tuple[float, float] = (0.02, 0.98),
  weighting: str = "dreamfusion",
  prediction: str = "eps",
  variance: str = "fixed_large",
  reduction: str = "sum",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """A scalar whose gradient with respect to `images` is the SDS gradient (module docstring).

  With g = `sds_grad`(images) at the draws of `key`, the loss is

      L = sg(½ Σ_j ‖g_j‖²) + Σ_j ⟨sg(g_j), x_j - sg(x_j)⟩          ("sum"; "mean" divides by B),

  so ∂L/∂x_j = g_j = w(t_j)(ε̂_j - ε_j) exactly (bitwise), and the value ½ Σ‖g‖² is what the
  common surrogate ½ ‖x - sg(x - g)‖² reports. The value is a diagnostic, not a quantity that
  decreases as the images improve.

  Args:
    schedule: the noise schedule.
    denoise_fn: the frozen (possibly guided) model, as in `sds_grad`.
    images: [B, ...] float32 in the model's data space: pixels in [-1, 1] (rendered colours c in
      [0, 1] map to 2c - 1), or latents from an encoder called with gradient on.
    key: a PRNG key (shape ()): example j draws from fold_in(key, j); or [B] keys, one per
      example (e.g. `rng.example_keys` of the views' global indices).
    t_range: fractions of T bounding the timesteps (`timestep_bounds`); DreamFusion's 0.02, 0.98.
    weighting: one of WEIGHTINGS.
    prediction: one of PREDICTIONS.
    variance: one of VARIANCES.
    reduction: "sum" over the batch (∂L/∂x_j = g_j) or "mean" (∂L/∂x_j = g_j / B).

  Returns:
    (loss: () float32, aux: {"t": [B] int32, "weight": [B] float32 w(t),
    "grad_norm": [B] float32 ‖g_j‖ (before the reduction)}).
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
  batch = images.shape[0]
  if key.ndim == 0:
    keys = rng.example_keys(key, jnp.arange(batch))
  elif key.shape == (batch,):
    keys = key
  else:
    raise ValueError(f"key must be one PRNG key or [B={batch}] keys, got shape {key.shape}")
  t, noise = draw_sds_t_and_noise(schedule, keys, images.shape, t_range=t_range)
  grad = sds_grad(
    schedule,
    denoise_fn,
    images,
    t,
    noise,
    weighting=weighting,
    prediction=prediction,
    variance=variance,
  )
  scale = 1.0 if reduction == "sum" else 1.0 / batch
  value = jax.lax.stop_gradient(0.5 * jnp.sum(jnp.square(grad)))
  surrogate = jnp.sum(grad * (images - jax.lax.stop_gradient(images)))
  aux = {
    "t": t,
    "weight": sds_weight(schedule, t, weighting),
    "grad_norm": jnp.sqrt(jnp.sum(jnp.square(grad).reshape(batch, -1), axis=1)),
  }
  return scale * (value + surrogate), aux
