"""Building blocks of the DDPM U-Net: timestep embedding, GroupNorm, convolutions, ResBlock,
resampling (attention is in `attention.py`).

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

from diffusion_jax.models.fast import FastPaths
from diffusion_jax.models.fast.groupnorm import GroupNorm
from diffusion_jax.models.fast.skips import SplitDense, residual
from diffusion_jax.models.fast.subpixel import SubpixelConv
from diffusion_jax.models.fast.winograd import conv_general_dilated as winograd_conv
from diffusion_jax.models.initializers import default_init, zeros_init

# Speed paths off (the fused GroupNorm stays: `FastPaths` defaults).
REFERENCE_PATHS = FastPaths()

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


class ReferenceGroupNorm(nn.Module):
  """GroupNorm then `act`, by the plain formula with autodiff: the reference of `GroupNorm`.

  flax's nn.GroupNorm parameters ("scale", "bias") and statistics (float32, the variance as
  E[x^2] - E[x]^2 clipped at 0); parts along the channel axis are concatenated first.
  """

  num_groups: int
  epsilon: float = 1e-6
  act: str = "none"
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """x: [B, ..., C] (or parts [B, ..., C_i] of it along C) -> [B, ..., C]."""
    x = jnp.concatenate(x, axis=-1) if isinstance(x, (tuple, list)) else x
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    groups = xf.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    axes = (*range(1, x.ndim - 1), x.ndim)
    mean = jnp.mean(groups, axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(groups), axes, keepdims=True) - jnp.square(mean), 0.0)
    y = ((groups - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape) * scale + bias
    y = nn.swish(y) if self.act == "swish" else y
    return y.astype(self.dtype or x.dtype)


def group_norm(
  num_groups: int,
  dtype,
  name: str,
  act: str = "none",
  fast: FastPaths = REFERENCE_PATHS,
  epsilon: float = _GROUPNORM_EPS,
) -> nn.Module:
  """GroupNorm over the last axis (the original's epsilon by default); float32 scale and bias.

  Args:
    num_groups: groups; must divide the channel count of the input.
    dtype: compute dtype of the output.
    name: submodule name.
    act: "swish" to apply swish in the same pass (the usual GroupNorm -> swish), or "none".
    fast: `fast.group_norm` picks the fused operation with a hand-written gradient
      (`fast/groupnorm.py`, with `fast.recompute_dz`) or `ReferenceGroupNorm`.
    epsilon: added to the group variance (1e-6 in the original, 1e-5 in Stable Diffusion's U-Net).

  Returns:
    The (unbound) module, with flax's nn.GroupNorm parameters; [B, H, W, C] -> [B, H, W, C].
  """
  # Group statistics are float32 even for a bfloat16 compute dtype.
  options = dict(epsilon=epsilon, act=act, dtype=dtype, param_dtype=jnp.float32, name=name)
  if fast.group_norm == "reference":
    return ReferenceGroupNorm(num_groups, **options)
  return GroupNorm(num_groups, recompute_dz=fast.recompute_dz, **options)


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
    conv: "xla" (XLA's convolution), "winograd" or "winograd_large" (Winograd's algorithm
      always, or where it is faster on a CPU: `winograd.tile_size`); the same parameters and,
      up to float rounding, the same function. An unresolved "auto" is XLA's.

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
  count changes). Without temb (the autoencoder's blocks) the Dense and its `temb_proj`
  parameters are left out.

  Attributes:
    out_channels: output channels; None keeps the input's.
    dropout: dropout rate in [0, 1), applied only with train=True.
    num_groups: GroupNorm groups; must divide the input and output channels.
    dtype: compute dtype.
    conv: how both 3x3 convolutions are computed (`conv3x3`).
    fast: the speed paths (`FastPaths`: GroupNorm, the residual's gradient).
    epsilon: the GroupNorms' epsilon.
  """

  out_channels: int | None = None
  dropout: float = 0.0
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  conv: str = "xla"
  fast: FastPaths = FastPaths()
  epsilon: float = _GROUPNORM_EPS

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    temb: jax.Array | None,
    train: bool = False,
    dropout_keys: jax.Array | None = None,
  ) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in] activations, or arrays [B, H, W, C_i] that stand for their concatenation
        over channels (the up path's skip connections), which is then never written: GroupNorm
        and the NIN projection read the parts (`group_norm`, `SplitDense`).
      temb: [B, D] timestep embedding (the output of the U-Net's embedding MLP, before swish),
        or None for a block without one.
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
    h = group_norm(self.num_groups, self.dtype, "norm1", "swish", self.fast, self.epsilon)(x)
    h = conv3x3(out_channels, self.dtype, "conv1", conv=self.conv)(h)
    # The embedding MLP ends in a linear layer; each block applies the swish itself.
    if temb is not None:
      h = h + dense(out_channels, self.dtype, "temb_proj")(nn.swish(temb))[:, None, None, :]
    h = group_norm(self.num_groups, self.dtype, "norm2", "swish", self.fast, self.epsilon)(h)
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
    return residual(x, h, self.fast.hold_branch_gradient)


def check_levels(
  prefix: str, channels: int, channel_mult, num_res_blocks: int, num_groups: int, dropout: float
) -> None:
  """Checks the fields a network of ResBlock levels shares (the U-Net's and the autoencoder's).

  Raises:
    ValueError: one line naming the field (`prefix` + its name) and how to fix it.
  """
  if num_res_blocks < 0:
    raise ValueError(f"{prefix}num_res_blocks={num_res_blocks} must be >= 0.")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"{prefix}dropout={dropout} must be in [0, 1).")
  for level, mult in enumerate(channel_mult):
    width = channels * mult
    if width % num_groups:
      raise ValueError(
        f"{prefix}num_groups={num_groups} does not divide {width} = {prefix}channels * "
        f"{prefix}channel_mult[{level}] ({channels} * {mult}); choose {prefix}num_groups "
        f"dividing every level's width, or change {prefix}channels / {prefix}channel_mult."
      )


# How 3x3 convolutions are computed: `conv3x3`, `UNetConfig.conv`.
CONV_IMPLS = ("auto", "xla", "winograd", "winograd_large")


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


def upsample_low_res(low_res: jax.Array | None, size: int, shape: tuple[int, ...]) -> jax.Array:
  """A super-resolution U-Net's low-resolution input, resized bilinearly to its input size.

  Bilinear (half-pixel centres, as improved-diffusion's SuperResModel and PyTorch's
  interpolate(align_corners=False)) rather than nearest: the network starts from a smooth image
  and adds detail, instead of first having to undo the blocks' edges. Both are linear and keep
  every low-resolution pixel's information.

  Args:
    low_res: [B, size, w, C] float low-resolution images.
    size: the height the network expects (model.low_res_size).
    shape: the shape of the network's input x_t, [B, H, W, ...].

  Returns:
    [B, H, W, C] float32.

  Raises:
    ValueError: `low_res` is missing or of another batch or height.
  """
  if low_res is None:
    raise ValueError(
      "this U-Net is a super-resolution model (model.low_res_size > 0): pass low_res"
    )
  if low_res.ndim != 4 or low_res.shape[0] != shape[0] or low_res.shape[1] != size:
    raise ValueError(
      f"low_res has shape {low_res.shape}; this U-Net expects [{shape[0]}, {size}, w, C] "
      f"(model.low_res_size={size})"
    )
  out_shape = (*shape[:3], low_res.shape[-1])
  return jax.image.resize(low_res.astype(jnp.float32), out_shape, method="linear")
