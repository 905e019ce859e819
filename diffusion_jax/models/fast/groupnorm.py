"""GroupNorm, optionally followed by swish, as one operation with a hand-written gradient.

Every ResBlock of the U-Net applies GroupNorm -> swish twice; on a GPU the memory-bound passes
over the activations around the convolutions take more time than the convolutions themselves.
This version makes as few passes as the arithmetic allows:

- forward: per-(example, channel) sums of x and x^2 (one read of x; a reduction over the spatial
  axes that keeps the channel axis minor), folded into per-group statistics on [B, C]; then
  y = act(x * a + b) with a per-(example, channel) affine (one read, one write);
- backward: the gradient through the activation and the two per-(example, channel) sums it needs,
  sum dz and sum dz * x (one read of x and dy), then dx = dz * a' + x * b' + c' (one more read of
  both and one write; with `recompute_dz` it recomputes dz rather than keep it in float32,
  which moves fewer bytes where memory bandwidth is the limit). Only x and [B, C]-sized
  statistics are kept between the forward and the backward pass, where autodiff of the plain
  formula (`layers.ReferenceGroupNorm`) keeps x - mean in float32.

The input may also come in parts along the channel axis (the U-Net's up path hands over h and a
skip connection): the sums are taken per part and the output written from the parts, so their
concatenation is never written, and the gradient comes back in the same parts.

The statistics are float32 whatever the activations' dtype, as in flax's GroupNorm, whose
parameters ("scale", "bias") and function this computes up to float rounding; the variance is
E[x^2] - E[x]^2, clipped at 0, also as flax's default does.
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ACTIVATIONS = ("none", "swish")


def _compute_dtype(x: jax.Array):
  """float32, or float64 for float64 inputs."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _spatial_sum(x: jax.Array) -> jax.Array:
  """[B, ..., C] -> [B, C]: the sum over the axes between the first and the last."""
  return jnp.sum(x, tuple(range(1, x.ndim - 1)))


def _concat(arrays: list[jax.Array]) -> jax.Array:
  """Concatenation over the last axis (a single array is returned as it is)."""
  return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=-1)


def _split(v: jax.Array, parts) -> list[jax.Array]:
  """v [..., C] cut along the last axis into the channel ranges of `parts`."""
  ends = np.cumsum([p.shape[-1] for p in parts])
  return [v[..., end - p.shape[-1] : end] for p, end in zip(parts, ends, strict=True)]


# Groups up to this many channels wide are summed by additions (`_group_sum`).
_GROUP_SUM_ADDS = 32


def _group_sum(s: jax.Array, num_groups: int) -> jax.Array:
  """[B, C] -> [B, G]: the sum over each group's channels.

  For groups of at most `_GROUP_SUM_ADDS` channels, as additions of the group's channels one by
  one: elementwise work, which XLA fuses into the kernel that uses the sums. A reduction would be
  a kernel of its own for a few kilobytes; on a GPU, two to four such kernels per GroupNorm were
  a sixth of the CIFAR-10 train step's kernels.
  """
  b, c = s.shape
  s = s.reshape(b, num_groups, c // num_groups)
  if c // num_groups > _GROUP_SUM_ADDS:
    return s.sum(-1)
  return functools.reduce(lambda total, i: total + s[..., i], range(1, s.shape[-1]), s[..., 0])


def _stats(parts, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """(mean, 1 / std) per example and group, [B, G] in the compute dtype, of x [B, ..., C]."""
  x = parts[0]
  c = sum(p.shape[-1] for p in parts)
  xf = [p.astype(_compute_dtype(p)) for p in parts]
  count = math.prod(x.shape[1:-1]) * (c // num_groups)
  per_group = lambda s: _group_sum(s, num_groups) / count
  mean = per_group(_concat([_spatial_sum(p) for p in xf]))
  squares = per_group(_concat([_spatial_sum(jnp.square(p)) for p in xf]))
  var = jnp.maximum(squares - jnp.square(mean), 0.0)
  return mean, lax.rsqrt(var + epsilon)


def _per_channel(v: jax.Array, ndim: int, channels: int) -> jax.Array:
  """[B, G] -> [B, 1, ..., 1, C], each group's value repeated over its channels."""
  v = jnp.repeat(v, channels // v.shape[-1], axis=-1)
  return v.reshape(v.shape[0], *(1,) * (ndim - 2), channels)


def _affine(ndim, scale, bias, mean, rstd):
  """(a, b) of the normalised x = x * a + b, [B, 1, ..., 1, C] each."""
  c = scale.shape[-1]
  a = _per_channel(rstd, ndim, c) * scale
  return a, bias - _per_channel(mean, ndim, c) * a


def _activate(z: jax.Array, act: str) -> jax.Array:
  return z * jax.nn.sigmoid(z) if act == "swish" else z


def group_norm(
  x: jax.Array | Sequence[jax.Array],
  scale: jax.Array,
  bias: jax.Array,
  num_groups: int,
  epsilon: float,
  act: str = "none",
  dtype=None,
  recompute_dz: bool = False,
) -> jax.Array:
  """act(GroupNorm(x) * scale + bias) over the last axis.

  Args:
    x: [B, ..., C] activations; C divisible by `num_groups`. Or a sequence of arrays [B, ..., C_i]
      whose concatenation over the last axis is x: the output is the same, and the concatenation
      is never written (the up path's skip connections), its gradient comes back in parts.
    scale, bias: [C] float32.
    num_groups: groups of C // num_groups consecutive channels.
    epsilon: added to the variance.
    act: "none" or "swish".
    dtype: dtype of the output (None: x's).
    recompute_dz: the backward pass recomputes dz from x and dy for dx, rather than keep it from
      the pass that sums it (fewer bytes moved, more arithmetic: pays where bandwidth is the
      limit, on GPUs and TPUs).

  Returns:
    [B, ..., C] in `dtype`. Differentiable in reverse mode with respect to x, scale and bias.
  """
  parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  return _group_norm(parts, scale, bias, num_groups, epsilon, act, dtype, recompute_dz)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _group_norm(parts, scale, bias, num_groups, epsilon, act, dtype, recompute_dz):
  return _forward(parts, scale, bias, num_groups, epsilon, act, dtype, recompute_dz)[0]


def _forward(parts, scale, bias, num_groups, epsilon, act, dtype, recompute_dz):
  del recompute_dz
  mean, rstd = _stats(parts, num_groups, epsilon)
  a, b = _affine(parts[0].ndim, scale, bias, mean, rstd)
  y = _concat(
    [
      _activate(p.astype(_compute_dtype(p)) * a_p + b_p, act)
      for p, a_p, b_p in zip(parts, _split(a, parts), _split(b, parts), strict=True)
    ]
  )
  return y.astype(dtype or jnp.result_type(*parts)), (parts, scale, bias, mean, rstd)


def _grad_z(x, dy, a, shift, act):
  """(x, dz) in the compute dtype: x and dL/d(x * a + b), for the normalisation's a and b."""
  xf = x.astype(_compute_dtype(x))
  dz = dy.astype(xf.dtype)
  if act == "swish":
    z = xf * a + shift
    s = jax.nn.sigmoid(z)
    dz = dz * (s * (1.0 + z * (1.0 - s)))
  return xf, dz


def _backward(num_groups, epsilon, act, dtype, recompute_dz, residuals, dy):
  del epsilon, dtype
  parts, scale, bias, mean, rstd = residuals
  c, ndim = scale.shape[-1], parts[0].ndim
  a, shift = _affine(ndim, scale, bias, mean, rstd)
  a, shift = _split(a, parts), _split(shift, parts)
  grads = [_grad_z(*args, act) for args in zip(parts, _split(dy, parts), a, shift, strict=True)]
  # Per (example, channel): sum dz and sum dz * x. The barrier keeps them as computed here: XLA
  # would otherwise fold the sums over the batch below (dbias, dscale) into reductions of their
  # own over the whole activation, for which it keeps dz, a float32 copy of it, in memory.
  # (Each part's pair is kept, not their concatenations, or XLA writes out a part's dz.)
  sums = lax.optimization_barrier([(_spatial_sum(dz), _spatial_sum(dz * xf)) for xf, dz in grads])
  sum_dz, sum_dz_x = (_concat(list(s)) for s in zip(*sums, strict=True))
  # sum dz * x_hat, with x_hat = (x - mean) * rstd.
  sum_dz_xhat = _per_channel(rstd, 2, c) * (sum_dz_x - _per_channel(mean, 2, c) * sum_dz)
  # Both sums over the batch in one reduction (one kernel, not two).
  dbias, dscale = jnp.sum(jnp.stack([sum_dz, sum_dz_xhat]), 1)
  # dx = rstd * (g - mean_G(g) - x_hat * mean_G(g * x_hat)) with g = dz * scale.
  count = math.prod(parts[0].shape[1:-1]) * (c // num_groups)
  per_group = lambda s: _group_sum(s * scale, num_groups) / count
  m1, m2 = per_group(sum_dz), per_group(sum_dz_xhat)
  k_x = _per_channel(-jnp.square(rstd) * m2, ndim, c)
  k_0 = _per_channel(rstd * (rstd * mean * m2 - m1), ndim, c)
  if recompute_dz:
    # The second pass recomputes dz from x and dy (the barrier stops XLA from sharing the first
    # pass's): reading both again costs less than writing and reading dz in float32.
    # dy passes whole: a barrier on its slices would write them out.
    parts, dy, k_x, k_0 = lax.optimization_barrier((parts, dy, k_x, k_0))
    grads = [_grad_z(*args, act) for args in zip(parts, _split(dy, parts), a, shift, strict=True)]
  dx = tuple(
    (dz * a_p + xf * kx_p + k0_p).astype(p.dtype)
    for p, (xf, dz), a_p, kx_p, k0_p in zip(
      parts, grads, a, _split(k_x, parts), _split(k_0, parts), strict=True
    )
  )
  return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_group_norm.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
  """GroupNorm over the last axis, then `act`: flax's nn.GroupNorm parameters ("scale", "bias").

  Attributes:
    num_groups: groups; must divide the channel count of the input.
    epsilon: added to the variance.
    act: "none" or "swish", applied to the normalised output in the same pass.
    dtype: dtype of the output (None: the input's).
    param_dtype: dtype of scale and bias.
    recompute_dz: see `group_norm`.
  """

  num_groups: int
  epsilon: float = 1e-6
  act: str = "none"
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  recompute_dz: bool = False

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """x: [B, ..., C], or arrays [B, ..., C_i] normalised as their concatenation (`group_norm`)."""
    c = sum(p.shape[-1] for p in x) if isinstance(x, (tuple, list)) else x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {c} channels")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"GroupNorm: unknown act {self.act!r}; valid: {', '.join(ACTIVATIONS)}")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return group_norm(
      x, scale, bias, self.num_groups, self.epsilon, self.act, self.dtype, self.recompute_dz
    )
