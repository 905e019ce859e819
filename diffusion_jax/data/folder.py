"""A directory of image files as a random-access source.

Layout: `ROOT/<class>/**/<image>` gives one class per sub-folder (sorted names, so labels do not
depend on the file system), and images directly in `ROOT` form one more class named ".". The tree
is listed once, at construction, where files PIL cannot open are skipped with a warning; images
are decoded on access.

A folder may caption its images (a metadata.jsonl or metadata.csv, or a .txt beside each image;
see `captions`): it then trains text-conditional models, and an image without a caption is skipped
with a warning.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from diffusion_jax import text
from diffusion_jax.data import captions as captions_lib
from diffusion_jax.runtime.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
ROOT_CLASS = "."
# Transparent pixels are composited over this colour (white, like a page), never dropped: the
# colour stored under alpha 0 is arbitrary (often black) and would otherwise leak into the image.
ALPHA_BACKGROUND = (255, 255, 255)
# Grey modes whose values are 16-bit (PNG); PIL's own conversion to RGB clips them at 255.
_WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_NAMED = 5  # bad files named in a warning or an error; the rest are counted
# The last folder checked: (root, digest of its files' paths, sizes and times) -> its unreadable
# files. Training builds the source twice (an early check, then the input pipeline); the second
# build then costs a stat per file instead of a header read, and does not warn again.
_last_check: dict[tuple[str, bytes], dict[str, str]] = {}


def _to_rgb(image: Image.Image) -> Image.Image:
  """Converts an image of any mode to 8-bit RGB.

  16-bit grey is scaled (65535 -> 255, rounded), palettes are expanded, and transparency (an
  alpha channel or a transparent colour) is composited over `ALPHA_BACKGROUND`.
  """
  if image.mode in _WIDE_GREY_MODES:
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    grey = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    key = image.info.get("transparency")
    if isinstance(key, int):
      alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
      grey = Image.merge("LA", (grey, alpha))
    image = grey
  if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
    background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
    image = Image.alpha_composite(background, image.convert("RGBA"))
  return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_center_crop(image: Image.Image, size: int) -> np.ndarray:
  """Scales the shorter side to `size` and crops the centre square.

  Args:
    image: a PIL image of any size and mode (converted by `_to_rgb`); smaller ones are upscaled.
    size: side of the output in pixels.

  Returns:
    uint8 [size, size, 3] in [0, 255].
  """
  image = _to_rgb(image)
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


def _describe(exc: BaseException) -> str:
  """The exception as one line: its type and the first line of its message."""
  lines = str(exc).splitlines()
  return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _open_error(path: str) -> str | None:
  """Why PIL cannot open `path`, or None if it can.

  Only the header is read (about 0.1 ms a file, half a full decode; `verify()` would read all the
  data of large PNGs and still pass truncated JPEGs), so this catches non-images, empty files and
  broken headers; damaged pixel data is found when the image is decoded.
  """
  try:
    with Image.open(path) as image:
      if min(image.size) < 1:
        return f"empty image of size {image.size}"
  except Image.UnidentifiedImageError:
    return "not an image format PIL knows"
  except Exception as exc:  # Any failure, whatever the plugin raises, means the file is unusable.
    return _describe(exc)
  return None


def _find_unreadable(root: str, files: list[str]) -> tuple[dict[str, str], bool]:
  """Returns ({file: why PIL cannot open it}, whether it was computed now rather than cached)."""
  digest = hashlib.blake2b()
  for file in files:
    try:
      stat = os.stat(file)
      digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:  # A broken link, say: _open_error says why.
      digest.update(f"{file}\0\n".encode())
  key = (root, digest.digest())
  if key in _last_check:
    return _last_check[key], False
  unreadable = {}
  for file in files:
    reason = _open_error(file)
    if reason is not None:
      unreadable[file] = reason
  _last_check.clear()
  _last_check[key] = unreadable
  return unreadable, True


def _name_some(problems: list[tuple[str, str]]) -> str:
  """The first few (file, reason) pairs and a count of the rest, on one line."""
  text = "; ".join(f"{name!r} ({reason})" for name, reason in problems[:_NAMED])
  more = len(problems) - _NAMED
  return text + (f"; and {more} more" if more > 0 else "")


class FolderSource:
  """Random-access source over the images of a directory tree.

  Attributes:
    num_classes: number of classes (sub-folders holding images, plus "." for root images).
    class_names: sorted class names; label i is class_names[i].
    paths: the image paths, in index order (sorted by class, then by relative path).
    captioned: whether the folder captions its images. Only then does the source have
      `caption(index, rng)` and `caption_words()`, which `text.make_captioner` and
      `text.caption_words` use in place of class-name captions.
  """

  def __init__(self, path: str, image_size: int):
    """Lists the images and skips, with one warning, the files PIL cannot open.

    In a captioned folder, images without a caption (or with one holding no word) are skipped
    too, with one warning, and metadata rows naming no image with another; a caption in a
    metadata file wins over a .txt file beside the image.

    Args:
      path: the root directory (the `data.path` field).
      image_size: side of the square images returned, in pixels.

    Raises:
      ConfigError: the path is empty, missing, not a directory or holds no readable images; a
        captioned folder has a malformed metadata file or no readable image with a caption.
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

    # Skipping depends only on the files' bytes, so every process (and every run) keeps the same
    # images in the same order.
    files = [file for name in sorted(groups) for file in sorted(groups[name])]
    captions = captions_lib.read_captions(path, files)
    unreadable, fresh = _find_unreadable(path, files)
    problems = [(os.path.relpath(file, path), reason) for file, reason in unreadable.items()]
    readable: dict[str, list[str]] = {}
    for name in sorted(groups):
      kept = [file for file in sorted(groups[name]) if file not in unreadable]
      if kept:
        readable[name] = kept
    if not readable:
      raise ConfigError(
        f"data.path={path!r} holds no readable images: all {len(problems)} files with image "
        f"extensions fail to open: {_name_some(problems)}: {fix}."
      )
    if problems and fresh:
      logging.warning(
        "data.path=%r: skipped %d of %d files that are not readable images: %s.",
        path,
        len(problems),
        len(files),
        _name_some(problems),
      )

    if captions is not None:
      readable = self._keep_captioned(path, readable, captions, fresh or captions.fresh)

    self.class_names = sorted(readable)
    self.num_classes = len(self.class_names)
    self.paths: list[str] = []
    labels = []
    for label, name in enumerate(self.class_names):
      self.paths.extend(readable[name])
      labels.extend([label] * len(readable[name]))
    self._labels = np.asarray(labels, dtype=np.int32)
    self._image_size = int(image_size)
    self.captioned = captions is not None
    if self.captioned:
      self._captions = [captions.texts[file] for file in self.paths]
      # Set only here: the text module gives class-name captions to sources without them.
      self.caption = self._caption
      self.caption_words = self._caption_words

  @staticmethod
  def _keep_captioned(
    path: str, readable: dict[str, list[str]], captions: captions_lib.Captions, warn: bool
  ) -> dict[str, list[str]]:
    """`readable` without the images that have no caption with a word in it."""
    problems = []
    kept: dict[str, list[str]] = {}
    for name, files in readable.items():
      for file in files:
        caption = captions.texts.get(file)
        if caption is not None and text.split_words(caption):
          kept.setdefault(name, []).append(file)
        else:
          why = "no caption" if caption is None else f"caption {caption!r} has no word"
          why = "empty caption" if caption == "" else why
          problems.append((os.path.relpath(file, path), why))
    if not kept:
      raise ConfigError(
        f"data.path={path!r} has captions but none of its {len(problems)} readable images has "
        f"one: {_name_some(problems)}: {captions_lib.HOW_TO_CAPTION}."
      )
    if problems and warn:
      logging.warning(
        "data.path=%r: skipped %d images without a caption, so that none trains with an empty "
        "one: %s.",
        path,
        len(problems),
        _name_some(problems),
      )
    return kept

  def _caption(self, index: int, rng: np.random.Generator) -> str:
    """The caption of image `index` (`rng` is unused: each image has one caption)."""
    del rng
    return self._captions[int(index)]

  def _caption_words(self) -> list[str]:
    """Every word of the captions, lower-cased and split as `text.split_words` does, sorted."""
    return sorted({word for caption in self._captions for word in text.split_words(caption)})

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    """Decodes image `index`.

    Args:
      index: int in [0, len(self)).

    Returns:
      {"image": uint8 [S, S, 3] in [0, 255], "label": int32 scalar in [0, num_classes)}.

    Raises:
      ConfigError: the file opened at listing but its data does not decode (e.g. truncated);
        stopping names it, where substituting another image would silently change the data.
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
    except Exception as exc:  # Whatever PIL raises for a broken file, the file is at fault.
      raise ConfigError(
        f"data.path holds an unreadable image {path!r} ({_describe(exc)}): remove or replace "
        f"the file."
      ) from None
    return {"image": pixels, "label": self._labels[index]}
