"""The training input pipeline: sources, the example stream and per-process batches.

The stream is an infinite sequence of examples. Epoch e is a permutation of the data set that
depends only on (seed, e), and stream position j = e * N + k is the k-th example of epoch e. The
global batch of step s holds positions [s * B, (s + 1) * B); process p of P reads the contiguous
part [s * B + p * b, s * B + (p + 1) * b) with b = B / P. Every random choice (order, flips) is a
pure function of the seed and the stream position, and grain reads by index, so a run resumed at
step k sees exactly the batches the uninterrupted run saw, without replaying steps 0..k-1, and
the result is the same for any number of processes or read threads.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from diffusion_jax.runtime.errors import ConfigError

# Constants that separate the data order and the flips into independent random streams.
_SHUFFLE_STREAM = 0x5EED_0DE5
_FLIP_STREAM = 0xF11B_5EED
_CAPTION_STREAM = 0xCA97_1011
_MIN_IMAGE_SIZE = 8
# "Infinite": 2**62 positions outlast any run and keep int64 arithmetic on them safe.
_STREAM_LENGTH = 2**62
# Data sets whose decoded images fit in this many bytes stay in memory after the first epoch
# (CIFAR-10 at 32x32: 150 MB).
DEFAULT_CACHE_LIMIT_BYTES = 2**30


def _derive_seed(seed: int, stream: int) -> int:
  """A 32-bit seed for one random stream, unrelated to the seeds of other streams and runs."""
  state = np.random.SeedSequence([int(seed) % 2**64, stream]).generate_state(1, dtype=np.uint32)
  return int(state[0])


def _check_image_size(image_size: Any) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
    raise ConfigError(
      f"data.image_size={image_size!r} is not an integer: set --config.data.image_size to an "
      f"int >= {_MIN_IMAGE_SIZE} (e.g. 32)."
    )
  if image_size < _MIN_IMAGE_SIZE:
    raise ConfigError(
      f"data.image_size={image_size} is too small: set --config.data.image_size to an int >= "
      f"{_MIN_IMAGE_SIZE} (e.g. 32)."
    )
  return int(image_size)


def make_source(data_config: Any):
  """Builds the random-access source named by `data_config.dataset`.

  Args:
    data_config: the config's `data` section (read by attribute: dataset, path, image_size,
      split, data_dir, manual_dir, num_examples).

  Returns:
    A source with `len(source)` examples; `source[i]` is a dict with "image" uint8 [S, S, 3],
    "label" int32 scalar and, for "shapes", "caption" str. It also has `num_classes` (int) and
    `class_names` (list of str).

  Raises:
    ConfigError: a bad field; the one-line message names it and says how to fix it.
  """
  image_size = _check_image_size(data_config.image_size)
  name = data_config.dataset
  if not isinstance(name, str) or not name.strip():
    raise ConfigError(
      f"data.dataset={name!r} is not a name: valid values are a tfds image data set name "
      f'(e.g. "cifar10"), "folder" or "shapes".'
    )
  name = name.strip()
  if name == "shapes":
    from diffusion_jax.data.shapes import ShapesSource

    num = data_config.num_examples
    if isinstance(num, bool) or not isinstance(num, int | np.integer) or num < 1:
      raise ConfigError(
        f"data.num_examples={num!r} is not a positive int: set --config.data.num_examples to the "
        f"size of the generated set (e.g. 20000)."
      )
    # The generated set has two splits: "train", and "test", an independent draw of the same
    # distribution (another generator seed) for held-out evaluation.
    splits = {"train": 0, "test": 1}
    if data_config.split not in splits:
      raise ConfigError(
        f"data.split={data_config.split!r} does not exist for data.dataset=shapes; "
        f"valid: {', '.join(splits)}"
      )
    # Held-out classes leave the training split only; the test split keeps all of them.
    exclude = ()
    if data_config.split == "train":
      exclude = tuple(n.strip() for n in data_config.exclude_classes.split(",") if n.strip())
    try:
      return ShapesSource(int(num), image_size, seed=splits[data_config.split], exclude=exclude)
    except ValueError as e:
      raise ConfigError(f"data.exclude_classes: {e}") from e
  if name == "folder":
    from diffusion_jax.data.folder import FolderSource

    return FolderSource(data_config.path, image_size)
  from diffusion_jax.data.tfds_source import TfdsSource

  return TfdsSource(
    name,
    split=data_config.split,
    image_size=image_size,
    data_dir=data_config.data_dir or "",
    manual_dir=data_config.manual_dir or "",
  )


class _DecodedCache:
  """Source wrapper that keeps every decoded example after its first read.

  Decoding dominates reading (about 0.3 ms per CIFAR JPEG with PIL, much of it Python header
  parsing under the GIL, so more threads help only partly); from the second epoch on, a cached
  example costs microseconds. The array is allocated untouched, so memory grows only as
  examples are read.
  """

  def __init__(self, source, image_shape: tuple[int, ...]):
    self._source = source
    self._images = np.empty((len(source), *image_shape), np.uint8)
    self._labels = np.empty(len(source), np.int32)
    self._filled = np.zeros(len(source), bool)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    if not self._filled[index]:
      # Two threads may fill the same slot at once; they write identical bytes.
      example = self._source[index]
      self._images[index] = example["image"]
      self._labels[index] = example["label"]
      self._filled[index] = True
    # A copy, so that no caller can alter the cache through the returned array.
    return {"image": self._images[index].copy(), "label": self._labels[index]}


class _EpochOrder:
  """Stream position -> source index: epoch e is its own permutation, a function of (seed, e).

  grain's `shuffle` computes each index with a cycle-walking cipher whose cost grows like
  1 / N: about 10 ms per example at N = 10 and 0.1 ms at N = 1,000, which starves training on
  small data sets. A NumPy permutation per epoch costs O(N) once per epoch (a few ms for
  ImageNet) and O(1) per example, and stays a pure function of (seed, epoch).
  """

  def __init__(self, size: int, seed: int):
    self._size = size
    self._seed = seed
    # Threads near an epoch boundary need the current and the next permutation; a few more
    # cover batches larger than the data set. int32 keeps ImageNet's table at 5 MB.
    self.permutation = functools.lru_cache(maxsize=4)(self._permutation)

  def _permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    return rng.permutation(self._size).astype(np.int32)

  def __call__(self, position: int) -> int:
    epoch, k = divmod(int(position), self._size)
    return int(self.permutation(epoch)[k])


class _Captions:
  """(source index, label, stream position) -> the caption's token ids, int32 [L].

  The caption's random choices (which attributes it names) come from a generator seeded with
  (seed, position), like the flips: a pure function of the stream position.
  """

  def __init__(self, source, tokenizer, seed: int):
    from diffusion_jax import text

    self._caption = text.make_captioner(source)
    self._tokenizer = tokenizer
    self._seed = _derive_seed(seed, _CAPTION_STREAM)

  def __call__(self, index: int, label: int, position: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, int(position)])
    return self._tokenizer.encode_one(self._caption(index, label, rng))


class _ReadExample:
  """Stream position -> the example there, with only the fields that batch into arrays."""

  def __init__(self, source, order: _EpochOrder, captions: _Captions | None = None):
    self._source = source
    self._order = order
    self._captions = captions

  def __call__(self, position: int) -> dict:
    index = self._order(position)
    example = self._source[index]
    # Strings do not go to devices: a caption travels as its token ids.
    out = {
      "image": example["image"],
      "label": np.int32(example["label"]),
      "index": np.int64(position),
      "source": np.int64(index),
      "flipped": np.bool_(False),
    }
    if self._captions is not None:
      out["tokens"] = self._captions(index, out["label"], position)
    return out


def _flip(example: dict, rng: np.random.Generator) -> dict:
  if rng.random() < 0.5:
    example = {**example, "image": example["image"][:, ::-1], "flipped": np.bool_(True)}
  return example


def example_stream(
  source, *, seed: int, random_flip: bool, tokenizer=None, caption_source=None
) -> grain.MapDataset:
  """The infinite, randomly accessible stream of training examples.

  Args:
    source: a random-access source (see `make_source`) with N >= 1 examples.
    seed: the data seed; the order of epoch e depends only on (seed, e).
    random_flip: flip each example horizontally with probability 1/2, decided by (seed, j).
      Captions describe the unflipped image, so captions naming left and right (the shapes set)
      need flips off.
    tokenizer: a `text.Tokenizer`: examples also carry their caption's token ids.
    caption_source: the source whose captions are read (default `source`; differs when
      `source` is a cache wrapper).

  Returns:
    A `grain.MapDataset` whose element j (stream position, any int >= 0) is {"image": uint8
    [S, S, 3], "label": int32 scalar, "index": int64 scalar j, "source": int64 scalar (the
    example's index in `source`), "flipped": bool scalar} and, with a tokenizer, "tokens"
    int32 [L].
  """
  if len(source) < 1:
    raise ConfigError("data.dataset has no examples: check data.path and data.split.")
  order = _EpochOrder(len(source), _derive_seed(seed, _SHUFFLE_STREAM))
  captions = None
  if tokenizer is not None:
    captions = _Captions(caption_source or source, tokenizer, seed)
  # Element j of the range is j itself, so every later index is the stream position.
  ds = grain.MapDataset.range(_STREAM_LENGTH).map(_ReadExample(source, order, captions))
  if random_flip:
    # random_map seeds each element's generator with (seed, j), j the stream position.
    ds = ds.random_map(_flip, seed=_derive_seed(seed, _FLIP_STREAM))
  return ds


def _stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  out = {
    "image": np.stack([ex["image"] for ex in examples]).astype(np.uint8, copy=False),
    "label": np.asarray([ex["label"] for ex in examples], dtype=np.int32),
    "index": np.asarray([ex["index"] for ex in examples], dtype=np.int64),
    "source": np.asarray([ex["source"] for ex in examples], dtype=np.int64),
    "flipped": np.asarray([ex["flipped"] for ex in examples], dtype=bool),
  }
  if "tokens" in examples[0]:
    out["tokens"] = np.stack([ex["tokens"] for ex in examples]).astype(np.int32, copy=False)
  return out


def make_train_iterator(
  data_config: Any,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES,
  tokenizer=None,
) -> Iterator[dict[str, np.ndarray]]:
  """The batches this process feeds to the training steps start_step, start_step + 1, ...

  Args:
    data_config: the config's `data` section (see `make_source`; also random_flip,
      read_threads, prefetch).
    global_batch_size: B, examples per step over all processes (`train.batch_size`).
    seed: the data seed (order and flips).
    start_step: first step to produce; resuming at k yields exactly the batches the
      uninterrupted iterator yields from step k on.
    process_index: p in [0, process_count).
    process_count: P, the number of processes; must divide B.
    cache_limit_bytes: keep decoded images in memory when the whole data set fits in this many
      bytes (N * S * S * 3); 0 disables the cache. It changes speed only, never the batches.
    tokenizer: a `text.Tokenizer` for text-conditional training: batches also carry "tokens".

  Returns:
    An infinite iterator of dicts of NumPy arrays, with b = B / P:
    "image" uint8 [b, S, S, 3] in [0, 255], "label" int32 [b], "index" int64 [b] (the stream
    positions s * B + p * b + [0, b)), "source" int64 [b] (indices into the source), "flipped"
    bool [b] and, with a tokenizer, "tokens" int32 [b, L] (captions).

  Raises:
    ConfigError: a bad config field (the message names it).
  """
  if global_batch_size < 1:
    raise ConfigError(
      f"train.batch_size={global_batch_size} must be positive: set --config.train.batch_size."
    )
  if global_batch_size % process_count:
    raise ConfigError(
      f"train.batch_size={global_batch_size} is not divisible by the {process_count} processes: "
      f"set --config.train.batch_size to a multiple of {process_count}."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  source = raw_source = make_source(data_config)
  image_shape = (data_config.image_size, data_config.image_size, 3)
  if 0 < len(source) * int(np.prod(image_shape)) <= cache_limit_bytes:
    source = _DecodedCache(source, image_shape)
  ds = example_stream(
    source,
    seed=seed,
    random_flip=bool(data_config.random_flip),
    tokenizer=tokenizer,
    caption_source=raw_source,
  )
  per_process = global_batch_size // process_count
  # Batch q of size b holds positions [q * b, (q + 1) * b); the global batch of step s is batches
  # s * P .. s * P + P - 1, so process p takes every P-th batch starting at start_step * P + p.
  ds = ds.batch(per_process, batch_fn=_stack)
  ds = ds[start_step * process_count + process_index :: process_count]
  threads = max(int(data_config.read_threads), 0)
  prefetch = max(int(data_config.prefetch), 0)
  # Each thread prepares whole batches, so a buffer smaller than the thread count would idle
  # threads. The prefetch iterator returns batches in index order whatever the thread count.
  buffer = max(prefetch, threads) if prefetch and threads else 0
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
  return iter(ds.to_iter_dataset(read_options))


def normalize_images(images):
  """Maps uint8 pixels to the model's range.

  Args:
    images: uint8 (or any numeric) array [..., C] in [0, 255], NumPy or JAX.

  Returns:
    float32 array of the same shape in [-1, 1]: images / 127.5 - 1 (same array library).
  """
  return images.astype("float32") / 127.5 - 1.0


def denormalize_images(x):
  """Maps model outputs back to pixels; inverts `normalize_images` exactly on uint8 input.

  Args:
    x: float array [..., C], nominally in [-1, 1] (values outside are clipped), NumPy or JAX.

  Returns:
    uint8 array of the same shape and array library in [0, 255]: round((x + 1) * 127.5).
  """
  if not hasattr(x, "astype"):
    x = np.asarray(x)
  # Array methods rather than np.* functions keep JAX inputs in JAX (and usable under jit).
  return ((x.astype("float32") + 1.0) * 127.5).round().clip(0, 255).astype("uint8")
