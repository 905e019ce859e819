"""Tests of diffusion_jax.images: the grid layout, pixel conversion and the PNG / npz exports."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import denormalize_images, normalize_images
from diffusion_jax.experiment import generate
from diffusion_jax.runtime import images


def distinct_images(n, h, w, c, seed=0):
  """uint8 [n, h, w, c] with no zero pixel, so padding (0) is told apart from image content."""
  return np.random.default_rng(seed).integers(1, 256, (n, h, w, c), dtype=np.uint8)


# ---------------------------------------------------------------- make_grid


@pytest.mark.parametrize(
  "n, h, w, c, columns, pad",
  [
    (5, 3, 4, 3, None, 2),  # default columns ceil(sqrt(5)) = 3: 2 rows, last one partly empty
    (4, 2, 2, 3, None, 2),  # a full 2 x 2 grid
    (3, 4, 3, 1, 1, 0),  # one column, no padding, grey-scale
    (7, 2, 5, 3, 4, 1),
    (2, 3, 3, 3, 5, 2),  # more columns than images: one row
    (1, 5, 5, 3, None, 3),
  ],
)
def test_make_grid_layout(n, h, w, c, columns, pad):
  batch = distinct_images(n, h, w, c)
  grid = images.make_grid(batch, columns=columns, pad=pad)

  cols = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  assert grid.dtype == np.uint8
  assert grid.shape == (rows * (h + pad) + pad, cols * (w + pad) + pad, c)

  covered = np.zeros(grid.shape[:2], bool)
  for i in range(n):
    r, col = divmod(i, cols)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    np.testing.assert_array_equal(grid[top : top + h, left : left + w], batch[i])
    covered[top : top + h, left : left + w] = True
  # Everything outside the images (padding and empty cells) is zero.
  assert covered.sum() == n * h * w
  assert not grid[~covered].any()


def test_make_grid_rejects_non_uint8_or_wrong_rank():
  with pytest.raises(ValueError, match="uint8"):
    images.make_grid(np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    images.make_grid(np.zeros((4, 4, 3), np.uint8))


# ---------------------------------------------------------------- pixel conversion


def test_denormalize_images_inverts_normalize_images_on_every_pixel_value():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  x = normalize_images(pixels)
  assert x.dtype == np.float32
  assert x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(denormalize_images(x), pixels)
  np.testing.assert_array_equal(denormalize_images(x), pixels)


def test_denormalize_images_is_the_rounded_affine_map_clipped_to_pixels():
  x = np.random.default_rng(0).uniform(-1.5, 1.5, (2, 5, 5, 3)).astype(np.float32)
  out = denormalize_images(x)
  assert out.dtype == np.uint8 and out.shape == x.shape
  expected = np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255)
  # float32 arithmetic may land on the other side of a .5 tie only.
  assert np.abs(out.astype(np.int64) - expected).max() <= 1
  np.testing.assert_array_equal(
    denormalize_images(np.array([-3.0, -1.0, 0.0, 1.0, 3.0])), [0, 0, 128, 255, 255]
  )
  np.testing.assert_array_equal(out, denormalize_images(x))
  # denormalize_images is monotone: ordering of values is kept.
  flat = np.sort(x.ravel())
  assert np.all(np.diff(denormalize_images(flat).astype(np.int64)) >= 0)


# ---------------------------------------------------------------- exports


@pytest.mark.parametrize("c", [3, 1])
def test_save_grid_writes_a_png_of_the_grid(tmp_path, c):
  batch = distinct_images(6, 5, 4, c, seed=c)
  path = str(tmp_path / "new" / "dir" / "grid.png")
  assert images.save_grid(path, batch, columns=4) == path
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.mode == ("RGB" if c == 3 else "L")
    pixels = np.asarray(image)
  # 5x4 images are shown 16x as large (64x64 at least): each pixel a 16x16 block.
  big = images.upscale(batch)
  assert big.shape == (6, 80, 64, c)
  np.testing.assert_array_equal(big[:, ::16, ::16], batch)
  np.testing.assert_array_equal(big[:, 15::16, 15::16], batch)
  np.testing.assert_array_equal(pixels.reshape(pixels.shape[:2] + (c,)), images.make_grid(big, 4))


def test_upscale_leaves_large_images_alone():
  batch = distinct_images(2, 64, 70, 3)
  np.testing.assert_array_equal(images.upscale(batch), batch)
  # The smaller side decides: 33 < 64 doubles both.
  small = distinct_images(1, 33, 40, 3)
  np.testing.assert_array_equal(images.upscale(small), small.repeat(2, axis=1).repeat(2, axis=2))


def test_save_npz_round_trip(tmp_path):
  batch = distinct_images(3, 4, 4, 3)
  labels = np.array([2, 0, 1], np.int32)
  path = str(tmp_path / "out" / "samples.npz")
  assert images.save_npz(path, batch, labels=labels) == path
  with np.load(path) as f:
    assert sorted(f.files) == ["arr_0", "labels", "samples"]
    assert f["samples"].dtype == f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(f["samples"], batch)
    np.testing.assert_array_equal(f["arr_0"], batch)
    np.testing.assert_array_equal(f["labels"], labels)


def test_write_samples_names_and_contents(tmp_path):
  batch = distinct_images(5, 6, 6, 3)
  png, npz = generate.write_samples(str(tmp_path), "step_0000010", batch)
  assert png == f"{tmp_path}/samples/step_0000010.png"
  assert npz == f"{tmp_path}/samples/step_0000010.npz"
  with Image.open(png) as image:
    np.testing.assert_array_equal(np.asarray(image), images.make_grid(images.upscale(batch)))
  with np.load(npz) as f:
    np.testing.assert_array_equal(f["samples"], batch)


def test_save_pngs_writes_each_image_at_its_own_size(tmp_path):
  batch = distinct_images(3, 5, 7, 3)
  paths = images.save_pngs(str(tmp_path / "pngs"), batch)
  assert [os.path.basename(p) for p in paths] == ["000000.png", "000001.png", "000002.png"]
  for path, expected in zip(paths, batch, strict=True):
    with Image.open(path) as image:
      np.testing.assert_array_equal(np.asarray(image), expected)
