"""Sample grids and exports: uint8 images to a PNG grid and an npz."""

import math
import os

import numpy as np
from PIL import Image


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


def save_grid(path: str, images: np.ndarray, columns: int | None = None) -> str:
  """Writes `images` (uint8 [N, H, W, C]) as one PNG grid at `path`; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  grid = make_grid(images, columns)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def save_npz(path: str, images: np.ndarray, **extra) -> str:
  """Writes uint8 [N, H, W, C] samples (key "samples") and `extra` arrays to `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, samples=np.asarray(images, dtype=np.uint8), **extra)
  return path
