"""Sample-quality figures that need no download: a sliced Wasserstein distance in pixel space.

The distance is crude next to FID (pixels, not Inception features) but it is exact to compute,
cheap, and it compares runs, seeds and samplers on the same reference images.
"""

import jax
import numpy as np


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, key: jax.Array, num_projections: int = 256):
  """SW_1(x, y) = E_u[W_1(⟨u, x⟩, ⟨u, y⟩)], u uniform on the unit sphere of R^D.

  Both sets are equally weighted empirical measures of the same size N, so each 1-D distance is
  the mean absolute difference of the sorted projections. The expectation over u is estimated
  with `num_projections` directions drawn from `key` (the same key gives the same directions, so
  figures computed with one key are comparable).

  Args:
    x: [N, ...] float samples (any trailing shape, flattened to D values).
    y: [N, ...] float reference samples, the same shape as x.
    key: PRNG key of the projection directions.
    num_projections: directions averaged over.

  Returns:
    The estimate as a Python float (in the units of x).
  """
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  if x.shape != y.shape:
    raise ValueError(f"sliced_wasserstein needs sets of one shape, got {x.shape} and {y.shape}")
  directions = np.asarray(jax.random.normal(key, (x.shape[1], num_projections)), np.float64)
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  px = np.sort(x @ directions, axis=0)
  py = np.sort(y @ directions, axis=0)
  return float(np.mean(np.abs(px - py)))


def images_to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 pixels [0, 255] -> float64 in [-1, 1], the model's data range."""
  return np.asarray(images, np.float64) / 127.5 - 1.0
