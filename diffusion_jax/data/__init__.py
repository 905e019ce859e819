"""Input pipelines: tfds data sets, image folders and the generated shapes set, fed by grain."""

from diffusion_jax.data.config import DataConfig
from diffusion_jax.data.pipeline import (
  denormalize_images,
  example_stream,
  make_source,
  make_train_iterator,
  normalize_images,
)

__all__ = [
  "DataConfig",
  "denormalize_images",
  "example_stream",
  "make_source",
  "make_train_iterator",
  "normalize_images",
]
