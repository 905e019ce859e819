"""Residual and skip-connection paths that move fewer bytes on accelerators.

- `SplitDense`: nn.Dense on a concatenation of parts without writing it (the up path's skips,
  `FastPaths.skips_in_parts`); the reference concatenates, then applies nn.Dense.
- `residual(x, h, hold=True)`: x + h with an optimization barrier on h's gradient
  (`FastPaths.hold_branch_gradient`); the reference is x + h.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.initializers import default_init, zeros_init


class SplitDense(nn.Module):
  """nn.Dense (its parameters and initialisation) applied to the concatenation of `parts` over
  the last axis, without writing it: the sum of each part's product with its rows of the kernel.

  Attributes:
    features: output width.
    dtype: compute dtype.
  """

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    widths = [p.shape[-1] for p in parts]
    kernel = self.param("kernel", default_init, (sum(widths), self.features), jnp.float32)
    bias = self.param("bias", zeros_init, (self.features,), jnp.float32)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    y = bias
    for part, rows in zip(parts, jnp.split(kernel, np.cumsum(widths)[:-1]), strict=True):
      y = y + jnp.dot(part.astype(self.dtype), rows)
    return y


@jax.custom_vjp
def _branch(h: jax.Array) -> jax.Array:
  return h


def _branch_fwd(h):
  return h, None


def _branch_bwd(_, dy):
  return (jax.lax.optimization_barrier(dy),)


_branch.defvjp(_branch_fwd, _branch_bwd)


def residual(x: jax.Array, h: jax.Array, hold: bool = False) -> jax.Array:
  """x + h, the output of a residual block; with `hold`, h's gradient is held apart from x's.

  The same gradient flows to both terms. XLA fuses the bias gradient of the branch's last layer
  into the kernel that carries the gradient on down the skip path, which it runs as a slow
  one-stage reduction at small maps on GPUs; an optimization barrier on the branch's gradient
  (the same buffer, no copy) keeps that sum a reduction of its own.
  """
  return x + (_branch(h) if hold else h)
