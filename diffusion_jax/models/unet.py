"""The DDPM U-Net noise predictor (Ho et al. 2020, the original `diffusion_tf/models/unet.py`).

With the CIFAR-10 setting (channels 128, channel_mult (1, 2, 2, 2), 2 res blocks, attention at
16x16, 32x32x3 input, 3 output channels) the model has exactly `CIFAR10_NUM_PARAMS` = 35,746,307
parameters, the paper's 35.7M and the same count as the original code.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention, layers
from diffusion_jax.models.fast import FastPaths, fast_paths_from
from diffusion_jax.models.text_encoder import TextEncoder, TextEncoderConfig
from diffusion_jax.text.tokens import PAD_ID

CIFAR10_NUM_PARAMS = 35_746_307

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of the U-Net (the fields of the config's `model` section, less `name`).

  Attributes:
    channels: base width; level i has channels * channel_mult[i] channels.
    channel_mult: one width multiplier per resolution level; the input is halved between levels.
    num_res_blocks: ResBlocks per level on the down path (the up path has one more).
    attn_resolutions: feature-map heights (pixels) after whose ResBlocks self-attention is added.
    num_heads: attention heads.
    dropout: dropout rate in [0, 1) inside the ResBlocks.
    num_groups: GroupNorm groups; must divide every level's width.
    resamp_with_conv: convolutions in the down/up-sampling layers (else average pooling / plain
      nearest-neighbour resizing).
    out_channels: channels of the output.
    dtype: compute dtype name ("float32", "bfloat16", "float16"); parameters stay float32.
    patch_size: p > 1 folds each p x p pixel patch into channels before the first layer
      (space-to-depth) and unfolds the output the same way, so the U-Net runs at 1/p of the
      resolution for about 1/p**2 of the compute; attn_resolutions then refer to the folded
      feature maps. 1 (the original design) leaves the input as it is.
    num_classes: > 0 makes the network class-conditional: a learned embedding of the label is
      added to the timestep embedding; label `num_classes` is the learned "no label" entry
      (classifier-free guidance). 0: unconditional.
    cross_attn_resolutions: feature-map heights after whose ResBlocks (and self-attention)
      cross-attention to a context sequence (text embeddings) is added; non-empty also adds it
      in the middle. Empty: no cross-attention.
    subpixel_upsample: compute each Upsample's convolution at the low resolution
      (`fast.subpixel.SubpixelConv`): the same function and parameters in 4/9 of its FLOPs, equal up
      to float rounding. False upsamples first, as the original does.
    attention: "plain" or "fused" (`jax.nn.dot_product_attention`; with
      fast.flash_attention, cuDNN's flash attention where cuDNN takes the shapes);
      `attention.attention`.
    conv: how the ResBlocks and the first and last layer compute their 3x3 convolutions:
      "xla" (XLA's convolution), "winograd" (`fast.winograd`: Winograd's algorithm, for every
      float32 one), "winograd_large" (Winograd for the float32 convolutions large enough to
      gain from it on a CPU), or "auto" (resolved per backend by the experiment: winograd_large
      on CPUs, xla elsewhere; a network built with "auto" uses XLA's). The parameters are the
      same; the outputs agree up to float rounding (about 1e-5 of their scale).
    remat: recompute each ResBlock's and attention block's activations in the backward pass
      instead of keeping them: less memory for large batches, about one more forward pass of
      compute. The same gradients up to float rounding.
    fast: the blocks' per-backend speed paths (`fast.FastPaths`, the `model.fast` section).
    low_res_size: > 0 makes the network a super-resolution stage (SR3, Imagen): it also takes a
      low-resolution image of this height, upsampled bilinearly to the input size and
      concatenated to x_t before the first convolution, and the level of the noise that image
      was augmented with (`core.super_resolution`), embedded like the timestep and added to the
      timestep embedding. 0: no low-resolution input (the plain U-Net, same parameters).
  """

  channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  num_heads: int = 1
  dropout: float = 0.1
  num_groups: int = 32
  resamp_with_conv: bool = True
  out_channels: int = 3
  dtype: str = "float32"
  patch_size: int = 1
  num_classes: int = 0
  cross_attn_resolutions: tuple[int, ...] = ()
  subpixel_upsample: bool = True
  attention: str = "plain"
  conv: str = "auto"
  remat: bool = False
  fast: FastPaths = FastPaths()
  low_res_size: int = 0


def unet_config_from(model_config: Any) -> UNetConfig:
  """Turns the config's `model` section into a validated `UNetConfig`.

  Args:
    model_config: a `UNetConfig`, a mapping, or any object with the fields as attributes (such as an
      ml_collections ConfigDict). Missing fields take the `UNetConfig` defaults; `name` and unknown
      fields are ignored here.

  Returns:
    The frozen `UNetConfig`.

  Raises:
    ValueError: a field has an invalid value (the message names the field).
  """
  if isinstance(model_config, UNetConfig):
    config = model_config
  else:
    defaults = UNetConfig()

    def get(name):
      default = getattr(defaults, name)
      if isinstance(model_config, Mapping):
        return model_config.get(name, default)
      return getattr(model_config, name, default)

    dtype = get("dtype")
    try:
      dtype = jnp.dtype(dtype).name
    except TypeError as e:
      raise ValueError(f"model.dtype={dtype!r} is not a dtype; use one of {_DTYPES}.") from e
    config = UNetConfig(
      channels=int(get("channels")),
      channel_mult=tuple(int(m) for m in get("channel_mult")),
      num_res_blocks=int(get("num_res_blocks")),
      attn_resolutions=tuple(int(r) for r in get("attn_resolutions")),
      num_heads=int(get("num_heads")),
      dropout=float(get("dropout")),
      num_groups=int(get("num_groups")),
      resamp_with_conv=bool(get("resamp_with_conv")),
      out_channels=int(get("out_channels")),
      dtype=dtype,
      patch_size=int(get("patch_size")),
      num_classes=int(get("num_classes")),
      cross_attn_resolutions=tuple(int(r) for r in get("cross_attn_resolutions")),
      subpixel_upsample=bool(get("subpixel_upsample")),
      attention=str(get("attention")),
      conv=str(get("conv")),
      remat=bool(get("remat")),
      fast=fast_paths_from(get("fast")),
      low_res_size=int(get("low_res_size")),
    )
  _check_fields(config)
  return config


def _check_fields(config: UNetConfig) -> None:
  """Checks what does not depend on the image size; raises a one-line ValueError."""
  if config.dtype not in _DTYPES:
    raise ValueError(f"model.dtype={config.dtype!r} is not supported; use one of {_DTYPES}.")
  if not config.channel_mult or min(config.channel_mult) < 1:
    raise ValueError(
      f"model.channel_mult={config.channel_mult} must be a non-empty tuple of positive integers, "
      "e.g. (1, 2, 2, 2)."
    )
  for field in ("channels", "num_heads", "num_groups", "out_channels", "patch_size"):
    if getattr(config, field) < 1:
      raise ValueError(f"model.{field}={getattr(config, field)} must be a positive integer.")
  if config.attention not in attention.ATTENTION_IMPLS:
    raise ValueError(
      f"model.attention={config.attention!r} is not one of {attention.ATTENTION_IMPLS}."
    )
  if config.conv not in layers.CONV_IMPLS:
    raise ValueError(f"model.conv={config.conv!r} is not one of {layers.CONV_IMPLS}.")
  if config.low_res_size < 0:
    raise ValueError(
      f"model.low_res_size={config.low_res_size} must be >= 0 (0: not a super-resolution model)."
    )
  if config.num_classes < 0:
    raise ValueError(f"model.num_classes={config.num_classes} must be >= 0 (0: unconditional).")
  layers.check_levels(
    "model.",
    config.channels,
    config.channel_mult,
    config.num_res_blocks,
    config.num_groups,
    config.dropout,
  )


def check_image_size(config: UNetConfig, height: int, width: int | None = None) -> None:
  """Checks that the U-Net can use an input of this size.

  Args:
    config: the model hyper-parameters.
    height: input height in pixels.
    width: input width in pixels; None means square.

  Raises:
    ValueError: one line naming `data.image_size` (or `model.num_heads`) and the fix.
  """
  factor = 2 ** (len(config.channel_mult) - 1) * config.patch_size
  for size in (height, height if width is None else width):
    if size < 1 or size % factor:
      raise ValueError(
        f"data.image_size={size} cannot be halved {len(config.channel_mult) - 1} times by the "
        f"U-Net (after patches of model.patch_size={config.patch_size}): use a multiple of "
        f"{factor} (e.g. {max(factor, size // factor * factor)}), or fewer levels in "
        f"model.channel_mult={config.channel_mult}."
      )
  # Attention runs at the listed resolutions and always in the middle (last level).
  last = len(config.channel_mult) - 1
  height //= config.patch_size
  for level, mult in enumerate(config.channel_mult):
    width_channels = config.channels * mult
    size = height // 2**level
    has_attn = level == last or size in config.attn_resolutions
    has_attn = has_attn or (
      bool(config.cross_attn_resolutions)
      and size in (*config.cross_attn_resolutions, height // 2**last)
    )
    if has_attn and width_channels % config.num_heads:
      raise ValueError(
        f"model.num_heads={config.num_heads} does not divide the {width_channels} channels "
        f"of the attention at {height // 2**level}x{height // 2**level}; choose a divisor."
      )


# Levels in [0, 1] are embedded as timesteps in [0, 1000]: the sinusoids' frequencies (1 down to
# 1e-4) then resolve them as finely as DDPM's timesteps.
_AUG_LEVEL_SCALE = 1000.0


class UNet(nn.Module):
  """The DDPM U-Net: eps_theta(x_t, t).

  conv_in -> down path (per level: num_res_blocks ResBlocks, each followed by attention at the
  attention resolutions, then a Downsample except at the last level) -> middle (ResBlock,
  attention, ResBlock) -> up path (per level, reversed: num_res_blocks + 1 ResBlocks on the
  concatenation with a skip from the down path, attention likewise, then an Upsample except at
  level 0) -> GroupNorm -> swish -> conv_out (zero-initialised). The timestep enters every
  ResBlock through a sinusoidal embedding of width `channels` and a 2-layer MLP of width
  4 * channels. A class-conditional network adds a label embedding to the timestep embedding; a
  text-conditional one adds cross-attention to the context after the self-attention layers
  (`cross_attn_resolutions`, and in the middle). A super-resolution network (`low_res_size`)
  concatenates its upsampled low-resolution input to x_t and adds an embedding of the input's
  augmentation level to the timestep embedding.

  Attributes:
    config: the hyper-parameters.
  """

  config: UNetConfig

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    train: bool = False,
    *,
    labels: jax.Array | None = None,
    context: jax.Array | None = None,
    context_mask: jax.Array | None = None,
    dropout_keys: jax.Array | None = None,
    low_res: jax.Array | None = None,
    aug_level: jax.Array | None = None,
  ) -> jax.Array:
    """Predicts the model output for noisy images.

    Args:
      x: [B, H, W, C] float noisy images, roughly in [-1, 1]; H and W divisible by
        2 ** (len(channel_mult) - 1).
      t: [B] int32 or float32 timesteps (fractional values are fine, e.g. for continuous-time
        samplers).
      train: enables dropout; then `apply` needs `rngs={"dropout": key}`.
      labels: [B] int32 in [0, num_classes]; required when num_classes > 0 (num_classes means
        "no label").
      context: [B, L, D] float context embeddings; required with cross_attn_resolutions.
      context_mask: [B, L] bool, True for valid context tokens (default: all valid).
      dropout_keys: [B] keys for train=True: example j's dropout masks come from dropout_keys[j]
        only (the same as applying the network to that example alone). None: the "dropout"
        rng stream gives masks for the whole batch.
      low_res: [B, low_res_size, w, C'] float low-resolution images in about [-1, 1] (noise
        augmented); required when low_res_size > 0, and only then allowed.
      aug_level: [B] float32 noise-augmentation levels in [0, 1] of `low_res`; None is 0.

    Returns:
      [B, H, W, out_channels] float32 output (eps for the eps-parameterization); exactly zero at
      initialisation.
    """
    cfg = self.config
    chex.assert_rank(x, 4)
    batch, height, width, _ = x.shape
    check_image_size(cfg, height, width)
    chex.assert_shape(t, (batch,))
    dtype = jnp.dtype(cfg.dtype)
    if cfg.low_res_size:
      x = jnp.concatenate([x, layers.upsample_low_res(low_res, cfg.low_res_size, x.shape)], axis=-1)
    elif low_res is not None or aug_level is not None:
      raise ValueError("this U-Net takes no low-resolution input (model.low_res_size=0)")
    p = cfg.patch_size
    if p > 1:
      x = layers.space_to_depth(x, p)

    temb = layers.timestep_embedding(t, cfg.channels)
    temb = layers.dense(4 * cfg.channels, dtype, "temb_dense0")(temb)
    temb = layers.dense(4 * cfg.channels, dtype, "temb_dense1")(nn.swish(temb))
    if cfg.low_res_size:
      # The augmentation level gets an embedding like the timestep's, with parameters of its own.
      level = jnp.zeros((batch,), jnp.float32) if aug_level is None else aug_level
      chex.assert_shape(level, (batch,))
      aemb = layers.timestep_embedding(_AUG_LEVEL_SCALE * level, cfg.channels)
      aemb = layers.dense(4 * cfg.channels, dtype, "aug_dense0")(aemb)
      temb = temb + layers.dense(4 * cfg.channels, dtype, "aug_dense1")(nn.swish(aemb))
    if cfg.num_classes:
      if labels is None:
        raise ValueError("this U-Net is class-conditional (model.num_classes > 0): pass labels")
      chex.assert_shape(labels, (batch,))
      # One more row than classes: the last is the learned "no label" embedding.
      label_embedding = nn.Embed(
        cfg.num_classes + 1,
        4 * cfg.channels,
        embedding_init=nn.initializers.normal(1.0),
        name="label_embedding",
      )
      temb = temb + label_embedding(labels).astype(temb.dtype)
    cross = bool(cfg.cross_attn_resolutions)
    if cross:
      if context is None:
        raise ValueError(
          "this U-Net has cross-attention (model.cross_attn_resolutions): pass context"
        )
      chex.assert_rank(context, 3)
      if context_mask is None:
        context_mask = jnp.ones(context.shape[:2], bool)

    # With remat, `train` (argument 3, counting the module) picks code paths: it stays static.
    res_cls = nn.remat(layers.ResBlock, static_argnums=(3,)) if cfg.remat else layers.ResBlock
    attn_cls = nn.remat(attention.AttnBlock) if cfg.remat else attention.AttnBlock
    cross_cls = nn.remat(attention.CrossAttnBlock) if cfg.remat else attention.CrossAttnBlock

    def res_block(h, out_channels, name):
      block = res_cls(
        out_channels, cfg.dropout, cfg.num_groups, dtype, cfg.conv, cfg.fast, name=name
      )
      return block(h, temb, train, dropout_keys)

    def attn_block(h, name):
      block = attn_cls(cfg.num_heads, cfg.num_groups, dtype, cfg.attention, cfg.fast, name=name)
      return block(h)

    def cross_attn_block(h, name, middle=False):
      if not cross or not (middle or h.shape[1] in cfg.cross_attn_resolutions):
        return h
      block = cross_cls(cfg.num_heads, cfg.num_groups, dtype, cfg.attention, cfg.fast, name=name)
      return block(h, context, context_mask)

    num_levels = len(cfg.channel_mult)
    # Down path; `skips` collects every output that the up path concatenates back in.
    skips = [layers.conv3x3(cfg.channels, dtype, "conv_in", conv=cfg.conv)(x)]
    for level, mult in enumerate(cfg.channel_mult):
      for i in range(cfg.num_res_blocks):
        h = res_block(skips[-1], cfg.channels * mult, f"down_{level}_block_{i}")
        if h.shape[1] in cfg.attn_resolutions:
          h = attn_block(h, f"down_{level}_attn_{i}")
        h = cross_attn_block(h, f"down_{level}_cross_attn_{i}")
        skips.append(h)
      if level != num_levels - 1:
        down = layers.Downsample(cfg.resamp_with_conv, dtype, name=f"down_{level}_downsample")
        skips.append(down(skips[-1]))

    h = res_block(skips[-1], None, "mid_block_1")
    h = attn_block(h, "mid_attn_1")
    h = cross_attn_block(h, "mid_cross_attn_1", middle=True)
    h = res_block(h, None, "mid_block_2")

    for level in reversed(range(num_levels)):
      for i in range(cfg.num_res_blocks + 1):
        skip = skips.pop()
        h = (h, skip) if cfg.fast.skips_in_parts else jnp.concatenate([h, skip], axis=-1)
        h = res_block(h, cfg.channels * cfg.channel_mult[level], f"up_{level}_block_{i}")
        if h.shape[1] in cfg.attn_resolutions:
          h = attn_block(h, f"up_{level}_attn_{i}")
        h = cross_attn_block(h, f"up_{level}_cross_attn_{i}")
      if level != 0:
        up = layers.Upsample(
          cfg.resamp_with_conv, dtype, cfg.subpixel_upsample, name=f"up_{level}_upsample"
        )
        h = up(h)
    assert not skips, "every down-path output must be consumed by the up path"

    h = layers.group_norm(cfg.num_groups, dtype, "norm_out", "swish", cfg.fast)(h)
    h = layers.conv3x3(cfg.out_channels * p * p, dtype, "conv_out", zero=True, conv=cfg.conv)(h)
    if p > 1:
      h = layers.depth_to_space(h, p)
    return h.astype(jnp.float32)


class TextUNet(nn.Module):
  """A text encoder and a U-Net with cross-attention, trained together: eps_theta(x_t, t, y).

  The encoder turns the prompt's tokens into embeddings tau(y) [B, L, D]; the U-Net attends to
  them (with the padding mask) in its cross-attention layers. Parameters: {"text_encoder": ...,
  "unet": ...}.

  Attributes:
    config: the U-Net's hyper-parameters (with cross_attn_resolutions).
    text: the encoder's hyper-parameters.
  """

  config: UNetConfig
  text: TextEncoderConfig

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, train: bool = False, *, tokens: jax.Array, **kwargs
  ) -> jax.Array:
    """Predicts the model output for noisy images given prompts.

    Args:
      x, t, train: as for `UNet`.
      tokens: [B, L] int32 token ids, PAD_ID (0) after the prompt; L <= text.max_length.
      **kwargs: passed on to the U-Net (labels, for a model that has both).

    Returns:
      [B, H, W, out_channels] float32.
    """
    chex.assert_rank(tokens, 2)
    mask = tokens != PAD_ID
    context = TextEncoder(self.text, name="text_encoder")(tokens, mask, train=train)
    return UNet(self.config, name="unet")(x, t, train, context=context, context_mask=mask, **kwargs)
