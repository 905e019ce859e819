"""3x3 convolutions by Winograd's minimal filtering (Lavin & Gray 2016), for XLA:CPU.

F(m x m, 3 x 3) computes an m x m block of outputs from an (m + 2) x (m + 2) tile of the input
with (m + 2)**2 multiplications per channel pair instead of 9 m**2:

  Y = A^T [ (G g G^T) * (B^T d B) ] A

for a 3x3 kernel g and an input tile d. Summed over input channels, the elementwise product
becomes one matrix product per tile position: [tiles, C_in] x [C_in, C_out], (m + 2)**2 of them.
F(2x2, 3x3) does 2.25x fewer multiplications than the direct convolution, F(4x4, 3x3) 4x; the
transforms are additions and scalings of the activations, which XLA fuses. The backward pass
(`conv3x3`'s custom VJP) is Winograd again: the input gradient is the same algorithm applied to
the output gradient with the flipped kernel, and the weight gradient is (m + 2)**2 matrix
products that contract over the tiles. Only reverse-mode differentiation is defined.

On a CPU, XLA's own convolution runs at or below its matmul rate, so Winograd's fewer FLOPs give
a faster train step where the matrix products are large (`benchmarks/conv_grad.py`). In float32
the result differs from the direct convolution by float rounding only: about 1e-6 (F(2x2)) and
1e-5 (F(4x4)) of the output's largest magnitude. In bfloat16 the transforms lose too many bits,
so other dtypes use XLA's convolution.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# (B^T, G, A^T) of F(m x m, 3 x 3), keyed by m: input, kernel and output transforms.
_TRANSFORMS = {
  2: (
    np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
    np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
    np.array([[1, 1, 1, 0], [0, 1, -1, -1]]),
  ),
  4: (
    np.array(
      [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
      ]
    ),
    np.array(
      [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
      ]
    ),
    np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
  ),
}

# With model.conv="winograd_large" (what "auto" becomes on a CPU), the multiply-adds per image
# (H W C_in C_out) from which Winograd is faster than XLA's convolution, on maps of at least
# 16 x 16 (F(4x4)) and on 8 x 8 maps (F(2x2), whose transforms cost relatively more); smaller
# maps keep XLA's. Measured on a 2-core x86 CPU with the forward pass and both gradients
# together (`benchmarks/conv_grad.py --winograd`).
F4_MIN_WORK = 2**22
F2_MIN_WORK = 2**23

_NHWC = ("NHWC", "HWIO", "NHWC")


def tile_size(
  height: int, width: int, in_channels: int, out_channels: int, dtype, conv: str
) -> int:
  """The m of F(m x m, 3 x 3) for a "SAME" 3x3 convolution with stride 1, or 0 for XLA's.

  Args:
    height, width: feature-map size.
    in_channels, out_channels: channels of the input and output.
    dtype: compute dtype; only float32 uses Winograd (see the module docstring).
    conv: "xla" (never Winograd), "winograd" (always, in float32) or "winograd_large" (where
      it is faster on a CPU: maps of at least 16 x 16 with `F4_MIN_WORK` multiply-adds per
      image or more, or 8 x 8 maps with `F2_MIN_WORK`). An unresolved "auto" is "xla".

  Returns:
    4 (maps of at least 16 x 16), 2 (smaller ones) or 0.
  """
  if conv in ("xla", "auto") or jnp.dtype(dtype) != jnp.float32:
    return 0
  m = 4 if min(height, width) >= 16 else 2
  if conv == "winograd_large":
    work = height * width * in_channels * out_channels
    least = {4: F4_MIN_WORK, 2: F2_MIN_WORK}[m]
    if min(height, width) < 8 or work < least:
      return 0
  return m


def _combine(rows, matrix) -> list[jax.Array]:
  """[sum_u matrix[k, u] * rows[u] for each k], skipping zero terms and multiplications by 1."""
  out = []
  for coefficients in matrix:
    total = None
    for c, row in zip(coefficients.tolist(), rows, strict=True):
      if c == 0:
        continue
      term = row if c == 1 else -row if c == -1 else row * c
      total = term if total is None else total + term
    out.append(total)
  return out


def _tile_entries(x: jax.Array, axis: int, m: int) -> list[jax.Array]:
  """Entry u = 0 .. m + 1 of every (m + 2)-long tile at stride m along `axis`.

  x has (t + 1) m entries along `axis`; each returned array has t there, the tiles. Tile i
  spans block i of m entries and the first two of block i + 1, so every entry is a contiguous
  slice of x viewed as blocks.
  """
  t = x.shape[axis] // m - 1
  blocks = x.reshape(x.shape[:axis] + (t + 1, m) + x.shape[axis + 1 :])
  entry = lambda first, u: lax.index_in_dim(
    lax.slice_in_dim(blocks, first, first + t, axis=axis), u, axis + 1, keepdims=False
  )
  return [entry(0, u) for u in range(m)] + [entry(1, u) for u in range(2)]


def _input_transform(x: jax.Array, m: int) -> jax.Array:
  """B^T d B of every tile d of the zero-padded x [n, h, w, c]: [(m + 2)**2, n th tw, c]."""
  b_t = _TRANSFORMS[m][0]
  n, h, w, c = x.shape
  th, tw = math.ceil(h / m), math.ceil(w / m)
  # One more block of m than the tiles need: tile i spans blocks i and i + 1.
  xp = jnp.pad(x, ((0, 0), (1, (th + 1) * m - h - 1), (1, (tw + 1) * m - w - 1), (0, 0)))
  rows = _combine(_tile_entries(xp, 1, m), b_t)  # a x [n, th, W', c]
  v = [jnp.stack(_combine(_tile_entries(r, 2, m), b_t)) for r in rows]  # a x [a, n, th, tw, c]
  return jnp.stack(v).reshape((m + 2) ** 2, n * th * tw, c)


def _blocks(y: jax.Array, m: int) -> list[list[jax.Array]]:
  """The m x m blocks of y [n, h, w, c] (zero-padded to multiples of m) as blocks[i][j], the
  entry (i, j) of every block: [n, th, tw, c]."""
  n, h, w, c = y.shape
  th, tw = math.ceil(h / m), math.ceil(w / m)
  y = jnp.pad(y, ((0, 0), (0, th * m - h), (0, tw * m - w), (0, 0))).reshape(n, th, m, tw, m, c)
  return [[y[:, :, i, :, j] for j in range(m)] for i in range(m)]


def _output_transform(prod: jax.Array, m: int, shape) -> jax.Array:
  """A^T M A of every tile's product M [(m + 2)**2, n th tw, c], as an image [n, h, w, c]."""
  a_t = _TRANSFORMS[m][2]
  n, h, w = shape
  th, tw = math.ceil(h / m), math.ceil(w / m)
  prod = prod.reshape(m + 2, m + 2, n, th, tw, -1)
  cols = _combine(list(prod), a_t)  # m x [a, n, th, tw, c]
  y = jnp.stack([jnp.stack(_combine(list(c), a_t)) for c in cols])  # [m, m, n, th, tw, c]
  return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, -1)[:, :h, :w]


def _output_transform_transpose(dy: jax.Array, m: int) -> jax.Array:
  """The transpose of `_output_transform`: A dY A^T of every m x m block of dy [n, h, w, c]."""
  a = _TRANSFORMS[m][2].T  # [m + 2, m]
  blocks = _blocks(dy, m)
  cols = [_combine([blocks[i][j] for i in range(m)], a) for j in range(m)]  # m x a x [n, th, tw, c]
  dm = jnp.stack([jnp.stack(_combine([c[k] for c in cols], a)) for k in range(m + 2)])
  return dm.reshape((m + 2) ** 2, -1, dy.shape[-1])


def _kernel_matrix(kernel: jax.Array, m: int) -> jax.Array:
  """G of F(m x m, 3 x 3) in the kernel's dtype, at least float32 (the kernel transforms')."""
  return jnp.asarray(_TRANSFORMS[m][1], jnp.promote_types(kernel.dtype, jnp.float32))


def _kernel_transform(kernel: jax.Array, m: int) -> jax.Array:
  """G g G^T of the kernel [3, 3, c_in, c_out], in float32 or wider: [(m + 2)**2, c_in, c_out]."""
  g = _kernel_matrix(kernel, m)
  u = jnp.einsum("ki,ijco,lj->klco", g, kernel.astype(g.dtype), g)
  return u.reshape((m + 2) ** 2, *kernel.shape[2:])


def conv3x3(x: jax.Array, kernel: jax.Array, m: int, precision=None) -> jax.Array:
  """A "SAME" 3x3 convolution with stride 1 by Winograd's F(m x m, 3 x 3).

  Differentiable in reverse mode (`jax.grad`, `jax.vjp`): the input gradient is the same
  algorithm applied to the output gradient with the flipped kernel, and the weight gradient
  contracts the saved transformed input with the transformed output gradient, tile position by
  tile position. (Autodiff of the transforms would sum (m + 2)**2 padded copies of the input.)

  Args:
    x: [B, H, W, C_in] input (any H, W >= 1; the tiles are padded to a multiple of m).
    kernel: [3, 3, C_in, C_out] in `lax.conv_general_dilated`'s HWIO layout.
    m: output tile size, 2 or 4.
    precision: `lax.Precision` of the matrix products (None: the default).

  Returns:
    [B, H, W, C_out] in x's dtype; equal to the direct convolution up to float rounding.
  """
  return _conv3x3(x, kernel, m, precision)


def _conv3x3_forward(x, kernel, m, precision):
  v = _input_transform(x, m)
  u = _kernel_transform(kernel, m).astype(x.dtype)
  prod = jnp.einsum("pnc,pco->pno", v, u, precision=precision)
  return _output_transform(prod, m, x.shape[:3]), (v, kernel)


def _conv3x3_backward(m, precision, residuals, dy):
  v, kernel = residuals
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  dx = _conv3x3(dy, flipped, m, precision)
  du = jnp.einsum("pnc,pno->pco", v, _output_transform_transpose(dy, m), precision=precision)
  g = _kernel_matrix(kernel, m)
  du = du.astype(g.dtype).reshape(m + 2, m + 2, *du.shape[1:])
  dk = jnp.einsum("ki,klco,lj->ijco", g, du, g)  # The transpose of `_kernel_transform`.
  return dx, dk.astype(kernel.dtype)


_conv3x3 = jax.custom_vjp(
  lambda x, kernel, m, precision: _conv3x3_forward(x, kernel, m, precision)[0],
  nondiff_argnums=(2, 3),
)
_conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  batch_group_count=1,
  precision=None,
  preferred_element_type=None,
  *,
  conv: str = "winograd_large",
):
  """`lax.conv_general_dilated`, by `conv3x3` where `tile_size(..., conv)` picks Winograd.

  A drop-in for flax's `nn.Conv(conv_general_dilated=...)` (bind `conv` with
  `functools.partial`): convolutions other than a float32 NHWC "SAME" 3x3 one with stride 1,
  no dilation and no groups go to XLA unchanged.
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
  kwargs = dict(
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  plain = (
    lhs.ndim == 4
    and tuple(rhs.shape[:2]) == (3, 3)
    and tuple(window_strides) == (1, 1)
    and (padding == "SAME" or tuple(map(tuple, padding)) == ((1, 1), (1, 1)))
    and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    and feature_group_count == batch_group_count == 1
    and preferred_element_type is None
    and lhs.dtype == rhs.dtype
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  m = tile_size(*lhs.shape[1:], rhs.shape[3], lhs.dtype, conv) if plain else 0
  if not m:
    return lax.conv_general_dilated(*args, **kwargs)
  return conv3x3(lhs, rhs, m, precision)
