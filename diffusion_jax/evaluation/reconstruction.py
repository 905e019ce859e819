"""How close a reconstruction is to its original: PSNR and SSIM per image.

SSIM is Wang et al. (2004) as scikit-image computes it with `gaussian_weights=True`: local means,
variances and covariance under an 11-tap Gaussian window (σ = 1.5, the population estimates),
constants K1 = 0.01 and K2 = 0.03 of the data range, averaged over the positions where the whole
window fits and over the channels.
"""

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * σ + 0.5): an 11-tap window
_K1, _K2 = 0.01, 0.03


def psnr(images: jax.Array, references: jax.Array, data_range: float = 255.0) -> jax.Array:
  """Peak signal-to-noise ratio of each image in dB.

  Args:
    images, references: [B, H, W, C] arrays of the same shape (any real dtype).
    data_range: the distance between the smallest and the largest possible value.

  Returns:
    [B] float32 10 log10(range² / mean squared error); +inf for an exact copy.
  """
  diff = jnp.asarray(images, jnp.float32) - jnp.asarray(references, jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_window() -> np.ndarray:
  x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
  return (w / w.sum()).astype(np.float32)


def _filter(x: jax.Array) -> jax.Array:
  """The separable Gaussian window over H and W of [B, H, W, C], where it fits ('valid')."""
  window = jnp.asarray(_gaussian_window())
  c = x.shape[-1]
  rows = jnp.tile(window[:, None, None, None], (1, 1, 1, c))  # HWIO, one filter per channel
  cols = jnp.tile(window[None, :, None, None], (1, 1, 1, c))
  dims = ("NHWC", "HWIO", "NHWC")
  for kernel in (rows, cols):
    x = jax.lax.conv_general_dilated(
      x,
      kernel,
      (1, 1),
      "VALID",
      dimension_numbers=dims,
      feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST,
    )
  return x


def ssim(images: jax.Array, references: jax.Array, data_range: float = 255.0) -> jax.Array:
  """Structural similarity of each image to its reference, in [-1, 1] (1: identical).

  Args:
    images, references: [B, H, W, C] arrays of the same shape, H and W at least 11.
    data_range: the distance between the smallest and the largest possible value.

  Returns:
    [B] float32 mean SSIM over positions and channels.

  Raises:
    ValueError: images smaller than the 11x11 window.
  """
  if min(images.shape[1:3]) < 2 * SSIM_RADIUS + 1:
    raise ValueError(
      f"SSIM needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1} pixels, "
      f"got {images.shape[1]}x{images.shape[2]}"
    )
  x = jnp.asarray(images, jnp.float32)
  y = jnp.asarray(references, jnp.float32)
  mu_x, mu_y = _filter(x), _filter(y)
  var_x = _filter(x * x) - mu_x * mu_x
  var_y = _filter(y * y) - mu_y * mu_y
  cov = _filter(x * y) - mu_x * mu_y
  c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
    (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  )
  return jnp.mean(s, axis=(1, 2, 3))
