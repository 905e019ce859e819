"""GroupNorm, optionally followed by swish, as one operation with a hand-written gradient.

Every ResBlock of the U-Net applies GroupNorm -> swish twice; on a GPU the memory-bound passes
over the activations around the convolutions take more time than the convolutions themselves.
This version makes as few passes as the arithmetic allows:

- forward: per-(example, channel) sums of x and x^2 (one read of x; a reduction over the spatial
  axes that keeps the channel axis minor), folded into per-group statistics on [B, C]; then
  y = act(x * a + b) with a per-(example, channel) affine (one read, one write);
- backward: the gradient through the activation and the two per-(example, channel) sums it needs,
  sum dz and sum dz * x (one read of x and dy), then dx = dz * a' + x * b' + c' (one more read of
  both and one write; on GPUs and TPUs it recomputes dz rather than keep it in float32, see
  `recompute_dz`). Only x and [B, C]-sized statistics are kept between the forward and the
  backward pass, where autodiff of the plain formula keeps x - mean in float32 (XLA's temporary
  memory of the CIFAR-10 train step drops by 9% on a CPU).

The statistics are float32 whatever the activations' dtype, as in flax's GroupNorm, whose
parameters ("scale", "bias") and function this computes up to float rounding; the variance is
E[x^2] - E[x]^2, clipped at 0, also as flax's default does.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ACTIVATIONS = ("none", "swish")


def _compute_dtype(x: jax.Array):
  """float32, or float64 for float64 inputs."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _spatial_sum(x: jax.Array) -> jax.Array:
  """[B, ..., C] -> [B, C]: the sum over the axes between the first and the last."""
  return jnp.sum(x, tuple(range(1, x.ndim - 1)))


def _stats(x: jax.Array, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """(mean, 1 / std) per example and group, [B, G] in the compute dtype, of x [B, ..., C]."""
  b, c = x.shape[0], x.shape[-1]
  xf = x.astype(_compute_dtype(x))
  count = math.prod(x.shape[1:-1]) * (c // num_groups)
  per_group = lambda s: s.reshape(b, num_groups, c // num_groups).sum(-1) / count
  mean = per_group(_spatial_sum(xf))
  var = jnp.maximum(per_group(_spatial_sum(jnp.square(xf))) - jnp.square(mean), 0.0)
  return mean, lax.rsqrt(var + epsilon)


def _per_channel(v: jax.Array, ndim: int, channels: int) -> jax.Array:
  """[B, G] -> [B, 1, ..., 1, C], each group's value repeated over its channels."""
  v = jnp.repeat(v, channels // v.shape[-1], axis=-1)
  return v.reshape(v.shape[0], *(1,) * (ndim - 2), channels)


def _affine(x, scale, bias, mean, rstd):
  """(a, b) of the normalised x = x * a + b, [B, 1, ..., 1, C] each."""
  c = x.shape[-1]
  a = _per_channel(rstd, x.ndim, c) * scale
  return a, bias - _per_channel(mean, x.ndim, c) * a


def _activate(z: jax.Array, act: str) -> jax.Array:
  return z * jax.nn.sigmoid(z) if act == "swish" else z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def group_norm(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  num_groups: int,
  epsilon: float,
  act: str = "none",
  dtype=None,
) -> jax.Array:
  """act(GroupNorm(x) * scale + bias) over the last axis.

  Args:
    x: [B, ..., C] activations; C divisible by `num_groups`.
    scale, bias: [C] float32.
    num_groups: groups of C // num_groups consecutive channels.
    epsilon: added to the variance.
    act: "none" or "swish".
    dtype: dtype of the output (None: x's).

  Returns:
    [B, ..., C] in `dtype`. Differentiable in reverse mode with respect to x, scale and bias.
  """
  return _forward(x, scale, bias, num_groups, epsilon, act, dtype)[0]


def _forward(x, scale, bias, num_groups, epsilon, act, dtype):
  mean, rstd = _stats(x, num_groups, epsilon)
  a, b = _affine(x, scale, bias, mean, rstd)
  y = _activate(x.astype(_compute_dtype(x)) * a + b, act).astype(dtype or x.dtype)
  return y, (x, scale, bias, mean, rstd)


def recompute_dz() -> bool:
  """Whether the backward pass recomputes dz for dx rather than keeping it from the sums' pass.

  Where memory bandwidth is the limit (GPUs, TPUs) recomputing is cheaper: XLA's program for an
  H100 moves 1.8 GB less per CIFAR-10 step. On a CPU the arithmetic (the sigmoid) is the limit:
  recomputing made the float32 step 6% slower on 2 cores (benchmarks/RESULTS.md). Decided when
  the step is traced.
  """
  return jax.default_backend() != "cpu"


def _grad_z(x, dy, scale, bias, mean, rstd, act):
  """(x, a, dz) in the compute dtype: x, the normalisation's per-channel factor, dL/d(x * a + b)."""
  xf = x.astype(_compute_dtype(x))
  a, shift = _affine(x, scale, bias, mean, rstd)
  dz = dy.astype(xf.dtype)
  if act == "swish":
    z = xf * a + shift
    s = jax.nn.sigmoid(z)
    dz = dz * (s * (1.0 + z * (1.0 - s)))
  return xf, a, dz


def _backward(num_groups, epsilon, act, dtype, residuals, dy):
  del epsilon, dtype
  x, scale, bias, mean, rstd = residuals
  b, c = x.shape[0], x.shape[-1]
  xf, a, dz = _grad_z(x, dy, scale, bias, mean, rstd, act)
  # Per (example, channel): sum dz and sum dz * x. The barrier keeps them as computed here: XLA
  # would otherwise fold the sums over the batch below (dbias, dscale) into reductions of their
  # own over the whole activation, for which it keeps dz, a float32 copy of it, in memory.
  sum_dz, sum_dz_x = lax.optimization_barrier((_spatial_sum(dz), _spatial_sum(dz * xf)))
  # sum dz * x_hat, with x_hat = (x - mean) * rstd.
  sum_dz_xhat = _per_channel(rstd, 2, c) * (sum_dz_x - _per_channel(mean, 2, c) * sum_dz)
  dbias = jnp.sum(sum_dz, 0)
  dscale = jnp.sum(sum_dz_xhat, 0)
  # dx = rstd * (g - mean_G(g) - x_hat * mean_G(g * x_hat)) with g = dz * scale.
  count = math.prod(x.shape[1:-1]) * (c // num_groups)
  per_group = lambda s: (s * scale).reshape(b, num_groups, c // num_groups).sum(-1) / count
  m1, m2 = per_group(sum_dz), per_group(sum_dz_xhat)
  k_x = _per_channel(-jnp.square(rstd) * m2, x.ndim, c)
  k_0 = _per_channel(rstd * (rstd * mean * m2 - m1), x.ndim, c)
  if recompute_dz():
    # The second pass recomputes dz from x and dy (the barrier stops XLA from sharing the first
    # pass's): reading both again costs less than writing and reading dz in float32.
    x, dy, k_x, k_0 = lax.optimization_barrier((x, dy, k_x, k_0))
    xf, a, dz = _grad_z(x, dy, scale, bias, mean, rstd, act)
  dx = dz * a + xf * k_x + k_0
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
  """GroupNorm over the last axis, then `act`: flax's nn.GroupNorm parameters ("scale", "bias").

  Attributes:
    num_groups: groups; must divide the channel count of the input.
    epsilon: added to the variance.
    act: "none" or "swish", applied to the normalised output in the same pass.
    dtype: dtype of the output (None: the input's).
    param_dtype: dtype of scale and bias.
  """

  num_groups: int
  epsilon: float = 1e-6
  act: str = "none"
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {c} channels")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"GroupNorm: unknown act {self.act!r}; valid: {', '.join(ACTIVATIONS)}")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.act, self.dtype)
