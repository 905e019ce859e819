"""The perceptual (LPIPS) term of the autoencoder's loss, from a local weights file only.

autoencoder.lpips_weights names the file `models/lpips.load_lpips` reads (made once from the
published VGG16 and LPIPS weights by benchmarks/convert_lpips.py); empty turns the term off.
Nothing is downloaded.
"""

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn

from diffusion_jax.runtime.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Perceptual:
  model: nn.Module  # (x, y) -> LPIPS [B], images in [-1, 1]
  variables: Any  # its variables, passed to the train step as an argument (not a constant)


def check(section) -> None:
  """Raises ConfigError on a bad perceptual field of the `autoencoder` section."""
  if section.perceptual_weight < 0:
    raise ConfigError(f"autoencoder.perceptual_weight={section.perceptual_weight} must be >= 0")
  path = section.lpips_weights
  if path and not os.path.isfile(path):
    raise ConfigError(
      f"autoencoder.lpips_weights={path!r}: no such file; make it once with "
      "benchmarks/convert_lpips.py from the VGG16 and LPIPS weights (README, Latent diffusion)"
    )


def enabled(section) -> bool:
  """Whether the config's `autoencoder` section adds the perceptual term."""
  return bool(section.lpips_weights) and section.perceptual_weight > 0


def load(section) -> Perceptual | None:
  """The LPIPS network of autoencoder.lpips_weights, or None when the term is off."""
  if not enabled(section):
    return None
  return _load(os.path.abspath(section.lpips_weights))


@functools.lru_cache(maxsize=2)
def _load(path: str) -> Perceptual:
  from diffusion_jax.models import lpips

  try:  # a damaged or foreign file is a one-line error
    model, params = lpips.load_lpips(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"autoencoder.lpips_weights: {e}") from None
  return Perceptual(model, {"params": params})
