"""The encoded training set of a latent run: every image's posterior, computed once.

With latent.cache=True a latent run encodes its training images once, and again mirrored when
data.random_flip is on, into WORKDIR/latent_cache/moments.npy: float32 [N, F, h, w, 2z], the
posterior mean and standard deviation of image i (F = 2: unflipped, flipped) side by side on the
last axis. Each step then reads its examples' rows by source index and flip and draws each latent
with the key that encoding on the fly uses, so both give the same latents up to float rounding,
without running the encoder. fingerprint.json names what the cache was computed from: a hash of
the autoencoder's parameters and the data fields that decide the images. A cache with another
fingerprint (a retrained autoencoder, other data) is encoded again. The file is written under a
temporary name and renamed when complete, so an interrupted encoding leaves no cache behind. The
file is memory-mapped, not read into memory.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import data
from diffusion_jax.experiment import settings
from diffusion_jax.runtime import parallel

# The data fields that decide a training image (read_threads and prefetch decide only speed).
_DATA_FIELDS = (
  "dataset",
  "path",
  "image_size",
  "split",
  "data_dir",
  "num_examples",
  "exclude_classes",
  "random_flip",
)
_BATCH = 64


def fingerprint(config, space) -> dict[str, Any]:
  """What the cache of a run depends on: its data fields and a hash of the autoencoder's
  parameters (their names, shapes and bytes)."""
  digest = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(space.params))[0]
  for path, leaf in flat:
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}{leaf.dtype}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return {
    "autoencoder_params_sha256": digest.hexdigest(),
    "data": {name: config.data[name] for name in _DATA_FIELDS},
  }


@dataclasses.dataclass
class LatentCache:
  """The posterior moments of the training set, [N, F, h, w, 2z] (a NumPy array or memmap)."""

  moments: np.ndarray

  def rows(self, source: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) [b, h, w, z] of the examples at `source` indices, mirrored where `flipped`."""
    flips = flipped.astype(np.int64) if self.moments.shape[1] > 1 else np.zeros_like(source)
    rows = np.asarray(self.moments[np.asarray(source), flips])
    mean, std = np.split(rows, 2, axis=-1)
    return mean, std


def load_or_encode(config, space, workdir: str) -> LatentCache:
  """The cache in WORKDIR/latent_cache: read when its fingerprint matches, else encoded (with a
  progress bar, in batches sharded over the devices). Every process encodes the whole set into a
  file of its own; process 0's becomes the cache, and the others' too where they do not share
  process 0's filesystem."""
  directory = os.path.join(workdir, "latent_cache")
  want = fingerprint(config, space)
  found = _read(directory, want)
  if found is None:
    partial = _encode_all(config, space, directory)
    if jax.process_index() == 0:
      _commit(directory, partial, want)
    multihost_utils.sync_global_devices("latent cache written")
    if jax.process_index() != 0:
      if _read(directory, want) is None:
        _commit(directory, partial, want)
      else:
        os.remove(partial)
    found = _read(directory, want)
  logging.info("latent cache: %s, %s", os.path.join(directory, "moments.npy"), found.shape)
  return LatentCache(found)


def _read(directory: str, want: dict) -> np.ndarray | None:
  try:
    with open(os.path.join(directory, "fingerprint.json")) as f:
      have = json.load(f)
    moments = np.load(os.path.join(directory, "moments.npy"), mmap_mode="r")
  except (OSError, ValueError):
    return None
  if have != json.loads(json.dumps(want)):
    logging.info(
      "the latent cache in %s is of another autoencoder or data; encoding again", directory
    )
    return None
  return moments


def _commit(directory: str, partial: str, want: dict) -> None:
  """Makes the complete file `partial` the cache: the old fingerprint goes first and the new one
  comes last, so a cache is valid only once both files are complete and agree."""
  fingerprint_path = os.path.join(directory, "fingerprint.json")
  if os.path.exists(fingerprint_path):
    os.remove(fingerprint_path)
  os.replace(partial, os.path.join(directory, "moments.npy"))
  with open(fingerprint_path + ".partial", "w") as f:
    json.dump(want, f, indent=2)
  os.replace(fingerprint_path + ".partial", fingerprint_path)
  logging.info("latent cache written: %s", os.path.join(directory, "moments.npy"))


def _encode_all(config, space, directory: str) -> str:
  """Encodes every training image's posterior (mean | std) into a new file in `directory`,
  [N, F, h, w, 2z] float32; returns its path."""
  source = data.make_source(settings.from_section(data.DataConfig, config.data, "data"))
  count = len(source)
  flips = (False, True) if config.data.random_flip else (False,)
  devices = space.mesh.size
  batch = max(devices, _BATCH // devices * devices)
  rows = batch // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"moments.partial.{jax.process_index()}.npy")
  out = None
  progress = tqdm.trange(
    0, count, batch, unit="batch", desc="latent cache", disable=jax.process_index() != 0
  )
  for first in progress:
    indices = np.minimum(np.arange(first, first + batch), count - 1)[mine]
    images = np.stack([source[int(i)]["image"] for i in indices])
    per_flip = []
    for flip in flips:
      local = np.ascontiguousarray(images[:, :, ::-1] if flip else images)
      put = parallel.put_batch({"image": local}, space.mesh)["image"]
      moments = jnp.concatenate(space.moments(put), axis=-1)
      per_flip.append(multihost_utils.process_allgather(moments, tiled=True)[: count - first])
    block = np.stack(per_flip, axis=1).astype(np.float32)
    if out is None:
      shape = (count, *block.shape[1:])
      out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    out[first : first + len(block)] = block
  out.flush()
  del out
  return path
