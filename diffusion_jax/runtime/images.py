"""Sample grids and exports: uint8 images to a PNG grid and an npz."""

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles images into one picture, row by row, with `pad` dark pixels between them.

  Args:
    images: uint8 [N, H, W, C] with C in {1, 3}.
    columns: images per row; default ceil(sqrt(N)).
    pad: pixels between neighbouring images and around the border.

  Returns:
    uint8 [rows * (H + pad) + pad, columns * (W + pad) + pad, C].
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"expected uint8 [N, H, W, C] images, got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  columns = columns or max(1, math.ceil(math.sqrt(n)))
  rows = max(1, math.ceil(n / columns))
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top : top + h, left : left + w] = image
  return grid


# Grids show each image at least this many pixels wide and high: 16x16 samples are too small to
# judge at their own size.
MIN_VIEW_SIZE = 64


def upscale(images: np.ndarray, min_size: int = MIN_VIEW_SIZE) -> np.ndarray:
  """Nearest-neighbour upscaling by the smallest integer factor that makes H and W >= min_size.

  Args:
    images: [..., H, W, C].

  Returns:
    [..., k H, k W, C], k = max(1, ceil(min_size / min(H, W))); every source pixel becomes a
    k x k block.
  """
  images = np.asarray(images)
  h, w = images.shape[-3:-1]
  k = max(1, math.ceil(min_size / min(h, w)))
  return images if k == 1 else images.repeat(k, axis=-3).repeat(k, axis=-2)


def save_grid(path: str, images: np.ndarray, columns: int | None = None) -> str:
  """Writes `images` (uint8 [N, H, W, C]) as one PNG grid at `path`, each image upscaled to at
  least MIN_VIEW_SIZE pixels (`upscale`); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  grid = make_grid(upscale(images), columns)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def save_npz(path: str, images: np.ndarray, **extra) -> str:
  """Writes uint8 [N, H, W, C] samples and `extra` arrays to `path`.

  The samples are stored under "samples" and under "arr_0", the key that guided-diffusion's
  evaluator and other FID tools read.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  samples = np.asarray(images, dtype=np.uint8)
  np.savez(path, samples=samples, arr_0=samples, **extra)
  return path


def save_labelled_grid(path: str, images: np.ndarray, labels: list[str], pad: int = 2) -> str:
  """Writes one row per label, the label's text on the left of its images, as a PNG.

  Args:
    path: the PNG's path.
    images: uint8 [R, N, H, W, C]: N images for each of the R labels.
    labels: R strings (an empty one is written as "(unconditional)").
    pad: pixels between images.

  Returns:
    The path. Images are upscaled to at least MIN_VIEW_SIZE pixels (`upscale`).
  """
  images = np.asarray(images)
  if images.ndim != 5 or len(labels) != images.shape[0]:
    raise ValueError(f"expected [R, N, H, W, C] images for {len(labels)} labels: {images.shape}")
  images = upscale(images)
  rows = [make_grid(row, columns=row.shape[0], pad=pad) for row in images]
  texts = [label or "(unconditional)" for label in labels]
  font = ImageFont.load_default()
  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_width = max(int(draw.textlength(t, font=font)) for t in texts) + 2 * pad
  height, width = rows[0].shape[:2]
  canvas = Image.new("RGB", (text_width + width, len(rows) * (height - pad) + pad))
  draw = ImageDraw.Draw(canvas)
  for r, (row, label) in enumerate(zip(rows, texts, strict=True)):
    top = r * (height - pad)
    tile = row if row.shape[-1] == 3 else np.repeat(row, 3, axis=-1)
    canvas.paste(Image.fromarray(tile), (text_width, top))
    draw.text((pad, top + height // 2), label, fill=(230, 230, 230), font=font, anchor="lm")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)
  return path


def save_pngs(directory: str, images: np.ndarray) -> list[str]:
  """Writes each image (uint8 [N, H, W, C]) at its own size as DIRECTORY/000000.png, ...: the
  layout FID tools read. Returns the paths."""
  os.makedirs(directory, exist_ok=True)
  images = np.asarray(images, dtype=np.uint8)
  digits = max(6, len(str(len(images) - 1)))
  paths = []
  for i, image in enumerate(images):
    path = os.path.join(directory, f"{i:0{digits}d}.png")
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    paths.append(path)
  return paths
