"""Super-resolution conditioning (SR3, Imagen): the low-resolution input and its noise augmentation.

A super-resolution model ε_θ(x_t, t, z_s, s) sees, besides the noisy high-resolution image x_t,
a low-resolution image z (upsampled and concatenated to x_t inside the U-Net) and the level
s ∈ [0, 1] of the noise it was corrupted with (noise-conditioning augmentation, Imagen §2.5):

  z_s = α_s z + σ_s ε,   α_s = cos(π s / 2),   σ_s = sin(π s / 2),   ε ~ N(0, I).

The augmentation has its own continuous variance-preserving schedule, the cosine schedule without
offset, rather than the run's: level 0 is exactly the clean input (α_0 = 1, σ_0 = 0 in float32,
where every discrete schedule has ᾱ_0 < 1), and a level means the same corruption whatever the
run's diffusion.schedule and num_timesteps, so a cascade can set one level for a stage whose base
model was trained with another schedule. Training draws s ~ U[0, max_level] per example;
sampling uses a fixed level (Imagen sweeps 0-0.3) for the output of the stage below.

Training pairs come from the high-resolution batch itself (`downsample`, an area average), so any
data set trains a super-resolution model without a pipeline of its own; a cascade feeds the base
model's samples to `augment` instead.

Condition entries (a `guidance.Condition` dict, passed to the network as keyword arguments):
"low_res" [B, h, w, C] float32 (the augmented image z_s), "aug_level" [B] float32 (s).
"""

import math

import jax
import jax.numpy as jnp

# The condition entries of a super-resolution model (kept in both halves of guidance).
CONDITION_KEYS = ("low_res", "aug_level")

# Separates the augmentation draws from the other per-example draws (t, ε, dropout, condition
# dropout in training; the initial noise and step noise in sampling).
_AUG_STREAM = 0x5AA6


def downsample(x: jax.Array, factor: int) -> jax.Array:
  """The average of each factor x factor block of pixels (a box filter: anti-aliased).

  Even factors are taken in halvings (2x2 means of 2x2 means), so an image that is constant on
  its blocks (e.g. a nearest-neighbour upsampling) gives back its block values exactly.

  Args:
    x: [B, H, W, C] float images (in [-1, 1]); H and W divisible by `factor`.
    factor: the integer downsampling factor, >= 1.

  Returns:
    [B, H / factor, W / factor, C] float32.
  """
  batch, height, width, channels = x.shape
  if factor < 1 or height % factor or width % factor:
    raise ValueError(f"downsampling by {factor} needs sides divisible by it, got {x.shape}")
  x = jnp.asarray(x, jnp.float32)
  while factor % 2 == 0:
    # (a + b) + (c + d) of equal values is exact, and so is the division by 4.
    x = ((x[:, 0::2, 0::2] + x[:, 0::2, 1::2]) + (x[:, 1::2, 0::2] + x[:, 1::2, 1::2])) * 0.25
    factor //= 2
  if factor > 1:
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
  return x


def alpha_sigma(level: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(α_s, σ_s) = (cos(π s / 2), sin(π s / 2)) of augmentation levels s in [0, 1]; α² + σ² = 1.

  Args:
    level: [B] float levels s.

  Returns:
    (α [B], σ [B]) float32; exactly (1, 0) at s = 0.
  """
  angle = jnp.asarray(level, jnp.float32) * (math.pi / 2)
  return jnp.cos(angle), jnp.sin(angle)


def noise_augment(low_res: jax.Array, level: jax.Array, noise: jax.Array) -> jax.Array:
  """z_s = α_s z + σ_s ε: the low-resolution image corrupted to level s.

  Args:
    low_res: z, [B, h, w, C] float32 in [-1, 1].
    level: s, [B] float32 in [0, 1].
    noise: ε, the shape of `low_res`.

  Returns:
    z_s, the shape of `low_res`; z itself where s = 0.
  """
  alpha, sigma = alpha_sigma(level)
  expand = lambda a: a.reshape(-1, *([1] * (low_res.ndim - 1)))
  return expand(alpha) * low_res + expand(sigma) * noise


def augment(
  low_res: jax.Array,
  keys: jax.Array,
  *,
  level: float | jax.Array | None = None,
  max_level: float = 1.0,
) -> dict[str, jax.Array]:
  """The condition entries of a super-resolution model: z noised to a level per example.

  Example j's level and noise come from fold_in(keys[j], a stream of their own) only, so they do
  not depend on the batch the example is in.

  Args:
    low_res: z, [B, h, w, C] float32 in [-1, 1].
    keys: [B] per-example keys.
    level: the level s in [0, 1] of every example, or [B] levels (sampling); None draws
      s ~ U[0, max_level] per example (training).
    max_level: the largest level drawn in training.

  Returns:
    {"low_res": z_s [B, h, w, C] float32, "aug_level": s [B] float32}.
  """
  aug_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, _AUG_STREAM)))(keys)
  noise = jax.vmap(lambda k: jax.random.normal(k, low_res.shape[1:], jnp.float32))(aug_keys[:, 1])
  if level is None:
    levels = max_level * jax.vmap(jax.random.uniform)(aug_keys[:, 0])
  else:
    levels = jnp.broadcast_to(jnp.asarray(level, jnp.float32), low_res.shape[:1])
  return {"low_res": noise_augment(low_res, levels, noise), "aug_level": levels}
