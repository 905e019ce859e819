"""Tests of the data sources and the training input pipeline."""

import itertools
import os
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from diffusion_jax.data import (
  denormalize_images,
  example_stream,
  make_source,
  make_train_iterator,
  normalize_images,
  tfds_prepare,
)
from diffusion_jax.data import shapes as shapes_lib
from diffusion_jax.runtime.errors import ConfigError


def data_config(**overrides):
  """The default `data` section with overrides, as a plain namespace (any value type allowed)."""
  fields = default.get_config().data.to_dict()
  fields.update({"dataset": "shapes", "num_examples": 40, "image_size": 8, **overrides})
  return types.SimpleNamespace(**fields)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def train_batches(n, config=None, **kwargs):
  """The first n batches of make_train_iterator (B = 8, seed 0 unless given)."""
  kwargs = {"global_batch_size": 8, "seed": 0, **kwargs}
  return take(make_train_iterator(config or data_config(), **kwargs), n)


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def assert_config_error(excinfo, field):
  message = str(excinfo.value)
  assert "\n" not in message
  assert field in message


class CountingSource:
  """Example i is an image filled with i % 256 and label i: the source index is readable."""

  num_classes = 1
  class_names = ["all"]

  def __init__(self, n, size=4):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.zeros((self.size, self.size, 3), np.uint8)
    image[:, : self.size // 2] = i % 256  # Asymmetric, so a flip is visible.
    return {"image": image, "label": np.int32(i)}


# ------------------------------------------------------------------------------------ shapes


def test_shapes_are_deterministic_per_seed_and_index():
  a, b = shapes_lib.ShapesSource(50, 32, seed=3), shapes_lib.ShapesSource(50, 32, seed=3)
  other = shapes_lib.ShapesSource(50, 32, seed=4)
  for i in (0, 7, 49):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
  assert not all(np.array_equal(a[i]["image"], other[i]["image"]) for i in range(10))
  assert a[0]["label"] == a[a.num_classes]["label"]
  assert not np.array_equal(a[0]["image"], a[a.num_classes]["image"])  # Same class, new image.


@pytest.mark.parametrize("size", [8, 32, 48])
def test_shapes_dtype_shape_range(size):
  source = shapes_lib.ShapesSource(20, size)
  for i in range(len(source)):
    example = source[i]
    assert example["image"].shape == (size, size, 3) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32 and 0 <= example["label"] < source.num_classes
  with pytest.raises(IndexError):
    source[20]


def test_shapes_show_the_captioned_colour_on_a_dark_background():
  source = shapes_lib.ShapesSource(64, 32, seed=1)
  palette = np.array([shapes_lib.COLOUR_RGB[c] for c in shapes_lib.COLOURS], np.float32)
  for i in range(len(source)):
    example = source[i]
    image = example["image"].astype(np.float32)
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.max() < 50 and np.ptp(corners, axis=0).max() == 0  # plain, dark background
    bright = image[image.max(-1) > 120]
    # The shape covers a reasonable part of the image: neither a speck nor the whole frame.
    assert 0.04 < len(bright) / (32 * 32) < 0.7, (i, len(bright))
    nearest = shapes_lib.COLOURS[np.argmin(((palette - bright.mean(0)) ** 2).sum(-1))]
    assert example["caption"].split()[1] == nearest


def test_shapes_caption_label_and_attributes_agree():
  source = shapes_lib.ShapesSource(40, 32)
  counts = np.zeros(source.num_classes, int)
  for i in range(len(source)):
    example, attrs = source[i], source.attributes(i)
    assert example["caption"] == "a " + source.class_names[example["label"]]
    assert example["caption"] == f"a {attrs['colour']} {attrs['shape']}" == attrs["caption"]
    assert attrs["size"] in ("small", "large")
    assert attrs["position"] in (
      "top left", "top", "top right", "left", "centre", "right",
      "bottom left", "bottom", "bottom right",
    )  # fmt: skip
    assert attrs["description"].startswith(f"a {attrs['size']} {attrs['colour']} {attrs['shape']}")
    counts[example["label"]] += 1
  assert counts.min() >= 2  # Labels are balanced.


# ------------------------------------------------------------------------------------ tfds


@pytest.fixture
def hosts_reachable(monkeypatch):
  """tfds' mock_data replaces the download; the project's offline probe before it must pass."""
  monkeypatch.setattr(tfds_prepare, "_reachable", lambda *args, **kwargs: True)


def test_tfds_source_and_batches_from_mock_data(hosts_reachable):
  config = data_config(dataset="cifar10", image_size=32, random_flip=True)
  with tfds.testing.mock_data(num_examples=12):
    source = make_source(config)
    assert len(source) == 12 and source.num_classes == len(source.class_names) == 10
    example = source[3]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32 and 0 <= example["label"] < 10
    runs = [train_batches(3, config, seed=5) for _ in range(2)]
  assert_batches_equal(*runs)
  for batch in runs[0]:
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["image"].max() > batch["image"].min()


def test_tfds_grayscale_is_resized_to_three_channels(hosts_reachable):
  with tfds.testing.mock_data(num_examples=4):
    example = make_source(data_config(dataset="mnist", image_size=16))[0]
  assert example["image"].shape == (16, 16, 3)
  np.testing.assert_array_equal(example["image"][..., 0], example["image"][..., 2])


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "imdb_reviews"])
def test_tfds_unknown_or_non_image_dataset(name):
  with tfds.testing.mock_data(num_examples=2), pytest.raises(ConfigError) as excinfo:
    make_source(data_config(dataset=name))
  assert_config_error(excinfo, "data.dataset")
  assert '"folder"' in str(excinfo.value) and '"shapes"' in str(excinfo.value)


@pytest.mark.parametrize(
  "failure, expected",
  [
    (ImportError("No module named 'tensorflow'"), "needs TensorFlow"),
    (OSError("Temporary failure in name resolution"), "Temporary failure"),
  ],
)
def test_tfds_unprepared_dataset_says_what_to_do(
  tmp_path, monkeypatch, hosts_reachable, failure, expected
):
  def fail(*args, **kwargs):
    raise failure

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with pytest.raises(ConfigError) as excinfo:
    make_source(data_config(dataset="cifar10", data_dir=str(tmp_path)))
  assert_config_error(excinfo, "data.dataset")
  for hint in (expected, "manual_dir", "data_dir", "requirements-prepare.txt", "[prepare]"):
    assert hint in str(excinfo.value)


def test_tfds_manual_dir_must_exist(tmp_path):
  with pytest.raises(ConfigError) as excinfo:
    make_source(data_config(dataset="cifar10", manual_dir=str(tmp_path / "missing")))
  assert_config_error(excinfo, "data.manual_dir")


# ------------------------------------------------------------------------------------ folder


def write_image(path, size, centre_colour, side_colour=(0, 0, 255)):
  """A w x h image whose centre square has `centre_colour` and whose margins `side_colour`."""
  w, h = size
  pixels = np.zeros((h, w, 3), np.uint8)
  pixels[:] = side_colour
  side = min(w, h)
  top, left = (h - side) // 2, (w - side) // 2
  pixels[top : top + side, left : left + side] = centre_colour
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path)


def test_folder_source_labels_resizes_and_crops(tmp_path):
  write_image(tmp_path / "dog" / "b.png", (60, 40), (255, 0, 0))
  write_image(tmp_path / "dog" / "sub" / "a.png", (40, 64), (0, 255, 0))
  write_image(tmp_path / "cat" / "z.bmp", (12, 12), (200, 200, 0))
  write_image(tmp_path / "cat" / "y.jpg", (30, 20), (255, 255, 255))
  (tmp_path / "cat" / "notes.txt").write_text("not an image")
  os.makedirs(tmp_path / "empty")
  source = make_source(data_config(dataset="folder", path=str(tmp_path), image_size=16))
  assert source.class_names == ["cat", "dog"] and source.num_classes == 2
  assert [os.path.basename(p) for p in source.paths] == ["y.jpg", "z.bmp", "b.png", "a.png"]
  assert [int(source[i]["label"]) for i in range(4)] == [0, 0, 1, 1]
  for i, colour in [(1, (200, 200, 0)), (2, (255, 0, 0)), (3, (0, 255, 0))]:
    image = source[i]["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    # The margins are cropped away: the interior is the centre colour only.
    np.testing.assert_allclose(image[2:-2, 2:-2].reshape(-1, 3).mean(0), colour, atol=2)


def test_folder_root_images_form_one_class(tmp_path):
  for name in ("b.png", "a.webp", "c.gif"):
    write_image(tmp_path / name, (20, 20), (9, 9, 9))
  source = make_source(data_config(dataset="folder", path=str(tmp_path), image_size=8))
  assert source.num_classes == 1 and len(source) == 3
  assert [os.path.basename(p) for p in source.paths] == ["a.webp", "b.png", "c.gif"]
  assert source[2]["image"].shape == (8, 8, 3) and source[2]["label"] == 0


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "no_images"])
def test_folder_bad_path(tmp_path, kind):
  (tmp_path / "file.png").write_bytes(b"x")
  os.makedirs(tmp_path / "no_images" / "sub")
  path = {"empty": "", "missing": str(tmp_path / "nope"), "file": str(tmp_path / "file.png")}
  with pytest.raises(ConfigError) as excinfo:
    make_source(data_config(dataset="folder", path=path.get(kind, str(tmp_path / kind))))
  assert_config_error(excinfo, "data.path")


def test_folder_unreadable_image(tmp_path):
  write_image(tmp_path / "a.png", (8, 8), (1, 2, 3))
  # The header opens, so listing keeps the file; its truncated data fails only when decoded.
  write_image(tmp_path / "b.jpg", (64, 64), (9, 9, 9))
  (tmp_path / "b.jpg").write_bytes((tmp_path / "b.jpg").read_bytes()[:-50])
  source = make_source(data_config(dataset="folder", path=str(tmp_path)))
  with pytest.raises(ConfigError) as excinfo:
    source[1]
  assert_config_error(excinfo, "data.path")
  assert "b.jpg" in str(excinfo.value)


@pytest.mark.parametrize("size", [4, 31.5, "32", True])
def test_bad_image_size(size):
  with pytest.raises(ConfigError) as excinfo:
    make_source(data_config(image_size=size))
  assert_config_error(excinfo, "data.image_size")


def test_bad_num_examples():
  with pytest.raises(ConfigError) as excinfo:
    make_source(data_config(num_examples=0))
  assert_config_error(excinfo, "data.num_examples")


# ------------------------------------------------------------------------------------ pipeline


def test_each_epoch_is_a_permutation_that_depends_on_seed_and_epoch():
  n = 37
  stream = example_stream(CountingSource(n), seed=1, random_flip=False)
  epochs = [[int(stream[e * n + k]["label"]) for k in range(n)] for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(n))
  assert epochs[0] != epochs[1] != epochs[2]
  again = example_stream(CountingSource(n), seed=1, random_flip=False)
  assert [int(again[n + k]["label"]) for k in range(n)] == epochs[1]
  other = example_stream(CountingSource(n), seed=2, random_flip=False)
  assert [int(other[k]["label"]) for k in range(n)] != epochs[0]
  assert [int(stream[j]["index"]) for j in (0, 5, 2 * n + 3)] == [0, 5, 2 * n + 3]


def test_train_batches_cover_each_epoch_once():
  config = data_config(num_examples=24, random_flip=False)
  source = make_source(config)
  by_bytes = {source[i]["image"].tobytes(): i for i in range(len(source))}
  batches = train_batches(6, config)
  seen = [by_bytes[image.tobytes()] for batch in batches for image in batch["image"]]
  assert sorted(seen[:24]) == sorted(seen[24:]) == list(range(24))
  assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(48))


def test_stream_is_deterministic_and_independent_of_threads_and_cache():
  def first_batches(seed, cache=2**30, **overrides):
    # 12 steps of 8 cover the 40 examples more than twice: cached reads are compared too.
    return train_batches(12, data_config(**overrides), seed=seed, cache_limit_bytes=cache)

  settings = [(0, 0, 0), (0, 0, 2**30), (1, 1, 2**30), (4, 3, 0), (4, 3, 2**30)]
  runs = [first_batches(7, cache, read_threads=t, prefetch=p) for t, p, cache in settings]
  for run in runs[1:]:
    assert_batches_equal(runs[0], run)
  other = first_batches(8)
  assert not any(
    np.array_equal(a["image"], b["image"]) for a, b in zip(runs[0], other, strict=True)
  )


def test_resume_at_step_k_equals_the_uninterrupted_tail():
  full = train_batches(12, global_batch_size=6, seed=3)
  assert_batches_equal(full[9:], train_batches(3, global_batch_size=6, seed=3, start_step=9))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_partition_the_global_batch(process_count):
  whole = train_batches(4, start_step=2)
  parts = [
    train_batches(4, start_step=2, process_index=p, process_count=process_count)
    for p in range(process_count)
  ]
  for step, batch in enumerate(whole):
    for key in batch:
      joined = np.concatenate([part[step][key] for part in parts])
      np.testing.assert_array_equal(joined, batch[key])
    assert batch["index"].tolist() == list(range((step + 2) * 8, (step + 3) * 8))


def test_flip_changes_only_orientation():
  n = 10
  plain = example_stream(CountingSource(n), seed=4, random_flip=False)
  flipped = example_stream(CountingSource(n), seed=4, random_flip=True)
  flips = []
  for j in range(4 * n):
    a, b = plain[j]["image"], flipped[j]["image"]
    assert plain[j]["label"] == flipped[j]["label"]
    flips.append(not np.array_equal(a, b))
    np.testing.assert_array_equal(b, a[:, ::-1] if flips[-1] else a)
  assert 0.2 < np.mean(flips) < 0.8
  # The same example in other epochs is flipped independently.
  labels = [int(plain[j]["label"]) for j in range(4 * n)]
  per_example = {
    i: {f for f, label in zip(flips, labels, strict=True) if label == i} for i in range(n)
  }
  assert any(len(s) == 2 for s in per_example.values())
  # The same holds for the batches of the training iterator.
  plain_batches = train_batches(6, data_config(random_flip=False))
  for a, b in zip(plain_batches, train_batches(6, data_config(random_flip=True)), strict=True):
    for x, y in zip(a["image"], b["image"], strict=True):
      assert np.array_equal(x, y) or np.array_equal(x[:, ::-1], y)


def test_batch_size_must_divide_over_processes():
  with pytest.raises(ConfigError) as excinfo:
    make_train_iterator(data_config(), global_batch_size=10, seed=0, process_count=4)
  assert_config_error(excinfo, "train.batch_size")


def test_normalize_denormalize_round_trip():
  import jax.numpy as jnp

  pixels = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  x = normalize_images(pixels)
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(denormalize_images(x), pixels)
  x_jax = normalize_images(jnp.asarray(pixels))
  assert x_jax.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(denormalize_images(x_jax)), pixels)
  clipped = denormalize_images(np.array([-3.0, -1.0, 0.0, 1.0, 7.0]))
  assert clipped.dtype == np.uint8 and clipped.tolist() == [0, 0, 128, 255, 255]
