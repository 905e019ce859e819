"""Any TensorFlow Datasets image data set as a random-access source.

Reading goes through `tfds.data_source` semantics (array_record files, decoded with NumPy), which
needs no TensorFlow. Preparing a data set the first time is `tfds_prepare.prepare`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from diffusion_jax.data.folder import resize_and_center_crop
from diffusion_jax.data.tfds_prepare import one_line, prepare
from diffusion_jax.runtime.errors import ConfigError

VALID_DATASETS_HINT = (
  'valid values are a tfds image data set name (e.g. "cifar10", "mnist"), "folder" or "shapes"'
)


class TfdsSource:
  """Random-access view of one split of a tfds image data set.

  Attributes:
    num_classes: classes of the "label" feature, or 1 when there is none.
    class_names: the label names (the data set name when there is no label).
  """

  def __init__(
    self,
    name: str,
    *,
    split: str = "train",
    image_size: int = 32,
    data_dir: str = "",
    manual_dir: str = "",
  ):
    """Opens the data set, preparing it first when it is not on disk yet.

    Args:
      name: tfds name, optionally with config and version ("cifar10", "celeb_a:2.1.0").
      split: tfds split string ("train", "test", "train[:90%]").
      image_size: side of the square images returned, in pixels.
      data_dir: tfds data directory; empty means tfds' default.
      manual_dir: directory holding the official archive(s), for offline preparation.

    Raises:
      ConfigError: unknown or non-image data set, unusable directories, or preparation failed.
    """
    # tfds is imported here, not at module level, because it takes about a second and most runs
    # (shapes, folders) never need it.
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    if manual_dir and not os.path.isdir(os.path.expanduser(manual_dir)):
      raise ConfigError(
        f"data.manual_dir={manual_dir!r} is not a directory: pass the directory that holds the "
        f"official archive of {name!r}, or leave data.manual_dir empty."
      )
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise ConfigError(f"data.dataset={name!r} is unknown: {VALID_DATASETS_HINT}.") from None
    except Exception as exc:  # Bad version or config strings surface as several error types.
      raise ConfigError(
        f"data.dataset={name!r} could not be opened ({one_line(exc)}): {VALID_DATASETS_HINT}."
      ) from None

    features = builder.info.features
    if "image" not in features:
      raise ConfigError(
        f"data.dataset={name!r} has no 'image' feature, so it is not an image data set: "
        f"{VALID_DATASETS_HINT}."
      )
    label_feature = features["label"] if "label" in features else None
    self._has_label = isinstance(label_feature, tfds.features.ClassLabel)
    if self._has_label:
      self.num_classes = int(label_feature.num_classes)
      self.class_names = list(label_feature.names)
    else:
      self.num_classes = 1
      self.class_names = [name]

    if not builder.is_prepared():
      prepare(builder, name, manual_dir)
    try:
      self._source = builder.as_data_source(split=split)
    except (ValueError, KeyError) as exc:
      if "split" in str(exc).lower():
        raise ConfigError(
          f"data.split={split!r} is not a split of {name!r} ({one_line(exc)}): use one of "
          f"{sorted(builder.info.splits)}."
        ) from None
      raise ConfigError(
        f"data.dataset={name!r} at {builder.data_dir} cannot be read ({one_line(exc)}): "
        f"prepare it with file_format='array_record' or set --config.data.data_dir elsewhere."
      ) from None
    except NotImplementedError:
      raise ConfigError(
        f"data.dataset={name!r} is prepared at {builder.data_dir} without random access "
        f"(tfrecord): re-prepare it with `tfds build {name} --file_format=array_record` or set "
        f"--config.data.data_dir to a fresh directory."
      ) from None
    self._image_size = int(image_size)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    """Reads and decodes example `index`.

    Args:
      index: int in [0, len(self)).

    Returns:
      {"image": uint8 [S, S, 3] in [0, 255], "label": int32 scalar in [0, num_classes)}.
    """
    example = self._source[int(index)]
    image = np.asarray(example["image"])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
      image = image[..., :3]
    if image.dtype != np.uint8:
      image = np.clip(image, 0, 255).astype(np.uint8)
    if image.shape[:2] != (self._image_size, self._image_size):
      image = resize_and_center_crop(Image.fromarray(image), self._image_size)
    label = np.int32(example["label"]) if self._has_label else np.int32(0)
    return {"image": image, "label": label}
