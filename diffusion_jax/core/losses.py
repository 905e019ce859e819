"""Training losses: L_simple, L_vlb and the hybrid of improved DDPM (Nichol & Dhariwal 2021).

With T timesteps, t ~ U{0..T-1} and L_t the bound's term at t in bits per dimension
(`likelihood.vlb_terms`):

  "simple":  L_simple = ||target - f_θ(x_t, t)||² (mean over dimensions), target ε, x0 or v;
  "vlb":     T · L_t, whose mean over t is the bound less its parameter-free prior term;
  "hybrid":  L_simple + λ · T · L_t with λ = `vlb_weight` (0.001) and a stop-gradient on the mean
             in L_t, so L_simple trains the mean and L_t only the learned variance.

With λ = 0.001 the hybrid is the published one: improved-diffusion's per-term bound in bits per
dimension rescaled by T / 1000. The squared error only looks at the prediction channels; the
variance channels of "learned_range" enter through L_t alone.
"""

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.core import diffusion, importance, likelihood
from diffusion_jax.core.diffusion import DenoiseFn
from diffusion_jax.core.schedules import Schedule

LOSS_TYPES = ("simple", "hybrid", "vlb")


def check_loss(loss_type: str, variance: str) -> None:
  """Raises ValueError (one line) for an unknown loss, or "hybrid" without a learned variance."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
  if variance not in diffusion.VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(diffusion.VARIANCES)}")
  if loss_type == "hybrid" and variance != "learned_range":
    raise ValueError(
      f"loss 'hybrid' trains only a learned variance through L_vlb, but variance={variance!r}; "
      "use variance 'learned_range' (or loss 'simple')"
    )


def training_loss(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x0: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  loss_type: str = "simple",
  prediction: str = "eps",
  variance: str = "fixed_large",
  vlb_weight: float = 0.001,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The per-example training loss at given timesteps and noise (see the module docstring).

  Args:
    schedule: the noise schedule.
    denoise_fn: (x_t [B, ...], t [B] int32) -> the network's output, [B, ..., C] or [B, ..., 2C]
      for "learned_range" (`diffusion.output_channels`).
    x0: [B, ..., C] clean data in [-1, 1] (on the 256-level grid: L_t's decoder is discretized).
    t: [B] int32 timesteps.
    noise: ε, same shape as x0.
    loss_type: one of LOSS_TYPES.
    prediction: one of diffusion.PREDICTIONS.
    variance: one of diffusion.VARIANCES; "hybrid" needs "learned_range".
    vlb_weight: λ of the hybrid loss.

  Returns:
    (loss [B] float32, terms): terms holds the [B] float32 parts, "mse" (simple, hybrid) and
    "vlb" (hybrid, vlb: L_t in bits per dimension, without the factor T).
  """
  check_loss(loss_type, variance)
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  output = denoise_fn(x_t, t).astype(jnp.float32)
  chex.assert_shape(output, (*x0.shape[:-1], diffusion.output_channels(x0.shape[-1], variance)))
  prediction_part, variance_part = diffusion.split_output(output, variance)
  terms = {}
  if loss_type in ("simple", "hybrid"):
    target = _target(schedule, x0, t, noise, prediction)
    terms["mse"] = jnp.mean(jnp.square(prediction_part - target), axis=tuple(range(1, x0.ndim)))
  if loss_type in ("hybrid", "vlb"):
    if loss_type == "hybrid":
      # L_t sees the mean as a constant: its gradient reaches only the variance channels.
      output = jnp.concatenate([jax.lax.stop_gradient(prediction_part), variance_part], axis=-1)
    terms["vlb"] = likelihood.vlb_terms(
      schedule, output, x0, x_t, t, variance=variance, prediction=prediction, clip_x0=False
    )
  if loss_type == "simple":
    return terms["mse"], terms
  scaled_vlb = schedule.num_timesteps * terms["vlb"]
  if loss_type == "vlb":
    return scaled_vlb, terms
  return terms["mse"] + vlb_weight * scaled_vlb, terms


def _target(schedule, x0, t, noise, prediction: str) -> jax.Array:
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  if prediction == "v":
    return diffusion.v_target(schedule, x0, t, noise)
  raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(diffusion.PREDICTIONS)}")


def loss_per_example_keys(
  schedule: Schedule,
  denoise_fn: DenoiseFn,
  x0: jax.Array,
  keys: jax.Array,
  *,
  loss_type: str = "simple",
  prediction: str = "eps",
  variance: str = "fixed_large",
  vlb_weight: float = 0.001,
  t_probs: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`training_loss` with example j's t and ε drawn from keys[j], in one call of `denoise_fn`.

  Row j equals row 0 of the same call on x0[j:j+1], keys[j:j+1]: an example's draws do not
  depend on the batch it is in. With `t_probs` (importance sampling, `importance.probabilities`)
  t is drawn from p_t and the loss is weighted by 1 / (T p_t), so that its mean over t is that
  of uniform sampling; without it t ~ U{0..T-1}, the draws of `diffusion.simple_loss`, and
  loss_type "simple" gives exactly `diffusion.simple_loss_per_example_keys`.

  Args:
    keys: [B] PRNG keys, one per example of x0 [B, ...].
    t_probs: None (uniform t) or [T] probabilities of t.
    (the others as in `training_loss`)

  Returns:
    (loss [B] float32, the weighted per-example loss to average; terms), where terms holds the
    [B] arrays of `training_loss` plus "t" (int32), "loss" (the unweighted loss, what
    `importance.update` records) and "weight" (1 / (T p_t); ones without t_probs).
  """
  check_loss(loss_type, variance)
  chex.assert_shape(keys, x0.shape[:1])
  draw = lambda key: diffusion.draw_t_and_noise(schedule, key, (1, *x0.shape[1:]), t_probs=t_probs)
  t, noise = jax.vmap(draw)(keys)
  t, noise = t[:, 0], noise[:, 0]
  loss, terms = training_loss(
    schedule,
    denoise_fn,
    x0,
    t,
    noise,
    loss_type=loss_type,
    prediction=prediction,
    variance=variance,
    vlb_weight=vlb_weight,
  )
  weight = jnp.ones_like(loss) if t_probs is None else importance.loss_weights(t_probs, t)
  return weight * loss, {**terms, "t": t, "loss": loss, "weight": weight}
