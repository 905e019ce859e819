"""PSNR and SSIM against float64 references written with NumPy and SciPy."""

import numpy as np
import pytest
from scipy import ndimage

from diffusion_jax.evaluation import reconstruction


def reference_ssim(x, y, data_range=255.0):
  """Wang et al. (2004) with scipy's Gaussian filter (σ = 1.5, 11 taps), float64, borders cut."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  filt = lambda a: ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")
  values = []
  for c in range(x.shape[-1]):
    a, b = x[..., c], y[..., c]
    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    s = numerator / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    values.append(s[5:-5, 5:-5].mean())
  return float(np.mean(values))


def pairs(seed=0, n=3, size=24):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
  noise = rng.normal(0, [[[[5.0]]], [[[20.0]]], [[[60.0]]]], x.shape)
  y = np.clip(x + noise, 0, 255).astype(np.uint8)
  return x, y


def test_ssim_matches_the_float64_reference():
  x, y = pairs()
  got = np.asarray(reconstruction.ssim(y, x))
  want = [reference_ssim(y[i], x[i]) for i in range(len(x))]
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert got[0] > got[1] > got[2]  # More noise, less similar.


def test_ssim_of_an_image_with_itself_is_one_and_symmetric():
  x, y = pairs(seed=1)
  np.testing.assert_allclose(np.asarray(reconstruction.ssim(x, x)), 1.0, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(reconstruction.ssim(x, y)), np.asarray(reconstruction.ssim(y, x)), atol=1e-6
  )


def test_psnr_matches_the_formula():
  x, y = pairs(seed=2)
  mse = np.mean((x.astype(np.float64) - y) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(
    np.asarray(reconstruction.psnr(y, x)), 10 * np.log10(255.0**2 / mse), rtol=1e-5
  )
  assert np.isinf(np.asarray(reconstruction.psnr(x, x))).all()


def test_ssim_needs_the_whole_window():
  with pytest.raises(ValueError, match="at least 11x11"):
    reconstruction.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
