"""Building blocks of the DDPM U-Net: timestep embedding, ResBlock, self- and cross-attention,
resampling.

The layers follow the original DDPM design (Ho et al. 2020): GroupNorm + swish, weights drawn by
variance scaling (fan_avg, uniform), zero biases, and the last layer of every residual branch
initialised to zero, so each ResBlock and attention block starts out as the identity.

Layers take activations `[B, H, W, C]` in the compute dtype `dtype`; parameters are always float32.
"""

import functools
import math
import zlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.groupnorm import GroupNorm
from diffusion_jax.models.winograd import conv_general_dilated as winograd_conv

# The original code initialises every kernel with variance scaling of scale 1 over the average of
# fan-in and fan-out (uniform), which differs from Flax's default lecun_normal.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros

# GroupNorm epsilon of the original (tf.contrib group_norm).
_GROUPNORM_EPS = 1e-6


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and DDPM.

  Component i < dim // 2 is sin(t * f_i) and component dim // 2 + i is cos(t * f_i), with
  frequencies f_i = 10000 ** (-i / (dim // 2 - 1)) from 1 down to 1 / 10000. An odd `dim` gets a
  trailing zero column.

  Args:
    t: [B] int or float timesteps, typically in [0, num_timesteps).
    dim: embedding width, >= 2.

  Returns:
    [B, dim] float32 embedding with entries in [-1, 1].
  """
  half = dim // 2
  # max(.., 1) keeps dim in {2, 3} defined (a single frequency of 1).
  log_step = math.log(10_000) / max(half - 1, 1)
  freqs = jnp.exp(-log_step * jnp.arange(half, dtype=jnp.float32))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """Folds each p x p patch of pixels into the channels.

  Args:
    x: [B, H, W, C] with H and W divisible by p.
    p: patch size.

  Returns:
    [B, H/p, W/p, p*p*C]; out[b, i, j] holds x[b, p*i : p*i+p, p*j : p*j+p] in row-major order
    (patch row, patch column, channel).
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of `space_to_depth`: [B, H, W, p*p*C] -> [B, H*p, W*p, C]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


def group_norm(num_groups: int, dtype, name: str, act: str = "none") -> GroupNorm:
  """GroupNorm over the last axis with the original's epsilon; float32 scale and bias.

  Args:
    num_groups: groups; must divide the channel count of the input.
    dtype: compute dtype of the output.
    name: submodule name.
    act: "swish" to apply swish in the same pass (the usual GroupNorm -> swish), or "none".

  Returns:
    The (unbound) GroupNorm module (flax's nn.GroupNorm parameters, one fused operation with a
    hand-written gradient: `groupnorm.py`); [B, H, W, C] -> [B, H, W, C].
  """
  # Group statistics are float32 even for a bfloat16 compute dtype.
  return GroupNorm(
    num_groups=num_groups,
    epsilon=_GROUPNORM_EPS,
    act=act,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def conv3x3(
  features: int,
  dtype,
  name: str,
  *,
  strides: int = 1,
  zero: bool = False,
  conv: str = "xla",
) -> nn.Conv:
  """3x3 convolution with "SAME" padding, float32 parameters and the original's initialisation.

  Args:
    features: output channels.
    dtype: compute dtype.
    name: submodule name.
    strides: 1, or 2 to halve the spatial size.
    zero: zero-initialise the kernel (the last layer of a residual branch).
    conv: "xla" (XLA's convolution), "winograd" or "auto" (Winograd's algorithm always, or
      where it is faster: `winograd.tile_size`); the same parameters and, up to float
      rounding, the same function.

  Returns:
    The (unbound) Conv module; [B, H, W, C] -> [B, H / strides, W / strides, features].
  """
  # "SAME" padding matches TensorFlow's, including the (0, 1) padding of a stride-2 conv on even
  # sizes that the original downsampling relies on.
  return nn.Conv(
    features,
    (3, 3),
    strides=(strides, strides),
    padding="SAME",
    kernel_init=zeros_init if zero else default_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    conv_general_dilated=None if conv == "xla" else functools.partial(winograd_conv, conv=conv),
    name=name,
  )


def dense(features: int, dtype, name: str, *, zero: bool = False) -> nn.Dense:
  """Dense layer over the last axis with float32 parameters and the original's initialisation.

  Args:
    features: output width.
    dtype: compute dtype.
    name: submodule name.
    zero: zero-initialise the kernel (the last layer of a residual branch).

  Returns:
    The (unbound) Dense module; [..., C] -> [..., features].
  """
  # On [B, H, W, C] a Dense over the last axis is the original's 1x1 "NIN" layer.
  return nn.Dense(
    features,
    kernel_init=zeros_init if zero else default_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


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


def residual(x: jax.Array, h: jax.Array) -> jax.Array:
  """x + h, the output of a residual block; off the CPU, h's gradient is held apart from x's.

  The same gradient flows to both terms. XLA fuses the bias gradient of the branch's last layer (a
  sum over every position) into the kernel that carries the gradient on down the skip path. At
  4x4 that kernel also computes a GroupNorm backward pass, and XLA runs it as a one-stage
  reduction, on few threads: in the CIFAR-10 step on an H100 each of these kernels took 140 us
  for 12 MB, and the bias sum alone takes 5 us. An optimization barrier on the branch's gradient
  (the same buffer, no copy) keeps the bias gradient a reduction of its own. On larger levels
  the fused kernel was fast and the barrier costs one more read of the gradient. On the 2-core
  CPU the float32 step with the barrier was 1.02x, within the noise
  (benchmarks/backend_choices.py), so the CPU keeps XLA's fusion. Decided when the step is
  traced.
  """
  return x + (_branch(h) if hold_branch_gradient() else h)


def hold_branch_gradient() -> bool:
  """Whether `residual` holds the gradient of the branch apart: off the CPU."""
  return jax.default_backend() != "cpu"


def skips_in_parts() -> bool:
  """Whether the U-Net's up path hands each ResBlock (h, skip) rather than their concatenation.

  Off the CPU. A ResBlock reads the parts as their concatenation without writing it
  (`ResBlock`). In the CIFAR-10 step compiled for an H100 (benchmarks/gpu_compile.py) that moves
  1.5 GB less and needs 15% less temporary memory. On the 2-core CPU, where the NIN projection's
  two matrix products cost more than one, the float32 step was 0.98x and 1.02x in two runs
  (within the noise) and the sampling call 0.98x, so the CPU keeps the concatenation. Decided
  when the network is traced.
  """
  return jax.default_backend() != "cpu"


def per_example_dropout(h: jax.Array, keys: jax.Array, rate: float, name: str) -> jax.Array:
  """Inverted dropout with example j's mask drawn from fold_in(keys[j], crc32(name)).

  Args:
    h: [B, ...] activations.
    keys: [B] keys.
    rate: dropout rate in (0, 1).
    name: the layer's name (its module path), which separates the masks of different layers.

  Returns:
    h with each entry zeroed with probability `rate` and the rest divided by 1 - rate.
  """
  stream = zlib.crc32(name.encode()) & 0x7FFFFFFF
  keep = jax.vmap(
    lambda k: jax.random.bernoulli(jax.random.fold_in(k, stream), 1.0 - rate, h.shape[1:])
  )(keys)
  return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)


class ResBlock(nn.Module):
  """Residual block with a timestep-embedding bias.

  GroupNorm -> swish -> conv3x3 -> + Dense(swish(temb)) -> GroupNorm -> swish -> dropout ->
  conv3x3 (zero-initialised), added to the input (through a 1x1 NIN projection when the channel
  count changes).

  Attributes:
    out_channels: output channels; None keeps the input's.
    dropout: dropout rate in [0, 1), applied only with train=True.
    num_groups: GroupNorm groups; must divide the input and output channels.
    dtype: compute dtype.
    conv: how both 3x3 convolutions are computed (`conv3x3`).
  """

  out_channels: int | None = None
  dropout: float = 0.0
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  conv: str = "xla"

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    temb: jax.Array,
    train: bool = False,
    dropout_keys: jax.Array | None = None,
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in] activations, or arrays [B, H, W, C_i] that stand for their concatenation
        over channels (the up path's skip connections), which is then never written: GroupNorm
        and the NIN projection read the parts (`group_norm`, `SplitDense`).
      temb: [B, D] timestep embedding (the output of the U-Net's embedding MLP, before swish).
      train: enables dropout; then `dropout_keys` or the "dropout" rng stream is required.
      dropout_keys: [B] keys, one per example: example j's mask is drawn from dropout_keys[j]
        and this block's name alone, so it does not depend on the other examples of the batch.
        None: flax's "dropout" rng stream draws one mask for the whole batch.

    Returns:
      [B, H, W, out_channels] activations in `dtype`.
    """
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    in_channels = sum(p.shape[-1] for p in parts)
    out_channels = in_channels if self.out_channels is None else self.out_channels
    h = group_norm(self.num_groups, self.dtype, "norm1", act="swish")(x)
    h = conv3x3(out_channels, self.dtype, "conv1", conv=self.conv)(h)
    # The embedding MLP ends in a linear layer; each block applies the swish itself.
    h = h + dense(out_channels, self.dtype, "temb_proj")(nn.swish(temb))[:, None, None, :]
    h = group_norm(self.num_groups, self.dtype, "norm2", act="swish")(h)
    if train and self.dropout > 0 and dropout_keys is not None:
      h = per_example_dropout(h, dropout_keys, self.dropout, "/".join(self.scope.path))
    else:
      h = nn.Dropout(rate=self.dropout, deterministic=not train)(h)
    h = conv3x3(out_channels, self.dtype, "conv2", zero=True, conv=self.conv)(h)
    if in_channels != out_channels:
      if len(parts) > 1:
        x = SplitDense(out_channels, self.dtype, name="nin_shortcut")(parts)
      else:
        x = dense(out_channels, self.dtype, "nin_shortcut")(x)
    elif len(parts) > 1:
      x = jnp.concatenate(parts, axis=-1)
    return residual(x, h)


ATTENTION_IMPLS = ("plain", "fused")
# How 3x3 convolutions are computed: `conv3x3`, `UNetConfig.conv`.
CONV_IMPLS = ("auto", "xla", "winograd")


def flash_attention() -> bool:
  """Whether fused `attention` asks for cuDNN's flash attention: on GPUs.

  `jax.nn.dot_product_attention` runs XLA's implementation unless told which to use. In the
  CIFAR-10 step on an H100 that made the 256-token attention layers XLA matrix products around a
  float32 softmax of [256, 256] weights per example. Where cuDNN is absent or does not take the
  inputs, `attention` falls back to XLA's. Decided when the network is traced.
  """
  return jax.default_backend() == "gpu"


def _cudnn_attention(q, k, v, mask) -> jax.Array | None:
  """cuDNN's flash attention of q, k, v ([B, T, N, D]), or None where cuDNN does not take them."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return None
  try:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  except (NotImplementedError, RuntimeError, ValueError):  # no cuDNN, or shapes it lacks
    return None


def attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, dtype, impl: str = "plain"
) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head.

  Args:
    q: [B, Q, N, D] queries of N heads; k, v: [B, K, N, D].
    mask: [B, K] bool, the keys each query may attend to (at least one per row), or None (all).
    dtype: dtype of the weights and the output; the logits and the softmax are float32, so that a
      bfloat16 compute dtype does not flatten the softmax.
    impl: "plain" spells the two products and the softmax out; "fused" calls
      `jax.nn.dot_product_attention`: cuDNN's flash attention where `flash_attention()` says so
      and cuDNN takes the inputs (16-bit, head dim at most 256 on Hopper and later, 128 before;
      it never writes the [Q, K] weights), XLA's implementation otherwise. All keep the logits
      in float32; they agree up to float rounding.

  Returns:
    [B, Q, N, D].
  """
  if impl == "fused":
    mask = None if mask is None else mask[:, None, None, :]
    out = _cudnn_attention(q, k, v, mask) if flash_attention() else None
    if out is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return out.astype(dtype)
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bnqk,bknd->bqnd", weights, v)


class AttnBlock(nn.Module):
  """Multi-head self-attention over all spatial positions, with a residual connection.

  GroupNorm -> q, k, v (1x1 projections) -> softmax(q k^T / sqrt(d_head)) v per head ->
  1x1 output projection (zero-initialised) -> added to the input. With one head this is the
  original DDPM attention block.

  Attributes:
    num_heads: attention heads; must divide the channel count.
    num_groups: GroupNorm groups; must divide the channel count.
    dtype: compute dtype; the softmax runs in float32.
    attention_impl: "plain" or "fused" (`attention`).
  """

  num_heads: int = 1
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "plain"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C] activations.

    Returns:
      [B, H, W, C] activations in `dtype`.
    """
    b, height, width, c = x.shape
    head_dim = c // self.num_heads
    h = group_norm(self.num_groups, self.dtype, "norm")(x)

    def project(name):
      y = dense(c, self.dtype, name)(h)
      return y.reshape(b, height * width, self.num_heads, head_dim)

    q, k, v = project("q"), project("k"), project("v")
    out = attention(q, k, v, None, self.dtype, self.attention_impl)
    out = out.reshape(b, height, width, c)
    return residual(x, dense(c, self.dtype, "proj_out", zero=True)(out))


class CrossAttnBlock(nn.Module):
  """Multi-head attention from every spatial position to a sequence of context embeddings.

  GroupNorm -> q (1x1 projection of the image features); k, v (projections of the context) ->
  softmax(q k^T / sqrt(d_head)) v per head over the valid context tokens only -> output projection
  (zero-initialised) -> added to the input. Padded tokens are masked out of the softmax, so their
  values change nothing.

  Attributes:
    num_heads: attention heads; must divide the channel count.
    num_groups: GroupNorm groups; must divide the channel count.
    dtype: compute dtype; the softmax runs in float32.
    attention_impl: "plain" or "fused" (`attention`).
  """

  num_heads: int = 1
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "plain"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C] activations.
      context: [B, L, D] context embeddings (e.g. a text encoder's token embeddings).
      mask: [B, L] bool, True for the tokens to attend to; every row needs at least one.

    Returns:
      [B, H, W, C] activations in `dtype`.
    """
    b, height, width, c = x.shape
    head_dim = c // self.num_heads
    h = group_norm(self.num_groups, self.dtype, "norm")(x)
    q = dense(c, self.dtype, "q")(h).reshape(b, height * width, self.num_heads, head_dim)
    context = context.astype(self.dtype)
    k = dense(c, self.dtype, "k")(context).reshape(b, -1, self.num_heads, head_dim)
    v = dense(c, self.dtype, "v")(context).reshape(b, -1, self.num_heads, head_dim)
    out = attention(q, k, v, mask, self.dtype, self.attention_impl).reshape(b, height, width, c)
    return residual(x, dense(c, self.dtype, "proj_out", zero=True)(out))


class Downsample(nn.Module):
  """Halves the spatial size: a stride-2 3x3 conv, or 2x2 average pooling.

  Attributes:
    with_conv: use the convolution (True, the original's setting) instead of pooling.
    dtype: compute dtype.
  """

  with_conv: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Downsamples.

    Args:
      x: [B, H, W, C] activations with even H and W.

    Returns:
      [B, H / 2, W / 2, C] activations.
    """
    if self.with_conv:
      return conv3x3(x.shape[-1], self.dtype, "conv", strides=2)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles the spatial size: nearest-neighbour x2, then a 3x3 conv.

  Attributes:
    with_conv: apply the convolution after the resize (True, the original's setting).
    dtype: compute dtype.
    subpixel: compute the convolution at the input's resolution (`SubpixelConv`): the same
      function and parameters in 4/9 of the FLOPs. False resizes first, as the original does.
  """

  with_conv: bool = True
  dtype: jnp.dtype = jnp.float32
  subpixel: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Upsamples.

    Args:
      x: [B, H, W, C] activations.

    Returns:
      [B, 2H, 2W, C] activations.
    """
    if self.with_conv and self.subpixel:
      return SubpixelConv(x.shape[-1], self.dtype, name="conv")(x)
    # Repeating rows and columns is exactly the original's nearest-neighbour x2 resize (with
    # align_corners, which for a factor of 2 rounds every output pixel to its source pixel).
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = conv3x3(x.shape[-1], self.dtype, "conv")(x)
    return x


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
