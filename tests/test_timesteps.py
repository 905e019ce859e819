"""Tests for diffusion_jax.timesteps: spaced timesteps, respacing, EDM noise levels, float t."""

import jax
import numpy as np
import pytest

from diffusion_jax.core import schedules, timesteps

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def linear():
  return schedules.make_schedule("linear", 1000)


@pytest.mark.parametrize("skip", timesteps.SKIPS)
@pytest.mark.parametrize("num_steps", [2, 10, 999, 1000])
def test_spaced_timesteps_are_distinct_descending_and_span_every_level(linear, skip, num_steps):
  t = np.asarray(timesteps.spaced_timesteps(linear, num_steps, skip))
  assert t.shape == (num_steps,) and t.dtype == np.int32
  assert t[0] == 999 and t[-1] == 0
  assert np.all(np.diff(t) < 0)
  if num_steps == 1000:
    np.testing.assert_array_equal(t, np.arange(999, -1, -1))


def test_spacings(linear):
  np.testing.assert_array_equal(
    timesteps.spaced_timesteps(linear, 4, "uniform"), [999, 666, 333, 0]
  )
  # round(999 (k / 3)^2) for k = 3, 2, 1, 0.
  np.testing.assert_array_equal(
    timesteps.spaced_timesteps(linear, 4, "quadratic"), [999, 444, 111, 0]
  )
  np.testing.assert_array_equal(timesteps.spaced_timesteps(linear, 1, "uniform"), [999])
  # logsnr: the log-SNR steps between the visited timesteps are about equal.
  t = timesteps.spaced_timesteps(linear, 10, "logsnr")
  steps = np.diff(np.asarray(timesteps.log_snr(linear))[t])
  np.testing.assert_allclose(steps, steps.mean(), rtol=0.1)
  with pytest.raises(ValueError, match="valid: uniform, quadratic, logsnr"):
    timesteps.spaced_timesteps(linear, 10, "linear")


def test_respacing_every_timestep_gives_the_schedule_back(linear):
  full = timesteps.respace(linear, np.arange(1000))
  for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"):
    np.testing.assert_allclose(getattr(full, name), getattr(linear, name), rtol=2e-5, atol=1e-9)
  for name in ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_log_variance_clipped"):
    np.testing.assert_allclose(getattr(full, name), getattr(linear, name), rtol=2e-5)


def test_respaced_betas_compose_to_the_kept_alphas_cumprod(linear):
  kept = np.asarray(timesteps.spaced_timesteps(linear, 7, "quadratic"))[::-1]
  spaced = timesteps.respace(linear, kept)
  assert spaced.num_timesteps == 7
  abar = np.cumprod(np.append(1.0, 1.0 - np.asarray(spaced.betas, np.float64)))[1:]
  np.testing.assert_allclose(abar, np.asarray(linear.alphas_cumprod)[kept], rtol=1e-5)
  # float64 improved-diffusion formula: beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}.
  abar64 = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[kept]
  expected = 1.0 - abar64 / np.append(1.0, abar64[:-1])
  np.testing.assert_allclose(spaced.betas, expected, rtol=1e-5)


def test_karras_sigmas():
  sigmas = np.asarray(timesteps.karras_sigmas(0.01, 80.0, 18, 7.0))
  assert sigmas.shape == (18,)
  np.testing.assert_allclose([sigmas[0], sigmas[-1]], [80.0, 0.01], rtol=1e-5)
  assert np.all(np.diff(sigmas) < 0)
  # Equal steps in sigma^(1/rho).
  np.testing.assert_allclose(np.diff(sigmas ** (1 / 7)), np.diff(sigmas ** (1 / 7))[0], rtol=1e-4)
  np.testing.assert_allclose(timesteps.karras_sigmas(0.01, 80.0, 1), [80.0], rtol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_float_timesteps_interpolate_the_schedule(name):
  schedule = schedules.make_schedule(name, 100)
  grid = np.arange(100, dtype=np.float32)
  # Integer float t gives the table; timestep_from_sigma inverts alphas_cumprod_at.
  np.testing.assert_allclose(
    timesteps.alphas_cumprod_at(schedule, grid), schedule.alphas_cumprod, rtol=1e-5
  )
  t = jax.random.uniform(jax.random.key(0), (50,), maxval=99.0)
  abar = timesteps.alphas_cumprod_at(schedule, t)
  sigma = np.sqrt((1 - abar) / abar)
  np.testing.assert_allclose(timesteps.timestep_from_sigma(schedule, sigma), t, atol=1e-3)
  np.testing.assert_allclose(
    timesteps.timestep_from_sigma(schedule, timesteps.noise_to_signal(schedule)),
    grid,
    atol=1e-3,
  )
  # Monotone between the integers.
  assert np.all(np.diff(np.asarray(timesteps.alphas_cumprod_at(schedule, np.sort(t)))) <= 0)
