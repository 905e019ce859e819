"""The FID Inception-v3: pytorch-fid's port of TensorFlow's 2015-12-05 Inception graph, in Flax.

The network of pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)` (its
`fid_inception_v3`: torchvision's Inception3 with 1008 classes, no auxiliary head, and the
FIDInceptionA/C/E_1/E_2 blocks), NHWC:
  - images in [0, 1] resized to 299x299 as torch's `F.interpolate(mode='bilinear',
    align_corners=False)` (`resize_bilinear`: no antialiasing when shrinking, unlike
    `jax.image.resize`), then scaled to [-1, 1];
  - every convolution without bias, followed by batch norm in inference form (eps 1e-3) and ReLU;
  - the TF graph's quirks: the 3x3 average pools of the A, C and E blocks leave the zero padding
    out of the mean, and the last E block (Mixed_7c) max-pools its pool branch;
  - the 2048-d global average pool, the features FID and KID use, and optionally the 1008-way fc
    logits (the TF graph's `softmax/logits`, which TTUR's Inception Score takes a softmax of).

Submodules carry pytorch-fid's names (`Mixed_5b/branch5x5_1/conv`, `.../bn`, `fc`), so weights map
by name (`pretrained.inception`). Batch norm keeps torch's four tensors as parameters (scale,
bias, mean, var): no optimizer should see any of them.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.fast import winograd

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
  """torch's bilinear taps along one axis (align_corners=False, no antialiasing).

  Output pixel i reads source position s = max((i + 1/2) * in/out - 1/2, 0), in float32 as torch
  computes it, from pixels floor(s) and the next one (the same at the last pixel).

  Returns:
    (i0, i1): [out_size] int32 source indices; (w0, w1): [out_size] float32 weights, w0 + w1 = 1.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
  return i0, i1, np.float32(1.0) - w1, w1


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resizing with torch's `F.interpolate(mode='bilinear', align_corners=False)`.

  Each output pixel mixes the 2x2 source pixels around its centre, also when shrinking (no
  antialiasing), and source positions before the first pixel are clamped to it. An axis already
  of the target size is left as it is (torch's taps would be the identity).

  Args:
    images: [B, H, W, C] float images.
    size: (height, width) of the output.

  Returns:
    [B, height, width, C] in the dtype of `images`.
  """
  chex.assert_rank(images, 4)
  x = images
  for axis, out_size in ((2, size[1]), (1, size[0])):  # width first, as torch's kernel
    if x.shape[axis] == out_size:
      continue
    i0, i1, w0, w1 = _linear_taps(x.shape[axis], out_size)
    shape = [1, 1, 1, 1]
    shape[axis] = out_size
    w0 = jnp.asarray(w0.reshape(shape), x.dtype)
    w1 = jnp.asarray(w1.reshape(shape), x.dtype)
    x = w0 * jnp.take(x, i0, axis=axis) + w1 * jnp.take(x, i1, axis=axis)
  return x


class BatchNormInference(nn.Module):
  """Batch norm with fixed statistics: (x - mean) / sqrt(var + eps) * scale + bias, per channel.

  Computed as torch does in eval mode, x * a + (bias - mean * a) with a = scale / sqrt(var + eps).
  """

  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> float32 [..., C]."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    a = scale * jax.lax.rsqrt(var + self.eps)
    return x.astype(jnp.float32) * a + (bias - mean * a)


class ConvBN(nn.Module):
  """torchvision's BasicConv2d: convolution without bias, batch norm, ReLU.

  Attributes:
    features: output channels.
    kernel: (kh, kw).
    strides: (sh, sw).
    padding: "VALID" or None for torch's symmetric (kh // 2, kw // 2) padding.
    dtype: compute dtype of the convolution; parameters are float32.
    precision: precision of the convolution (None: the backend's default for `dtype`).
    conv: "xla", or "winograd" / "winograd_large" for Winograd's algorithm in the 3x3
      convolutions with stride 1 (`fast.winograd`; the "VALID" ones as "SAME" then cropped) and
      the 1x1 convolutions as matrix products.
  """

  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str | None = None
  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.PrecisionLike = None
  conv: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] -> [B, H', W', features] in `dtype`."""
    padding = self.padding or tuple((k // 2, k // 2) for k in self.kernel)
    winograd_3x3 = self.conv != "xla" and self.kernel == (3, 3) and self.strides == (1, 1)
    pointwise = self.conv != "xla" and self.kernel == (1, 1) and self.strides == (1, 1)
    crop = winograd_3x3 and padding == "VALID"
    if crop:
      padding = ((1, 1), (1, 1))
    conv_fn = None
    if winograd_3x3:
      conv_fn = functools.partial(winograd.conv_general_dilated, conv=self.conv)
    elif pointwise:
      conv_fn = _pointwise_conv
    conv = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=padding,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      precision=self.precision,
      conv_general_dilated=conv_fn,
      name="conv",
    )
    y = conv(x)
    if crop:
      y = y[:, 1:-1, 1:-1]
    return nn.relu(BatchNormInference(name="bn")(y)).astype(self.dtype)


def _pointwise_conv(lhs, rhs, window_strides, padding, *args, precision=None, **kwargs):
  """A 1x1 NHWC convolution with stride 1 as the matrix product it is: on a CPU XLA's
  matmul runs it about 1.5x as fast as its convolution (benchmarks/results/fid_speed.md)."""
  del window_strides, padding, args, kwargs  # 1x1, stride 1, flax's NHWC/HWIO layout
  return jnp.matmul(lhs, rhs[0, 0], precision=precision)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's average pool (the FID blocks' patch): the zero padding is not counted in the mean.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 2) -> jax.Array:
  padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class _Block(nn.Module):
  """Shared attributes of the Inception blocks (a ConvBN factory with the compute settings)."""

  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.PrecisionLike = None
  conv_impl: str = "xla"

  def conv(self, name: str, features: int, kernel=(1, 1), **kwargs) -> ConvBN:
    settings = {"dtype": self.dtype, "precision": self.precision, "conv": self.conv_impl}
    return ConvBN(features, kernel, name=name, **settings, **kwargs)


class InceptionA(_Block):
  """Mixed_5b/c/d (FIDInceptionA): 1x1, 5x5, double 3x3 and average-pool branches."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5))(self.conv("branch5x5_1", 48)(x))
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3))(self.conv("branch3x3dbl_2", 96, (3, 3))(b3))
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a: a strided 3x3, a strided double 3x3 and a max-pool branch (17x17 out)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3", 384, (3, 3), strides=(2, 2), padding="VALID")(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3))(self.conv("branch3x3dbl_1", 64)(x))
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=(2, 2), padding="VALID")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b/c/d/e (FIDInceptionC): factorised 7x7 branches of width `channels_7x7`."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1))(b7)
    bd = self.conv("branch7x7dbl_1", c7)(x)
    for i, (features, kernel) in enumerate(
      ((c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))), start=2
    ):
      bd = self.conv(f"branch7x7dbl_{i}", features, kernel)(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a: strided 3x3 and 7x7-then-3x3 branches and a max-pool branch (8x8 out)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3_1", 192)(x)
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=(2, 2), padding="VALID")(b3)
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=(2, 2), padding="VALID")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3 = [self.conv(f"branch3x3_2{s}", 384, k)(b3) for s, k in (("a", (1, 3)), ("b", (3, 1)))]
    bd = self.conv("branch3x3dbl_2", 384, (3, 3))(self.conv("branch3x3dbl_1", 448)(x))
    bd = [self.conv(f"branch3x3dbl_3{s}", 384, k)(bd) for s, k in (("a", (1, 3)), ("b", (3, 1)))]
    pooled = _max_pool_3x3(x, stride=1) if self.max_pool else _avg_pool_3x3(x)
    bp = self.conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3, from images in [0, 1] to the pool features (and logits).

  Attributes:
    dtype: compute dtype of the convolutions (batch norm and the pooled features are float32);
      parameters are float32.
    precision: precision of the convolutions and the fc layer. On GPUs and TPUs the default may
      compute float32 convolutions with reduced-precision products (TF32, bfloat16 passes); pass
      "highest" to match pytorch-fid's float32 numbers there. CPUs compute float32 in full.
    conv: the 3x3 convolutions with stride 1: "xla", or Winograd's algorithm ("winograd", or
      "winograd_large" where it is faster on a CPU; `ConvBN`), equal up to float rounding.
  """

  dtype: jnp.dtype = jnp.float32
  precision: jax.lax.PrecisionLike = None
  conv: str = "xla"

  @nn.compact
  def __call__(self, images: jax.Array, logits: bool = False):
    """Applies the network.

    Args:
      images: [B, H, W, 3] float RGB images in [0, 1], any size (resized to 299x299 as
        pytorch-fid does; 299x299 images are used as they are).
      logits: also return the fc layer's logits.

    Returns:
      pool: [B, 2048] float32, the average-pooled features of pytorch-fid's block 3 (FID's).
      With logits=True, (pool, logits) with logits [B, 1008] float32 (index 0 is the TF graph's
      unused background class).
    """
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, 3, 3)
    x = resize_bilinear(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
    x = (2 * x - 1).astype(self.dtype)
    settings = {"dtype": self.dtype, "precision": self.precision}
    block_settings = {**settings, "conv_impl": self.conv}

    def conv(name, features, kernel, **kwargs):
      return ConvBN(features, kernel, name=name, conv=self.conv, **settings, **kwargs)

    x = conv("Conv2d_1a_3x3", 32, (3, 3), strides=(2, 2), padding="VALID")(x)  # 149x149
    x = conv("Conv2d_2a_3x3", 32, (3, 3), padding="VALID")(x)  # 147x147
    x = conv("Conv2d_2b_3x3", 64, (3, 3))(x)
    x = _max_pool_3x3(x)  # 73x73
    x = conv("Conv2d_3b_1x1", 80, (1, 1))(x)
    x = conv("Conv2d_4a_3x3", 192, (3, 3), padding="VALID")(x)  # 71x71
    x = _max_pool_3x3(x)  # 35x35
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features=pool_features, name=name, **block_settings)(x)
    x = InceptionB(name="Mixed_6a", **block_settings)(x)  # 17x17
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=c7, name=name, **block_settings)(x)
    x = InceptionD(name="Mixed_7a", **block_settings)(x)  # 8x8
    x = InceptionE(max_pool=False, name="Mixed_7b", **block_settings)(x)
    x = InceptionE(max_pool=True, name="Mixed_7c", **block_settings)(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if not logits:
      return pool
    fc = nn.Dense(
      NUM_CLASSES, dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision, name="fc"
    )
    return pool, fc(pool).astype(jnp.float32)
