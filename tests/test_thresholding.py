"""Tests for the treatment of the predicted x̂0: static clipping, dynamic thresholding, none."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from diffusion_jax.core import diffusion, schedules
from diffusion_jax.experiment import settings
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import ddim_grid, samplers, solvers
from diffusion_jax.testing import analytic

IMAGE = (2, 2, 1)
SAMPLER_SETTINGS = [
  ("ddpm", {"num_steps": 6}),
  ("ddim", {"num_steps": 6, "eta": 0.5}),
  ("dpm_solver++", {"num_steps": 6}),
  ("heun", {"num_steps": 4}),
]

pytestmark = pytest.mark.usefixtures("fast_compile")

_sample_jit = jax.jit(
  samplers.sample,
  static_argnums=(0, 2),
  static_argnames=(
    "sampler",
    "num_steps",
    "clip_x0",
    "threshold",
    "threshold_percentile",
    "eta",
  ),
)


@functools.cache
def _schedule() -> schedules.Schedule:
  return schedules.make_schedule("linear", 30)


@functools.cache
def _wide_model():
  """The exact ε of data x0 ~ N(0, 3²): its x̂0 leaves [-1, 1] far."""
  return analytic.exact_denoise_fn(analytic.gaussian(np.zeros(IMAGE), 3.0), _schedule())


def _numpy_dynamic(x, percentile):
  """Imagen's dynamic thresholding, written directly in float64 NumPy."""
  x = np.asarray(x, np.float64)
  s = np.percentile(np.abs(x).reshape(len(x), -1), 100.0 * percentile, axis=1)
  s = np.maximum(s, 1.0).reshape(-1, *(1,) * (x.ndim - 1))
  return np.clip(x, -s, s) / s


@pytest.mark.parametrize("percentile", [0.995, 0.9, 0.5, 1.0])
def test_dynamic_matches_the_numpy_formula(percentile):
  x = 3.0 * jax.random.normal(jax.random.key(0), (4, 5, 6, 3))
  x = x.at[1].multiply(0.2)  # a sample with s near 1 ...
  x = x.at[2].set(jnp.clip(x[2], -0.9, 0.9))  # ... and one with s = 1 (clip only)
  got = jax.jit(diffusion.threshold_x0, static_argnums=(1, 2))(x, "dynamic", percentile)
  want = _numpy_dynamic(x, percentile)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert np.abs(got).max() <= 1.0
  np.testing.assert_array_equal(got[2], x[2])


def test_dynamic_equals_static_when_every_value_is_in_range():
  x = jax.random.uniform(jax.random.key(1), (3, 4, 4, 2), minval=-1.0, maxval=1.0)
  dynamic = diffusion.threshold_x0(x, "dynamic", 0.995)
  np.testing.assert_array_equal(dynamic, diffusion.threshold_x0(x, "static"))
  np.testing.assert_array_equal(dynamic, x)


def test_static_clips_and_none_is_the_identity():
  x = 3.0 * jax.random.normal(jax.random.key(2), (3, 4, 4, 2))
  np.testing.assert_array_equal(diffusion.threshold_x0(x, "none"), x)
  np.testing.assert_array_equal(diffusion.threshold_x0(x, "static"), np.clip(x, -1.0, 1.0))


@pytest.mark.parametrize(
  "threshold, percentile, match",
  [
    ("imagen", 0.995, "threshold='imagen' is unknown; valid: static, dynamic, none"),
    ("dynamic", 0.0, r"threshold_percentile=0.0 must be in \(0, 1\]"),
    ("dynamic", 99.5, r"threshold_percentile=99.5 must be in \(0, 1\]"),
  ],
)
def test_bad_threshold_settings_are_one_line_errors(threshold, percentile, match):
  x = jnp.zeros((1, *IMAGE))
  with pytest.raises(ValueError, match=match):
    diffusion.threshold_x0(x, threshold, percentile)
  with pytest.raises(ValueError, match=match):
    samplers.sample(
      _wide_model(),
      _schedule(),
      x.shape,
      jax.random.key(0),
      threshold=threshold,
      threshold_percentile=percentile,
    )


@jax.jit
def _one_step_of_each_kind(x_t):
  """{treatment: (p_mean_variance's (mean, x̂0), model_predictions' (x̂0, ε̂))} at t = 25."""
  sched, t = _schedule(), jnp.full(x_t.shape[:1], 25, jnp.int32)
  eps = _wide_model()(x_t, t)
  alpha, sigma = sched.sqrt_alphas_cumprod[25], sched.sqrt_one_minus_alphas_cumprod[25]
  treatments = {
    "dynamic": dict(clip_x0=False, threshold="dynamic", threshold_percentile=0.9),
    "none": dict(clip_x0=True, threshold="none"),
    "clip_x0=False": dict(clip_x0=False),
  }
  out = {"raw x0": diffusion.predict_x0(sched, x_t, t, eps, "eps")}
  for name, kwargs in treatments.items():
    mean, _, _, x0 = diffusion.p_mean_variance(sched, eps, x_t, t, **kwargs)
    pair = solvers.model_predictions(
      _wide_model(), x_t, jnp.int32(25), alpha, sigma, prediction="eps", **kwargs
    )
    out[name] = ((mean, x0), pair)
  return out


def test_p_mean_variance_and_model_predictions_use_the_threshold():
  sched = _schedule()
  x_t = 2.0 * jax.random.normal(jax.random.key(3), (4, *IMAGE))
  out = _one_step_of_each_kind(x_t)
  raw = out["raw x0"]
  assert np.abs(raw).max() > 1.5  # the thresholds act
  want = _numpy_dynamic(raw, 0.9)
  (mean, x0), (x0_hat, eps_hat) = out["dynamic"]  # the threshold takes precedence over clip_x0
  np.testing.assert_allclose(x0, want, rtol=1e-6, atol=1e-6)
  t = jnp.full((4,), 25, jnp.int32)
  np.testing.assert_allclose(
    mean, diffusion.q_posterior_mean_variance(sched, x0, x_t, t)[0], rtol=1e-6
  )
  np.testing.assert_allclose(x0_hat, want, rtol=1e-5, atol=1e-6)
  # ε̂ is recomputed so that x_t = α x̂0 + σ ε̂ still holds.
  alpha, sigma = sched.sqrt_alphas_cumprod[25], sched.sqrt_one_minus_alphas_cumprod[25]
  np.testing.assert_allclose(alpha * x0_hat + sigma * eps_hat, x_t, rtol=1e-5, atol=1e-5)
  # threshold="none" is clip_x0=False: x̂0 and ε̂ as predicted.
  jax.tree.map(np.testing.assert_array_equal, out["none"], out["clip_x0=False"])
  np.testing.assert_array_equal(out["none"][0][1], raw)


def test_ddim_grid_thresholds_x0_and_keeps_eps():
  sched = _schedule()
  x = 2.0 * jax.random.normal(jax.random.key(4), (4, *IMAGE))
  one_step = jax.jit(
    lambda x: ddim_grid.ddim_grid_sample(
      _wide_model(), sched, x, [25], 10, threshold="dynamic", threshold_percentile=0.9
    )
  )
  t = np.full((4,), 25, np.int32)
  eps = np.asarray(_wide_model()(x, t), np.float64)
  abar = np.float64(sched.alphas_cumprod[25]), np.float64(sched.alphas_cumprod[15])
  x0 = _numpy_dynamic((np.asarray(x) - np.sqrt(1.0 - abar[0]) * eps) / np.sqrt(abar[0]), 0.9)
  want = np.sqrt(abar[1]) * x0 + np.sqrt(1.0 - abar[1]) * eps
  np.testing.assert_allclose(one_step(x), want, rtol=1e-5, atol=1e-5)


def _run(sampler, options, **treatment):
  shape = (8, *IMAGE)
  out = _sample_jit(
    _wide_model(), _schedule(), shape, jax.random.key(5), sampler=sampler, **options, **treatment
  )
  return np.asarray(out)


@pytest.mark.parametrize("sampler, options", SAMPLER_SETTINGS)
def test_every_sampler_takes_dynamic_thresholding(sampler, options):
  dynamic = _run(sampler, options, threshold="dynamic", threshold_percentile=0.9)
  static = _run(sampler, options)
  assert np.isfinite(dynamic).all()
  # Every sampler's last step returns the thresholded x̂0 itself.
  assert np.abs(dynamic).max() <= 1.0 + 1e-5
  assert np.abs(dynamic - static).max() > 1e-2


@pytest.mark.parametrize("sampler, options", SAMPLER_SETTINGS)
def test_default_options_are_static_clipping_bit_for_bit(sampler, options):
  default_run = _run(sampler, options)
  np.testing.assert_array_equal(default_run, _run(sampler, options, clip_x0=True))
  np.testing.assert_array_equal(default_run, _run(sampler, options, threshold="static"))


def test_config_threshold_fields():
  mesh = parallel.make_mesh()
  config = default.get_config()
  settings.check_config(config, mesh)
  assert (config.diffusion.threshold, config.diffusion.threshold_percentile) == ("static", 0.995)
  config.diffusion.threshold = "dynamic"
  settings.check_config(config, mesh)
  fields = settings.from_section(settings.DiffusionSettings, config.diffusion, "diffusion")
  assert settings.x0_threshold(fields) == "dynamic"
  config.diffusion.clip_x0 = False
  with pytest.raises(ConfigError, match="diffusion.threshold='dynamic' needs diffusion.clip_x0"):
    settings.check_config(config, mesh)
  config.diffusion.threshold = "static"  # clip_x0=False keeps its meaning: no thresholding
  settings.check_config(config, mesh)
  fields = settings.from_section(settings.DiffusionSettings, config.diffusion, "diffusion")
  assert settings.x0_threshold(fields) == "none"
  config.diffusion.threshold = "Dynamic"
  with pytest.raises(ConfigError, match="diffusion.threshold='Dynamic' is unknown"):
    settings.check_config(config, mesh)
  config.diffusion.threshold = "none"
  config.diffusion.threshold_percentile = 1.5
  with pytest.raises(ConfigError, match=r"diffusion.threshold_percentile=1.5 must be in \(0, 1\]"):
    settings.check_config(config, mesh)
