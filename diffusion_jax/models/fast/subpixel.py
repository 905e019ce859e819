"""Upsampling convolutions computed at the low resolution (the reference: `layers.Upsample` with
subpixel=False, which resizes first)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.initializers import default_init, zeros_init


def subpixel_kernels(kernel: jax.Array) -> list[list[jax.Array]]:
  """The 2x2 kernels that apply a 3x3 `kernel` to a nearest-neighbour x2 upsampled input.

  Output row 2i of the upsampled convolution reads upsampled rows 2i-1, 2i, 2i+1, which are input
  rows i-1, i, i: kernel rows (0, 1 + 2) on input rows (i-1, i). Output row 2i+1 reads input rows
  i, i, i+1: kernel rows (0 + 1, 2) on (i, i+1). Columns likewise.

  Args:
    kernel: [3, 3, C_in, C_out].

  Returns:
    kernels[a][b]: [2, 2, C_in, C_out], the kernel of output phase (row 2i+a, column 2j+b).
  """
  k = kernel
  rows = [jnp.stack([k[0], k[1] + k[2]]), jnp.stack([k[0] + k[1], k[2]])]
  return [
    [jnp.stack([r[:, 0], r[:, 1] + r[:, 2]], 1), jnp.stack([r[:, 0] + r[:, 1], r[:, 2]], 1)]
    for r in rows
  ]


class SubpixelConv(nn.Module):
  """A 3x3 "SAME" conv of the nearest-neighbour x2 upsampled input, computed without upsampling.

  Each of the four output phases (even/odd rows and columns) is a 2x2 convolution of the input
  with summed taps of the 3x3 kernel (`subpixel_kernels`): 16 instead of 36 multiply-adds per
  input pixel and channel pair, on feature maps a quarter of the size. The parameters (names,
  shapes, initialisation) are `conv3x3`'s, so checkpoints work with either form; the outputs
  differ only by float rounding.

  Attributes:
    features: output channels.
    dtype: compute dtype.
  """

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, features]."""
    b, h, w, channels = x.shape
    kernel = self.param("kernel", default_init, (3, 3, channels, self.features), jnp.float32)
    bias = self.param("bias", zeros_init, (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    phases = [
      [
        jax.lax.conv_general_dilated(
          x,
          k.astype(self.dtype),
          (1, 1),
          ((1 - a, a), (1 - col, col)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        for col, k in enumerate(row)
      ]
      for a, row in enumerate(subpixel_kernels(kernel))
    ]
    # [B, H, 2 (row phase), W, 2 (column phase), C] interleaves the phases.
    y = jnp.stack([jnp.stack(row, 3) for row in phases], 2).reshape(b, 2 * h, 2 * w, -1)
    return y + bias.astype(self.dtype)
