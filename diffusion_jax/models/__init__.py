"""Flax noise-prediction networks and their construction from the config's `model` section.

This package never imports ml_collections: `make_model` and `check_model_config` read the section's
fields by attribute (or key, for a plain dict) and turn them into a frozen `UNetConfig`.
`Autoencoder` is latent diffusion's KL autoencoder (`autoencoder.py`), built from an
`AutoencoderConfig`; `LatentUNet` and `ClipTextModel` are Stable Diffusion's U-Net and text
encoder, which `diffusion_jax.pretrained` loads from published weights.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.tree_util import tree_map

from diffusion_jax.models.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from diffusion_jax.models.clip_text import ClipTextConfig, ClipTextModel
from diffusion_jax.models.fast import FastPaths
from diffusion_jax.models.inception import FIDInceptionV3
from diffusion_jax.models.latent_unet import LatentUNet, LatentUNetConfig
from diffusion_jax.models.text_encoder import TextEncoder, TextEncoderConfig, text_config_from
from diffusion_jax.models.unet import (
  CIFAR10_NUM_PARAMS,
  TextUNet,
  UNet,
  UNetConfig,
  unet_config_from,
)
from diffusion_jax.models.unet import check_image_size as _check_image_size

__all__ = [
  "CIFAR10_NUM_PARAMS",
  "CONDITIONING",
  "Autoencoder",
  "AutoencoderConfig",
  "ClipTextConfig",
  "ClipTextModel",
  "DiagonalGaussian",
  "FIDInceptionV3",
  "FastPaths",
  "LatentUNet",
  "LatentUNetConfig",
  "TextEncoder",
  "TextEncoderConfig",
  "TextUNet",
  "UNet",
  "UNetConfig",
  "check_model_config",
  "condition_kind",
  "in_chunks",
  "make_model",
]

# What a network is conditioned on: nothing, a class label, or a text prompt.
CONDITIONING = ("none", "class", "text")

_MODELS = ("unet",)


def _model_name(model_config: Any) -> str:
  if isinstance(model_config, UNetConfig):
    return "unet"
  if isinstance(model_config, Mapping):
    return model_config.get("name", "unet")
  return getattr(model_config, "name", "unet")


def _text_section(model_config: Any) -> Any:
  if isinstance(model_config, UNetConfig):
    return None
  if isinstance(model_config, Mapping):
    return model_config.get("text")
  return getattr(model_config, "text", None)


def condition_kind(model_config: Any) -> str:
  """What the network described by the `model` section is conditioned on.

  Returns:
    "text" when model.text.vocab_size > 0, "class" when model.num_classes > 0, else "none".

  Raises:
    ValueError: both are set, or cross-attention without text (or text without it).
  """
  unet = unet_config_from(model_config)
  text = text_config_from(_text_section(model_config))
  if text.vocab_size and unet.num_classes:
    raise ValueError(
      "model.num_classes and model.text.vocab_size are both set; a network is conditioned on "
      "labels or on text: set one of them to 0"
    )
  if text.vocab_size and not unet.cross_attn_resolutions:
    raise ValueError(
      "model.text.vocab_size > 0 needs model.cross_attn_resolutions (the feature-map sizes that "
      "attend to the text), e.g. (8, 4)"
    )
  if unet.cross_attn_resolutions and not text.vocab_size:
    raise ValueError(
      f"model.cross_attn_resolutions={unet.cross_attn_resolutions} needs a text encoder: set "
      "model.text.vocab_size, or () for no cross-attention"
    )
  if text.vocab_size:
    return "text"
  return "class" if unet.num_classes else "none"


def check_model_config(model_config: Any, image_size: int) -> None:
  """Validates the `model` section against the image size, before anything is compiled.

  Args:
    model_config: the config's `model` section (ConfigDict, dict or `UNetConfig`).
    image_size: `data.image_size`, the height and width of the training images in pixels.

  Raises:
    ValueError: a one-line message naming the offending field (`model.name`, `data.image_size`,
      `model.channel_mult`, `model.num_groups`, ...) and how to fix it.
  """
  name = _model_name(model_config)
  if name not in _MODELS:
    raise ValueError(f"model.name={name!r} is not a known model; valid choices: {_MODELS}.")
  unet = unet_config_from(model_config)
  _check_image_size(unet, int(image_size))
  condition_kind(model_config)
  low = unet.low_res_size
  if low and (low >= image_size or image_size % low):
    raise ValueError(
      f"model.low_res_size={low} must be a proper divisor of data.image_size={image_size} (the "
      f"low-resolution input averages blocks of data.image_size / low_res_size pixels), e.g. "
      f"{image_size // 4 or 1}"
    )


def make_model(model_config: Any) -> nn.Module:
  """Builds the noise-prediction network named by `model_config.name`.

  Args:
    model_config: the config's `model` section (ConfigDict, dict or `UNetConfig`).

  Returns:
    A linen module used as `module.init(key, x, t)` and
    `module.apply({"params": params}, x_t, t, train=False, rngs=None)` with x_t [B, H, W, C] float32
    roughly in [-1, 1] and t [B] int32/float32 timesteps, returning [B, H, W, out_channels]
    float32. `train=True` turns dropout on and needs `rngs={"dropout": key}`. A class-conditional
    network (model.num_classes > 0) also takes `labels=` [B] int32, a text-conditional one
    (model.text.vocab_size > 0) `tokens=` [B, L] int32 (see `condition_kind`). A
    super-resolution network (model.low_res_size > 0) also takes `low_res=` [B, h, w, C] and
    `aug_level=` [B] float32 (`core.super_resolution`).

  Raises:
    ValueError: unknown `model.name` or an invalid field (named in the message).
  """
  name = _model_name(model_config)
  if name not in _MODELS:
    raise ValueError(f"model.name={name!r} is not a known model; valid choices: {_MODELS}.")
  config = unet_config_from(model_config)
  if condition_kind(model_config) == "text":
    return TextUNet(config, text_config_from(_text_section(model_config)))
  return UNet(config)


def in_chunks(fn, chunk: int, num_devices: int = 1):
  """`fn(x, t, **kwargs)` applied to chunks of the batch one after another, in one program.

  On a CPU a 3x3 convolution on 32x32 maps runs about 15% faster at 8-16 images than at 64 (the
  activations stay in cache), so a large batch is cheaper in chunks. Every argument is split
  along its leading (batch) axis into chunks of `chunk` examples per device, mapped with
  `lax.map`, and the outputs are put back in order. Chunk i holds examples j * n + i (n chunks),
  so a batch sharded in contiguous blocks over `num_devices` devices stays where it is.

  Args:
    fn: a per-example function of a batch, (x [B, ...], t [B], **kwargs of [B, ...]) -> [B, ...].
    chunk: examples per chunk on each device; 0 (or a batch that does not split into whole
      chunks) calls `fn` once on the whole batch.
    num_devices: devices the batch is sharded over.

  Returns:
    A function with `fn`'s signature and results (equal up to float rounding).
  """

  def chunked(x, t, **kwargs):
    size = chunk * num_devices
    batch = x.shape[0]
    if chunk <= 0 or batch <= size or batch % size:
      return fn(x, t, **kwargs)
    n = batch // size
    # [B, ...] -> [n, size, ...] with chunk i = examples j * n + i.
    split = lambda a: jnp.swapaxes(a.reshape(size, n, *a.shape[1:]), 0, 1)
    chunks = (split(x), split(t), tree_map(split, kwargs))
    out = jax.lax.map(lambda a: fn(a[0], a[1], **a[2]), chunks)
    return jnp.swapaxes(out, 0, 1).reshape(batch, *out.shape[2:])

  return chunked
