"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), Stable Diffusion's VAE.

An image [B, H, W, 3] in [-1, 1] is encoded to a diagonal Gaussian over latents [B, H/f, W/f, z]
(f = 2 ** (len(channel_mult) - 1)) and a latent is decoded back to an image, as LDM's
`Encoder`, `Decoder`, `AutoencoderKL` and `DiagonalGaussianDistribution`.

Parameter paths are LDM's state-dict keys with each block's dotted index path joined by "_":
`encoder.down.{i}.block.{j}` -> `encoder/down_{i}_block_{j}`, `mid.attn_1` -> `mid_attn_1`,
`decoder.up.{i}.upsample.conv` -> `decoder/up_{i}_upsample/conv` (up.{i} has channel_mult[i]).
"""

import dataclasses
import math

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.attention import AttnBlock
from diffusion_jax.models.layers import (
  CONV_IMPLS,
  REFERENCE_PATHS,
  Downsample,
  ResBlock,
  Upsample,
  check_levels,
  conv3x3,
  dense,
  group_norm,
)

_DTYPES = ("float32", "bfloat16", "float16")

# LDM clips the log-variance to this range before taking exponentials.
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Hyper-parameters of the autoencoder; the defaults are Stable Diffusion's.

  Attributes:
    channels: base width; level i has channels * channel_mult[i] channels.
    channel_mult: one width multiplier per resolution level; the feature maps are halved between
      levels, so the latents are downsample_factor = 2 ** (len(channel_mult) - 1) times smaller.
    num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
    z_channels: latent channels.
    attn_resolutions: feature-map heights (pixels) whose encoder and decoder levels add
      self-attention after each ResBlock; the middle always has one attention block.
    num_groups: GroupNorm groups; must divide every level's width.
    in_channels: image channels read by the encoder.
    out_channels: image channels written by the decoder.
    dropout: dropout rate in [0, 1) inside the ResBlocks (train=True only).
    dtype: compute dtype name ("float32", "bfloat16", "float16"); parameters stay float32.
    conv: how the stride-1 3x3 convolutions are computed (`layers.conv3x3`: "xla", "winograd",
      "winograd_large"); the same function and parameters.
    subpixel_upsample: compute each upsampling convolution at the low resolution (4/9 of its
      FLOPs, `layers.Upsample`); the same function and parameters up to float rounding.
  """

  channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  attn_resolutions: tuple[int, ...] = ()
  num_groups: int = 32
  in_channels: int = 3
  out_channels: int = 3
  dropout: float = 0.0
  dtype: str = "float32"
  conv: str = "xla"
  subpixel_upsample: bool = True

  def __post_init__(self):
    object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    if self.dtype not in _DTYPES:
      raise ValueError(f"AutoencoderConfig.dtype={self.dtype!r} is not one of {_DTYPES}.")
    if self.conv not in CONV_IMPLS or self.conv == "auto":
      raise ValueError(
        f"AutoencoderConfig.conv={self.conv!r} is not one of {tuple(CONV_IMPLS[1:])}."
      )
    if not self.channel_mult or min(self.channel_mult) < 1:
      raise ValueError(
        f"AutoencoderConfig.channel_mult={self.channel_mult} must be a non-empty tuple of "
        "positive integers, e.g. (1, 2, 4, 4)."
      )
    for field in ("channels", "z_channels", "num_groups", "in_channels", "out_channels"):
      if getattr(self, field) < 1:
        raise ValueError(
          f"AutoencoderConfig.{field}={getattr(self, field)} must be a positive integer."
        )
    check_levels(
      "AutoencoderConfig.",
      self.channels,
      self.channel_mult,
      self.num_res_blocks,
      self.num_groups,
      self.dropout,
    )

  @property
  def downsample_factor(self) -> int:
    """f: the ratio of the image's height (and width) to the latent's."""
    return 2 ** (len(self.channel_mult) - 1)

  def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
    """The latent shape (h, w, z_channels) of an image of `image_size` (H or (H, W)) pixels.

    Raises:
      ValueError: H or W is not a positive multiple of `downsample_factor`.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    f = self.downsample_factor
    for size in (height, width):
      if size < 1 or size % f:
        raise ValueError(
          f"image size {size} is not a multiple of the autoencoder's downsampling factor {f} "
          f"(2 ** (len(channel_mult) - 1), channel_mult={self.channel_mult}); "
          f"use e.g. {max(f, size // f * f)}."
        )
    return height // f, width // f, self.z_channels


@flax.struct.dataclass
class DiagonalGaussian:
  """A Gaussian with diagonal covariance over latents: LDM's DiagonalGaussianDistribution.

  Attributes:
    mean: [B, h, w, z] float32.
    logvar: [B, h, w, z] float32 log-variance, clipped to [-30, 20].
  """

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """The distribution of moments [B, h, w, 2z]: the mean, then the log-variance, over channels."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, *_LOGVAR_RANGE))

  @property
  def std(self) -> jax.Array:
    """[B, h, w, z] standard deviation exp(logvar / 2)."""
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    """[B, h, w, z] variance exp(logvar)."""
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """z = mean + std * eps with eps ~ N(0, I) drawn from `key`: [B, h, w, z] float32."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    """The most likely latent, the mean: [B, h, w, z]."""
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over (h, w, z): [B] float32."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))

  def nll(self, x: jax.Array) -> jax.Array:
    """-log q(x) = 0.5 * sum(log(2 pi) + logvar + (x - mean)^2 / var) over (h, w, z): [B]."""
    terms = math.log(2.0 * math.pi) + self.logvar + jnp.square(x - self.mean) / self.var
    return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


def _resblock(config: AutoencoderConfig, width: int, name: str) -> ResBlock:
  return ResBlock(
    width,
    config.dropout,
    config.num_groups,
    jnp.dtype(config.dtype),
    conv=config.conv,
    fast=REFERENCE_PATHS,
    name=name,
  )


def _attn(config: AutoencoderConfig, name: str) -> AttnBlock:
  return AttnBlock(1, config.num_groups, jnp.dtype(config.dtype), fast=REFERENCE_PATHS, name=name)


def _mid(config: AutoencoderConfig, h: jax.Array, train: bool) -> jax.Array:
  """LDM's middle: ResBlock, single-head attention, ResBlock, at the width of h."""
  h = _resblock(config, h.shape[-1], "mid_block_1")(h, None, train)
  h = _attn(config, "mid_attn_1")(h)
  return _resblock(config, h.shape[-1], "mid_block_2")(h, None, train)


def _head(config: AutoencoderConfig, h: jax.Array, features: int) -> jax.Array:
  """GroupNorm -> swish -> 3x3 conv to `features` channels."""
  dtype = jnp.dtype(config.dtype)
  h = group_norm(config.num_groups, dtype, "norm_out", "swish", REFERENCE_PATHS)(h)
  return conv3x3(features, dtype, "conv_out", conv=config.conv)(h)


class Encoder(nn.Module):
  """Images to the moments of the latent posterior, before `quant_conv` (LDM's Encoder).

  conv_in -> per level: ResBlocks (and attention where configured), then a stride-2 conv except
  at the last level -> middle -> GroupNorm, swish, conv_out to 2 * z_channels.

  Attributes:
    config: the hyper-parameters.
  """

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, H, W, in_channels] images -> [B, H/f, W/f, 2 * z_channels] moments in `dtype`."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = conv3x3(cfg.channels, dtype, "conv_in", conv=cfg.conv)(x)
    last = len(cfg.channel_mult) - 1
    for i, mult in enumerate(cfg.channel_mult):
      for j in range(cfg.num_res_blocks):
        h = _resblock(cfg, cfg.channels * mult, f"down_{i}_block_{j}")(h, None, train)
        if h.shape[1] in cfg.attn_resolutions:
          h = _attn(cfg, f"down_{i}_attn_{j}")(h)
      if i != last:
        h = Downsample(True, dtype, name=f"down_{i}_downsample")(h)
    h = _mid(cfg, h, train)
    return _head(cfg, h, 2 * cfg.z_channels)


class Decoder(nn.Module):
  """Latents (after `post_quant_conv`) to images (LDM's Decoder, without tanh).

  conv_in -> middle -> per level from the last to the first: num_res_blocks + 1 ResBlocks (and
  attention where configured), then a nearest x2 upsampling and conv except at level 0 ->
  GroupNorm, swish, conv_out to out_channels.

  Attributes:
    config: the hyper-parameters.
  """

  config: AutoencoderConfig

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    """[B, h, w, z_channels] latents -> [B, h*f, w*f, out_channels] images in `dtype`."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = conv3x3(cfg.channels * cfg.channel_mult[-1], dtype, "conv_in", conv=cfg.conv)(z)
    h = _mid(cfg, h, train)
    for i in reversed(range(len(cfg.channel_mult))):
      for j in range(cfg.num_res_blocks + 1):
        h = _resblock(cfg, cfg.channels * cfg.channel_mult[i], f"up_{i}_block_{j}")(h, None, train)
        if h.shape[1] in cfg.attn_resolutions:
          h = _attn(cfg, f"up_{i}_attn_{j}")(h)
      if i != 0:
        h = Upsample(True, dtype, subpixel=cfg.subpixel_upsample, name=f"up_{i}_upsample")(h)
    return _head(cfg, h, cfg.out_channels)


class Autoencoder(nn.Module):
  """The KL autoencoder (LDM's AutoencoderKL): `encode`, `decode`, and both in `__call__`.

  `model.init(key, x)` creates every parameter;
  `model.apply(variables, x, method=Autoencoder.encode)` and
  `model.apply(variables, z, method=Autoencoder.decode)` run one half. train=True turns dropout on
  and needs `rngs={"dropout": key}`.

  Attributes:
    config: the hyper-parameters.
  """

  config: AutoencoderConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    # 1x1 convolutions, as Dense layers over channels.
    self.quant_conv = dense(2 * cfg.z_channels, dtype, "quant_conv")
    self.post_quant_conv = dense(cfg.z_channels, dtype, "post_quant_conv")

  def encode(self, x: jax.Array, train: bool = False) -> DiagonalGaussian:
    """The posterior q(z | x).

    Args:
      x: [B, H, W, in_channels] images in [-1, 1]; H and W multiples of `downsample_factor`.
      train: enables dropout.

    Returns:
      The `DiagonalGaussian` over latents [B, H/f, W/f, z_channels] (float32).

    Raises:
      ValueError: H or W is not a multiple of the downsampling factor.
    """
    chex.assert_rank(x, 4)
    chex.assert_axis_dimension(x, 3, self.config.in_channels)
    self.config.latent_shape(x.shape[1:3])
    moments = self.quant_conv(self.encoder(x, train))
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: jax.Array, train: bool = False) -> jax.Array:
    """Images from latents.

    Args:
      z: [B, h, w, z_channels] latents.
      train: enables dropout.

    Returns:
      [B, h*f, w*f, out_channels] float32 images, roughly in [-1, 1] (not clipped).
    """
    chex.assert_rank(z, 4)
    chex.assert_axis_dimension(z, 3, self.config.z_channels)
    return self.decoder(self.post_quant_conv(z), train).astype(jnp.float32)

  def __call__(
    self,
    x: jax.Array,
    key: jax.Array | None = None,
    sample_posterior: bool = True,
    train: bool = False,
  ) -> tuple[jax.Array, DiagonalGaussian]:
    """Encodes and decodes.

    Args:
      x: [B, H, W, in_channels] images in [-1, 1]; H and W multiples of `downsample_factor`.
      key: draws the latent from the posterior when `sample_posterior`; None decodes the mode.
      sample_posterior: decode a sample (with `key`) rather than the posterior's mode.
      train: enables dropout.

    Returns:
      (reconstruction [B, H, W, out_channels] float32, the posterior `DiagonalGaussian`).
    """
    posterior = self.encode(x, train)
    if sample_posterior and key is not None:
      z = posterior.sample(key)
    else:
      z = posterior.mode()
    return self.decode(z, train), posterior
