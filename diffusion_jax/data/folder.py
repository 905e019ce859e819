"""A directory of image files as a random-access source.

Layout: `ROOT/<class>/**/<image>` gives one class per sub-folder (sorted names, so labels do not
depend on the file system), and images directly in `ROOT` form one more class named ".". The tree
is listed once, at construction; images are decoded on access.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from diffusion_jax.runtime.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
ROOT_CLASS = "."


def resize_and_center_crop(image: Image.Image, size: int) -> np.ndarray:
  """Scales the shorter side to `size` and crops the centre square.

  Args:
    image: a PIL image of any size and mode.
    size: side of the output in pixels.

  Returns:
    uint8 [size, size, 3] in [0, 255].
  """
  if image.mode != "RGB":
    image = image.convert("RGB")
  w, h = image.size
  if (w, h) != (size, size):
    # Resizing only the centre square of the source is the same as resizing the shorter side and
    # cropping, in one pass. Bicubic in PIL widens its kernel when it shrinks, so it antialiases.
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    image = image.resize(
      (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )
  return np.asarray(image, dtype=np.uint8)


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(directory: str) -> list[str]:
  """Returns the image paths under `directory` (recursively), relative to it, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel = os.path.relpath(dirpath, directory)
    for name in filenames:
      if _is_image(name):
        found.append(name if rel == "." else os.path.join(rel, name))
  return sorted(found)


class FolderSource:
  """Random-access source over the images of a directory tree.

  Attributes:
    num_classes: number of classes (sub-folders holding images, plus "." for root images).
    class_names: sorted class names; label i is class_names[i].
    paths: the image paths, in index order (sorted by class, then by relative path).
  """

  def __init__(self, path: str, image_size: int):
    """Lists the images.

    Args:
      path: the root directory (the `data.path` field).
      image_size: side of the square images returned, in pixels.

    Raises:
      ConfigError: the path is empty, missing, not a directory or holds no images.
    """
    fix = "set --config.data.path=DIR to a directory of images (class sub-folders give labels)"
    if not path:
      raise ConfigError(f"data.path is empty but data.dataset='folder': {fix}.")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
      raise ConfigError(f"data.path={path!r} does not exist: {fix}.")
    if not os.path.isdir(path):
      raise ConfigError(f"data.path={path!r} is not a directory: {fix}.")

    groups: dict[str, list[str]] = {}
    with os.scandir(path) as entries:
      for entry in entries:
        if entry.name.startswith("."):
          continue
        if entry.is_dir():
          files = _list_images(entry.path)
          if files:
            groups[entry.name] = [os.path.join(entry.path, f) for f in files]
        elif _is_image(entry.name):
          groups.setdefault(ROOT_CLASS, []).append(entry.path)
    if not groups:
      raise ConfigError(
        f"data.path={path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}): {fix}."
      )
    self.class_names = sorted(groups)
    self.num_classes = len(self.class_names)
    self.paths: list[str] = []
    labels = []
    for label, name in enumerate(self.class_names):
      files = sorted(groups[name])
      self.paths.extend(files)
      labels.extend([label] * len(files))
    self._labels = np.asarray(labels, dtype=np.int32)
    self._image_size = int(image_size)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    """Decodes image `index`.

    Args:
      index: int in [0, len(self)).

    Returns:
      {"image": uint8 [S, S, 3] in [0, 255], "label": int32 scalar in [0, num_classes)}.
    """
    index = int(index)
    path = self.paths[index]
    try:
      with Image.open(path) as image:
        # JPEG can decode straight to a 1/2, 1/4 or 1/8 scale that is still >= the target
        # size, which makes large photos several times cheaper to read.
        image.draft("RGB", (self._image_size, self._image_size))
        if "exif" in image.info:
          # Camera photos store their rotation in EXIF; checking the raw block first keeps
          # the common case (no EXIF) free of parsing.
          image = ImageOps.exif_transpose(image)
        pixels = resize_and_center_crop(image, self._image_size)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for broken files.
      raise ConfigError(
        f"data.path holds an unreadable image {path!r} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}): remove or replace the file."
      ) from None
    return {"image": pixels, "label": self._labels[index]}
