"""Flax noise-prediction networks and their construction from the config's `model` section.

This package never imports ml_collections: `make_model` and `check_model_config` read the section's
fields by attribute (or key, for a plain dict) and turn them into a frozen `UNetConfig`.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from diffusion_jax.models.unet import CIFAR10_NUM_PARAMS, UNet, UNetConfig, unet_config_from
from diffusion_jax.models.unet import check_image_size as _check_image_size

__all__ = [
  "CIFAR10_NUM_PARAMS",
  "UNet",
  "UNetConfig",
  "check_model_config",
  "make_model",
]

_MODELS = ("unet",)


def _model_name(model_config: Any) -> str:
  if isinstance(model_config, UNetConfig):
    return "unet"
  if isinstance(model_config, Mapping):
    return model_config.get("name", "unet")
  return getattr(model_config, "name", "unet")


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
  _check_image_size(unet_config_from(model_config), int(image_size))


def make_model(model_config: Any) -> nn.Module:
  """Builds the noise-prediction network named by `model_config.name`.

  Args:
    model_config: the config's `model` section (ConfigDict, dict or `UNetConfig`).

  Returns:
    A linen module used as `module.init(key, x, t)` and
    `module.apply({"params": params}, x_t, t, train=False, rngs=None)` with x_t [B, H, W, C] float32
    roughly in [-1, 1] and t [B] int32/float32 timesteps, returning [B, H, W, out_channels]
    float32. `train=True` turns dropout on and needs `rngs={"dropout": key}`.

  Raises:
    ValueError: unknown `model.name` or an invalid field (named in the message).
  """
  name = _model_name(model_config)
  if name not in _MODELS:
    raise ValueError(f"model.name={name!r} is not a known model; valid choices: {_MODELS}.")
  return UNet(unet_config_from(model_config))
