"""Stable Diffusion's text-conditional U-Net (LDM's UNetModel, diffusers' UNet2DConditionModel).

The same plan as the DDPM U-Net of `unet.py` (ResBlocks with a timestep embedding, skips from the
down path concatenated on the way up) with what latent diffusion changed: a spatial Transformer
(`transformer.SpatialTransformer`: self-attention, cross-attention to the text, GEGLU) after the
ResBlocks of the levels that have one, per-level head counts, GroupNorm epsilon 1e-5, a
symmetrically padded stride-2 downsampling convolution, and diffusers' choice of sinusoidal
embedding (cos first, frequencies over half rather than half - 1). Module names are diffusers'
(`down_blocks_0/resnets_1`, `mid_block/attentions_0`), so `pretrained/` maps names one to one.
"""

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.fast import FastPaths
from diffusion_jax.models.transformer import ATTENTION_IMPLS, SpatialTransformer


@dataclasses.dataclass(frozen=True)
class LatentUNetConfig:
  """Hyper-parameters of the U-Net (the defaults are Stable Diffusion 1.x's).

  Attributes:
    in_channels: input channels (4 latents; 9 for the inpainting U-Net: latents, mask, masked
      image latents).
    out_channels: output channels.
    block_channels: width of each resolution level, top to bottom.
    cross_attention: per level, whether its blocks have a spatial Transformer (the up path
      mirrors the down path; the middle always has one).
    layers_per_block: ResBlocks per level on the down path (the up path has one more).
    num_heads: attention heads per level; the middle uses the last level's.
    transformer_layers: Transformer blocks in each spatial Transformer, per level.
    context_dim: width of the text embeddings attended to.
    num_groups: GroupNorm groups.
    norm_eps: the ResBlocks' and the output's GroupNorm epsilon.
    flip_sin_to_cos: the timestep embedding puts the cosines first.
    freq_shift: the embedding's frequencies are 10000 ** (-i / (half - freq_shift)).
    dtype: compute dtype name; parameters stay float32.
    attention: "plain" or "fused" (`attention.attention`), or "chunked"
      (`transformer.chunked_attention`: one head and block of queries at a time; on a CPU the
      fastest, and the least memory).
    conv: the 3x3 convolutions of the ResBlocks (`layers.conv3x3`): one value for all levels,
      or one per level (conv_in and conv_out take the first level's). On a CPU at inference,
      Winograd is faster than XLA's convolution on the first level's 64x64 maps and slower on
      the smaller ones: ("winograd", "xla", "xla", "xla").
    subpixel_upsample: compute each upsampling convolution at the low resolution.
  """

  in_channels: int = 4
  out_channels: int = 4
  block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  cross_attention: tuple[bool, ...] = (True, True, True, False)
  layers_per_block: int = 2
  num_heads: tuple[int, ...] = (8, 8, 8, 8)
  transformer_layers: tuple[int, ...] = (1, 1, 1, 1)
  context_dim: int = 768
  num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  dtype: str = "float32"
  attention: str = "plain"
  conv: str | tuple[str, ...] = "xla"
  subpixel_upsample: bool = True

  def __post_init__(self):
    levels = len(self.block_channels)
    convs = (self.conv,) if isinstance(self.conv, str) else tuple(self.conv)
    if not isinstance(self.conv, str):
      object.__setattr__(self, "conv", convs)
      if len(convs) != levels:
        raise ValueError(
          f"conv={convs} needs one entry per level of block_channels={self.block_channels}"
        )
    for conv in convs:
      if conv not in layers.CONV_IMPLS:
        raise ValueError(f"conv={conv!r} is not one of {layers.CONV_IMPLS}")
    for field in ("cross_attention", "num_heads", "transformer_layers"):
      if len(getattr(self, field)) != levels:
        raise ValueError(
          f"{field}={getattr(self, field)} needs one entry per level of "
          f"block_channels={self.block_channels}"
        )
    for level, (width, heads) in enumerate(zip(self.block_channels, self.num_heads, strict=True)):
      if width % self.num_groups or width % heads:
        raise ValueError(
          f"block_channels[{level}]={width} must be divisible by num_groups={self.num_groups} "
          f"and num_heads[{level}]={heads}"
        )
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")


def sinusoidal_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float):
  """diffusers' `get_timestep_embedding`: [B] timesteps -> [B, dim] float32.

  Frequencies f_i = 10000 ** (-i / (dim // 2 - freq_shift)); sin(t f) then cos(t f), swapped with
  `flip_sin_to_cos`. `layers.timestep_embedding` is the case freq_shift=1, no flip.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10_000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class Downsample(nn.Module):
  """A stride-2 3x3 convolution padded by one on every side (diffusers' `downsample_padding=1`)."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), C]."""
    conv = nn.Conv(
      x.shape[-1],
      (3, 3),
      (2, 2),
      ((1, 1), (1, 1)),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="conv",
    )
    return conv(x)


class LatentUNet(nn.Module):
  """eps_theta(z_t, t, context) (or v, as the checkpoint was trained) of Stable Diffusion.

  Attributes:
    config: the hyper-parameters.
  """

  config: LatentUNetConfig

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    """Predicts the model output for noisy latents.

    Args:
      x: [B, h, w, in_channels] latents; h and w divisible by 2 ** (levels - 1).
      t: [B] int or float timesteps.
      context: [B, L, context_dim] text embeddings.

    Returns:
      [B, h, w, out_channels] float32.
    """
    cfg = self.config
    chex.assert_rank(x, 4)
    chex.assert_shape(t, (x.shape[0],))
    chex.assert_shape(context, (x.shape[0], None, cfg.context_dim))
    factor = 2 ** (len(cfg.block_channels) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
        f"latents of {x.shape[1]}x{x.shape[2]} cannot be halved {factor.bit_length() - 1} times: "
        f"use a multiple of {factor} (images a multiple of {8 * factor} for an 8x autoencoder)"
      )
    dtype = jnp.dtype(cfg.dtype)
    fast = FastPaths()
    context = context.astype(dtype)
    emb = sinusoidal_embedding(t, cfg.block_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    dense = lambda name: layers.dense(4 * cfg.block_channels[0], dtype, name)
    emb = dense("time_embedding/linear_2")(nn.swish(dense("time_embedding/linear_1")(emb)))

    conv = lambda level: cfg.conv if isinstance(cfg.conv, str) else cfg.conv[level]

    def resnet(h, level, name):
      channels, eps = cfg.block_channels[level], cfg.norm_eps
      block = layers.ResBlock(
        channels, 0.0, cfg.num_groups, dtype, conv(level), fast, eps, name=name
      )
      return block(h, emb)

    def transformer(h, level, name):
      block = SpatialTransformer(
        cfg.num_heads[level],
        cfg.transformer_layers[level],
        cfg.num_groups,
        dtype,
        cfg.attention,
        name=name,
      )
      return block(h, context)

    levels = len(cfg.block_channels)
    skips = [layers.conv3x3(cfg.block_channels[0], dtype, "conv_in", conv=conv(0))(x)]
    for level in range(levels):
      prefix = f"down_blocks_{level}"
      for i in range(cfg.layers_per_block):
        h = resnet(skips[-1], level, f"{prefix}/resnets_{i}")
        if cfg.cross_attention[level]:
          h = transformer(h, level, f"{prefix}/attentions_{i}")
        skips.append(h)
      if level != levels - 1:
        skips.append(Downsample(dtype, name=f"{prefix}/downsamplers_0")(skips[-1]))

    h = resnet(skips[-1], levels - 1, "mid_block/resnets_0")
    h = transformer(h, levels - 1, "mid_block/attentions_0")
    h = resnet(h, levels - 1, "mid_block/resnets_1")

    for k, level in enumerate(reversed(range(levels))):
      prefix = f"up_blocks_{k}"
      for i in range(cfg.layers_per_block + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resnet(h, level, f"{prefix}/resnets_{i}")
        if cfg.cross_attention[level]:
          h = transformer(h, level, f"{prefix}/attentions_{i}")
      if level:
        up = layers.Upsample(True, dtype, cfg.subpixel_upsample, name=f"{prefix}/upsamplers_0")
        h = up(h)

    h = layers.group_norm(cfg.num_groups, dtype, "conv_norm_out", "swish", fast, cfg.norm_eps)(h)
    h = layers.conv3x3(cfg.out_channels, dtype, "conv_out", conv=conv(0))(h)
    return h.astype(jnp.float32)
