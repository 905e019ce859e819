"""The low-resolution inputs a super-resolution run samples from: training images, shrunk the way
its train step shrinks them (`core.super_resolution.downsample`)."""

import itertools

import numpy as np

from diffusion_jax import data
from diffusion_jax.core import super_resolution

# How far `from_data` looks for images of a requested class, in images per requested example.
_SCAN_PER_EXAMPLE = 64


def from_data(source, labels: list[int | None], factor: int) -> np.ndarray:
  """One data image per request, each used once, averaged over factor x factor blocks.

  Request j with a label gets the next image of that class; with None (or a class not found
  among the first images) the next unused image in order. The images are a pure function of the
  source and the requests.

  Args:
    source: a data source (`data.make_source`): source[i] has "image" uint8 [H, W, C] and "label".
    labels: the class of each request, or None.
    factor: the downsampling factor data.image_size / model.low_res_size.

  Returns:
    [len(labels), H / factor, W / factor, C] float32 in [-1, 1].
  """
  picks: list[int | None] = [None] * len(labels)
  wanted = {}  # label -> the requests still waiting for an image of it, in order
  for j, label in enumerate(labels):
    if label is not None:
      wanted.setdefault(label, []).append(j)
  limit = min(len(source), _SCAN_PER_EXAMPLE * max(len(labels), 1))
  images = {}
  for i in range(limit if wanted else 0):
    if not any(wanted.values()):
      break
    example = source[i]
    waiting = wanted.get(int(example["label"]))
    if waiting:
      picks[waiting.pop(0)] = i
      images[i] = example["image"]
  # The rest in order; more requests than images start over.
  unused = (k for k in range(len(source)) if k not in images)
  rest = itertools.chain(unused, itertools.cycle(range(len(source))))
  for j, pick in enumerate(picks):
    if pick is None:
      index = picks[j] = next(rest)
      if index not in images:
        images[index] = source[index]["image"]
  batch = data.normalize_images(np.stack([images[i] for i in picks]))
  return np.asarray(super_resolution.downsample(batch, factor))
