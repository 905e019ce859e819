"""Bad and unusual files in an image folder (data.dataset="folder"): each one decodes to the right
pixels, is skipped with a warning naming it, or stops the run with a one-line error."""

import io
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data.folder import FolderSource, resize_and_center_crop
from diffusion_jax.runtime.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 4  # image_size; the 4 x 4 test images are not resized, so their pixels compare exactly


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **options)
  return out.getvalue()


def rgb_png(colour=(1, 2, 3), size=(S, S)) -> bytes:
  return encode(Image.new("RGB", size, colour))


def noise(fmt: str) -> bytes:
  """A 64 x 64 image of random pixels, large enough that half of its bytes hold pixel data."""
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  return encode(Image.fromarray(pixels), fmt)


def over_white(rgb, alpha):
  """The documented alpha rule, computed independently: composite over white."""
  a = np.asarray(alpha, np.float64)[..., None] / 255
  return np.asarray(rgb, np.float64) * a + 255 * (1 - a)


GREY16 = np.tile(np.array([0, 257, 32768, 65535], np.uint16), (S, 1))
RGBA = np.zeros((S, S, 4), np.uint8)
RGBA[:] = (200, 100, 0, 64)
RGBA[0, 0] = (10, 20, 30, 255)
RGBA[0, 1] = (10, 20, 30, 0)
LA = np.zeros((S, S, 2), np.uint8)
LA[..., 0], LA[..., 1] = 90, np.arange(S * S).reshape(S, S) * 17
PALETTE = np.array([[255, 0, 0], [0, 128, 255], [7, 8, 9], [250, 240, 230]], np.uint8)
INDICES = np.arange(S * S, dtype=np.uint8).reshape(S, S) % 4


def palette_image(fmt: str = "PNG", **options) -> bytes:
  image = Image.new("P", (S, S))
  image.putpalette(PALETTE.reshape(-1).tolist())
  image.putdata(INDICES.reshape(-1).tolist())
  return encode(image, fmt, **options)


def expect_palette(transparent=None):
  rgb = PALETTE[INDICES].astype(np.float64)
  if transparent is not None:
    rgb[INDICES == transparent] = 255
  return rgb


@dataclass
class Decoded:
  """The folder's only image decodes to `pixels` (within `atol`)."""

  pixels: np.ndarray
  atol: int = 0


@dataclass
class Skipped:
  """The files `names` are skipped with a warning naming each; `kept` images remain."""

  names: tuple
  kept: int


@dataclass
class Ignored:
  """The files are ignored without a warning; `kept` images remain."""

  kept: int


@dataclass
class ListError:
  """Construction stops with a one-line ConfigError naming the folder and `names`."""

  names: tuple


@dataclass
class DecodeError:
  """Listing keeps the file; decoding image `index` stops with a one-line ConfigError naming it."""

  index: int
  name: str
  reason: str


CASES = {
  "truncated_png": (
    {"a.png": rgb_png(), "b.png": noise("PNG")[:1500]},
    DecodeError(1, "b.png", "truncated"),
  ),
  "truncated_jpeg": (
    {"a.png": rgb_png(), "b.jpg": noise("JPEG")[:2000]},
    DecodeError(1, "b.jpg", "truncated"),
  ),
  "corrupt_png_data": (
    {"a.png": rgb_png(), "b.png": (lambda d: d[:200] + bytes(100) + d[300:])(noise("PNG"))},
    DecodeError(1, "b.png", "OSError"),
  ),
  "broken_header": ({"a.png": rgb_png(), "b.png": rgb_png()[:20]}, Skipped(("b.png",), 1)),
  "text_as_png": (
    {"a.png": rgb_png(), "cat/x.png": b"hello, not an image", "cat/y.jpg": b""},
    Skipped(("x.png", "y.jpg"), 1),
  ),
  "non_image_extensions": (
    {"a.png": rgb_png(), "notes.txt": b"x", "sub/data.csv": b"1,2"},
    Ignored(1),
  ),
  "grey_L": ({"a.png": encode(Image.new("L", (S, S), 77))}, Decoded(np.full((S, S, 3), 77))),
  "grey_alpha_LA": (
    {"a.png": encode(Image.fromarray(LA, "LA"))},
    Decoded(over_white(LA[..., [0, 0, 0]], LA[..., 1]), 1),
  ),
  "rgba": (
    {"a.png": encode(Image.fromarray(RGBA))},
    Decoded(over_white(RGBA[..., :3], RGBA[..., 3]), 1),
  ),
  "rgba_webp": (
    {"a.webp": encode(Image.fromarray(RGBA), "WEBP", lossless=True)},
    Decoded(over_white(RGBA[..., :3], RGBA[..., 3]), 1),
  ),
  "grey_16_bit": (
    {"a.png": encode(Image.fromarray(GREY16))},
    Decoded(np.repeat(np.tile([0, 1, 128, 255], (S, 1))[..., None], 3, -1), 1),
  ),
  "palette": ({"a.png": palette_image()}, Decoded(expect_palette())),
  "palette_transparent": ({"a.png": palette_image(transparency=1)}, Decoded(expect_palette(1))),
  "palette_transparent_gif": (
    {"a.gif": palette_image("GIF", transparency=2)},
    Decoded(expect_palette(2)),
  ),
  "smaller_than_image_size": (
    {"a.png": rgb_png((10, 200, 30), size=(3, 2))},
    Decoded(np.full((S, S, 3), (10, 200, 30)), 1),
  ),
  "broken_link": ({"a.png": rgb_png(), "b.png": "missing.png"}, Skipped(("b.png",), 1)),
  "class_of_only_bad_files": (
    {"cat/a.png": rgb_png(), "dog/b.png": b"text", "dog/c.png": b""},
    Skipped(("b.png", "c.png"), 1),
  ),
  "empty_folder": ({}, ListError(("holds no images",))),
  "only_bad_files": (
    {"a.png": b"text", "b.jpg": b"", "c/d.png": rgb_png()[:20]},
    ListError(("a.png", "b.jpg", "d.png")),
  ),
}


def write_folder(root, files):
  """Writes {relative path: bytes, or str for a symbolic link to that target} under root."""
  for name, data in files.items():
    os.makedirs(os.path.dirname(root / name), exist_ok=True)
    if isinstance(data, str):
      os.symlink(data, root / name)
    else:
      (root / name).write_bytes(data)


def assert_one_line(excinfo, *parts):
  message = str(excinfo.value)
  assert "\n" not in message and "data.path" in message
  for part in parts:
    assert part in message


@pytest.mark.parametrize("case", CASES)
def test_bad_and_unusual_files(tmp_path, caplog, case):
  files, outcome = CASES[case]
  root = tmp_path / "images"
  os.makedirs(root)
  write_folder(root, files)
  if isinstance(outcome, ListError):
    with pytest.raises(ConfigError) as excinfo:
      FolderSource(str(root), S)
    assert_one_line(excinfo, str(root), *outcome.names)
    return
  with caplog.at_level("WARNING"):
    source = FolderSource(str(root), S)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  if isinstance(outcome, Skipped):
    assert len(source) == outcome.kept and len(warnings) == 1
    assert str(root) in warnings[0] and "\n" not in warnings[0]
    for name in outcome.names:
      assert name in warnings[0] and all(name not in p for p in source.paths)
    assert source.num_classes == 1 and int(source[0]["label"]) == 0
  else:
    assert warnings == []
  if isinstance(outcome, Ignored):
    assert len(source) == outcome.kept
  if isinstance(outcome, DecodeError):
    assert len(source) == 2 and source[0]["image"].shape == (S, S, 3)
    with pytest.raises(ConfigError) as excinfo:
      source[outcome.index]
    assert_one_line(excinfo, outcome.name, outcome.reason)
  if isinstance(outcome, Decoded):
    image = source[0]["image"]
    assert image.shape == (S, S, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image, outcome.pixels, atol=outcome.atol)


@pytest.mark.parametrize(
  "image",
  [
    Image.fromarray(GREY16),  # "I;16", what Pillow reads from 16-bit grey PNG
    Image.frombytes("I;16B", (S, S), GREY16.astype(">u2").tobytes()),
    Image.fromarray(GREY16.astype(np.int32)),  # "I", what older Pillow reads from the same PNG
  ],
  ids=lambda image: image.mode,
)
def test_16_bit_grey_modes_scale_to_8_bits(image):
  pixels = resize_and_center_crop(image, S)
  np.testing.assert_array_equal(
    pixels, np.repeat(np.tile([0, 1, 128, 255], (S, 1))[..., None], 3, -1)
  )


def test_listing_again_warns_once_and_sees_fixed_files(tmp_path, caplog):
  """Training lists the folder twice: the second listing reuses the check unless files changed."""
  write_folder(tmp_path, {"a.png": rgb_png(), "b.png": b"text"})
  with caplog.at_level("WARNING"):
    assert len(FolderSource(str(tmp_path), S)) == 1
    assert len(FolderSource(str(tmp_path), S)) == 1
  assert caplog.text.count("'b.png'") == 1
  (tmp_path / "b.png").write_bytes(rgb_png((5, 6, 7)))
  source = FolderSource(str(tmp_path), S)
  np.testing.assert_array_equal(source[1]["image"], np.full((S, S, 3), (5, 6, 7)))


def test_cli_folder_of_only_bad_files_ends_in_one_line(tmp_path):
  """The user sees `error: ...` naming the folder and no traceback."""
  root = tmp_path / "images"
  write_folder(root, {"a.png": b"text", "b.jpg": b""})
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "main.py"),
      "--config=shapes",
      "--config.data.dataset=folder",
      f"--config.data.path={root}",
      f"--workdir={tmp_path / 'run'}",
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    cwd=REPO,
    timeout=300,
  )
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and str(root) in last and "a.png" in last
