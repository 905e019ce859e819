"""Tests for diffusion_jax.samplers: compilation, per-example keys and exact Gaussian sampling."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import schedules
from diffusion_jax.sampling import samplers
from diffusion_jax.testing import analytic

IMAGE = (2, 2, 1)
MU, SIGMA = 0.3, 0.5

# XLA's cheapest pipeline and the shared compilation cache: many small programs compile here.
pytestmark = pytest.mark.usefixtures("fast_compile")


@functools.cache
def _schedule(num_timesteps: int) -> schedules.Schedule:
  return schedules.make_schedule("linear", num_timesteps)


def _gaussian_eps(sched, mu=MU, sigma=SIGMA):
  """E[eps | x_t] for data x0 ~ N(mu, sigma^2) i.i.d. per dimension.

  x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is jointly Gaussian with eps, so
  E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar sigma^2 + 1 - abar).
  """

  def denoise_fn(x_t, t):
    abar = sched.alphas_cumprod[t].reshape(-1, *(1,) * (x_t.ndim - 1))
    return jnp.sqrt(1.0 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * sigma**2 + 1.0 - abar)

  return denoise_fn


def _exact_output_moments(
  num_timesteps, variance, mu=MU, sigma=SIGMA, beta_start=1e-4, beta_end=0.02
):
  """Mean and variance of the ancestral sampler's output with the Gaussian eps, in float64.

  Every step is affine in x_t plus independent noise, x_{t-1} = a_t x_t + b_t + s_t z, so the
  moments follow m <- a m + b, v <- a^2 v + s^2 from x_T ~ N(0, 1).
  """
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
  coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
  beta_tilde = betas * (1.0 - abar_prev) / (1.0 - abar)
  m, v = 0.0, 1.0
  for t in range(num_timesteps - 1, -1, -1):
    k = np.sqrt(1.0 - abar[t]) / (abar[t] * sigma**2 + 1.0 - abar[t])
    # pred_x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) = p x + q
    p = (1.0 - np.sqrt(1.0 - abar[t]) * k) / np.sqrt(abar[t])
    q = np.sqrt(1.0 - abar[t]) * k * mu
    a, b = coef1[t] * p + coef2[t], coef1[t] * q
    noise_var = 0.0 if t == 0 else (betas[t] if variance == "fixed_large" else beta_tilde[t])
    m, v = a * m + b, a * a * v + noise_var
  return m, v


def _local_denoiser(x_t, t):
  """A per-example, t-dependent, mildly nonlinear stand-in for a network."""
  scale = (t.astype(jnp.float32) / 100.0).reshape(-1, 1, 1, 1)
  return 0.5 * jnp.tanh(x_t) * scale + 0.1 * x_t


# One compilation per (denoise_fn, shape, options); the schedule and the key are traced arguments.
# first_index is traced, as in sampling.make_sample_fn.
_sample_jit = jax.jit(
  samplers.sample,
  static_argnums=(0, 2),
  static_argnames=(
    "sampler",
    "num_steps",
    "variance",
    "clip_x0",
    "prediction",
    "eta",
    "skip",
    "rho",
    "lower_order_final",
  ),
)


def test_output_shape_dtype_and_key_determinism():
  sched = _schedule(50)
  shape = (4, *IMAGE)
  a = _sample_jit(_local_denoiser, sched, shape, jax.random.key(0))
  assert a.shape == shape
  assert a.dtype == jnp.float32
  a = np.asarray(a)
  b = np.asarray(_sample_jit(_local_denoiser, sched, shape, jax.random.key(0)))
  c = np.asarray(_sample_jit(_local_denoiser, sched, shape, jax.random.key(1)))
  assert np.all(np.isfinite(a))
  np.testing.assert_array_equal(a, b)
  assert np.all(a != c)
  # Images within a batch get different noise.
  assert not np.allclose(a[0], a[1])


def test_traces_the_denoiser_once_and_compiles_once():
  sched = _schedule(1000)
  shape = (2, *IMAGE)
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def denoise_fn(x_t, t):
    return _local_denoiser(x_t, t)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(key):
    return samplers.sample(denoise_fn, sched, shape, key)

  # 1000 reverse steps with one trace of the denoiser: a scan, not a Python loop.
  a = run(jax.random.key(0))
  b = run(jax.random.key(1))
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_visits_every_timestep_once_in_descending_order():
  num_timesteps, batch = 20, 3
  sched = _schedule(num_timesteps)
  seen = []

  def record(t):
    seen.append(np.asarray(t))

  def denoise_fn(x_t, t):
    assert t.shape == (batch,)
    assert t.dtype == jnp.int32
    jax.debug.callback(record, t, ordered=True)
    return _local_denoiser(x_t, t)

  out = samplers.sample(denoise_fn, sched, (batch, *IMAGE), jax.random.key(0))
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert len(seen) == num_timesteps
  for step, t in enumerate(seen):
    np.testing.assert_array_equal(t, np.full(batch, num_timesteps - 1 - step))


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_no_noise_at_the_last_step(variance):
  # A denoiser whose pred_x0 is the constant c: at t = 0 the posterior mean is pred_x0 itself,
  # so the output is exactly c unless noise is added at t = 0 (std ~1e-2 for either variance).
  sched = _schedule(100)
  c = 0.25

  def denoise_fn(x_t, t):
    sqrt_abar = sched.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sqrt_one_minus_abar = sched.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return (x_t - sqrt_abar * c) / sqrt_one_minus_abar

  out = samplers.sample(denoise_fn, sched, (4, 4, 4, 1), jax.random.key(2), variance=variance)
  np.testing.assert_allclose(np.asarray(out), c, rtol=0, atol=1e-4)


def test_same_images_for_any_batch_size():
  sched = _schedule(50)
  key = jax.random.key(42)
  big = np.asarray(_sample_jit(_local_denoiser, sched, (16, *IMAGE), key))
  small = np.asarray(_sample_jit(_local_denoiser, sched, (4, *IMAGE), key))
  shifted = np.asarray(_sample_jit(_local_denoiser, sched, (4, *IMAGE), key, first_index=4))
  np.testing.assert_allclose(small, big[:4], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(shifted, big[4:8], rtol=1e-6, atol=1e-6)
  assert not np.allclose(shifted, small)


def test_num_steps_equal_to_t_is_the_default():
  sched = _schedule(50)
  shape = (4, *IMAGE)
  key = jax.random.key(7)
  a = _sample_jit(_local_denoiser, sched, shape, key)
  b = _sample_jit(_local_denoiser, sched, shape, key, num_steps=50, sampler="ddpm")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_every_sampler_compiles_once_and_traces_the_denoiser_once(sampler):
  sched = _schedule(50)
  shape = (2, *IMAGE)
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def denoise_fn(x_t, t):
    return _local_denoiser(x_t, t)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(key, first_index):
    return samplers.sample(
      denoise_fn, sched, shape, key, sampler=sampler, num_steps=7, first_index=first_index
    )

  # One scan step is one model call, for every sampler: the network is in the program once.
  a = np.asarray(run(jax.random.key(0), 0))
  b = np.asarray(run(jax.random.key(1), 4))
  assert a.shape == shape and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  assert not np.allclose(a, b)


SAMPLER_SETTINGS = [
  ("ddpm", {"num_steps": 10}),
  ("ddim", {"num_steps": 10, "eta": 0.5, "skip": "quadratic"}),
  ("dpm_solver++", {"num_steps": 10}),
  ("heun", {"num_steps": 5}),
]


def _run_local(batch, sampler, options, denoise_fn=_local_denoiser, first_index=0):
  return np.asarray(
    _sample_jit(
      denoise_fn,
      _schedule(50),
      (batch, *IMAGE),
      jax.random.key(42),
      sampler=sampler,
      first_index=first_index,
      **options,
    )
  )


@pytest.mark.parametrize("sampler, options", SAMPLER_SETTINGS)
def test_every_sampler_gives_the_same_images_for_any_batch_size(sampler, options):
  big = _run_local(16, sampler, options)
  np.testing.assert_allclose(_run_local(4, sampler, options), big[:4], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    _run_local(4, sampler, options, first_index=4), big[4:8], rtol=1e-5, atol=1e-5
  )
  assert not np.allclose(big[:4], big[4:8])


def _with_variance(x_t, t):
  """A learned-variance model's output: [..., 2C], the prediction first."""
  return jnp.concatenate([_local_denoiser(x_t, t), 0.7 * x_t], axis=-1)


@pytest.mark.parametrize("sampler, options", SAMPLER_SETTINGS)
def test_a_learned_variance_half_of_the_output_is_ignored(sampler, options):
  np.testing.assert_allclose(
    _run_local(4, sampler, options, denoise_fn=_with_variance),
    _run_local(4, sampler, options),
    rtol=1e-6,
    atol=1e-6,
  )


@pytest.mark.parametrize("sampler, options", SAMPLER_SETTINGS)
def test_clip_x0_keeps_every_sampler_in_range(sampler, options):
  # The exact model of wide data (x0 ~ N(0, 3²)): unclipped samples leave [-1, 1].
  sched = _schedule(50)
  wide = analytic.exact_denoise_fn(analytic.gaussian(np.zeros(IMAGE), 3.0), sched)
  run = lambda **clip: np.asarray(
    _sample_jit(wide, sched, (64, *IMAGE), jax.random.key(6), sampler=sampler, **clip, **options)
  )
  assert np.abs(run()).max() <= 1.0 + 1e-6
  if sampler == "heun":
    assert np.abs(run(clip_x0=False)).max() > 2.0


def test_ddim_with_eta_1_on_every_step_is_ddpm_with_the_posterior_variance():
  sched = _schedule(50)
  shape = (4, *IMAGE)
  key = jax.random.key(8)
  ddpm = _sample_jit(_local_denoiser, sched, shape, key, variance="fixed_small")
  ddim = _sample_jit(_local_denoiser, sched, shape, key, sampler="ddim", eta=1.0)
  np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), rtol=1e-4, atol=1e-4)


def _respaced_output_moments(kept, variance, mu=MU, sigma=SIGMA):
  """Mean and variance of respaced ancestral sampling with the Gaussian eps, in float64.

  improved-diffusion's respacing, written out: over the kept timesteps t_0 < ... < t_{S-1},
  beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}; the steps are the posterior of that chain.
  """
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[kept]
  abar_prev = np.append(1.0, abar[:-1])
  betas = 1.0 - abar / abar_prev
  coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
  coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
  beta_tilde = betas * (1.0 - abar_prev) / (1.0 - abar)
  m, v = 0.0, 1.0
  for k in range(len(kept) - 1, -1, -1):
    gain = np.sqrt(1.0 - abar[k]) / (abar[k] * sigma**2 + 1.0 - abar[k])
    p = (1.0 - np.sqrt(1.0 - abar[k]) * gain) / np.sqrt(abar[k])
    q = np.sqrt(1.0 - abar[k]) * gain * mu
    noise_var = 0.0 if k == 0 else (betas[k] if variance == "fixed_large" else beta_tilde[k])
    m, v = (coef1[k] * p + coef2[k]) * m + coef1[k] * q, (coef1[k] * p + coef2[k]) ** 2 * v
    v += noise_var
  return m, v


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_respaced_ddpm_matches_the_exact_moments_of_the_respaced_chain(variance):
  sched = _schedule(1000)
  shape = (512, 4, 4, 1)
  n = int(np.prod(shape))
  x = _sample_jit(
    _gaussian_eps(sched),
    sched,
    shape,
    jax.random.key(9),
    num_steps=10,
    variance=variance,
    clip_x0=False,
  )
  x = np.asarray(x, np.float64).ravel()
  kept = np.round(np.linspace(0, 999, 10)).astype(int)
  exp_mean, exp_var = _respaced_output_moments(kept, variance)
  other = _respaced_output_moments(kept, "fixed_small" if variance == "fixed_large" else variance)
  se_var = exp_var * np.sqrt(2.0 / (n - 1))
  if variance == "fixed_large":  # 10 large steps: the two variances give very different outputs
    assert abs(other[1] - exp_var) > 20 * se_var
  # 5 standard errors.
  assert abs(x.mean() - exp_mean) < 5.0 * np.sqrt(exp_var / n), (x.mean(), exp_mean)
  assert abs(x.var(ddof=1) - exp_var) < 5.0 * se_var, (x.var(ddof=1), exp_var, se_var)


def test_bad_sampler_num_steps_and_options_are_one_line_errors():
  sched = _schedule(30)
  shape = (2, *IMAGE)
  key = jax.random.key(0)

  def error(**kwargs):
    with pytest.raises(ValueError) as excinfo:
      samplers.sample(_local_denoiser, sched, shape, key, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    return message

  assert "valid: ddpm, ddim, dpm_solver++, heun" in error(sampler="ddpm_typo")
  for sampler, low in samplers.MIN_NUM_STEPS.items():
    for bad in (low - 1, 31):
      message = error(sampler=sampler, num_steps=bad)
      assert f"sample.num_steps={bad}" in message
      assert f"from {low} to 30" in message
  assert "valid: '' (default), uniform, quadratic, logsnr" in error(sampler="ddim", skip="cubic")
  assert "sample.eta=1.5" in error(sampler="ddim", eta=1.5)
  with pytest.raises(TypeError, match="unknown sampler options"):
    samplers.sample(_local_denoiser, sched, shape, key, sampler="ddim", etta=0.5)
  # The same check without sampling, as the config check uses it.
  samplers.check_sampler("heun", None, 30, skip="")
  with pytest.raises(ValueError, match="from 1 to 30"):
    samplers.check_sampler("dpm_solver++", 0, 30)


def test_exact_moments_reference_reproduces_the_data():
  # With the exact eps, 1000 ancestral steps reproduce N(mu, sigma^2) up to the known
  # discretisation bias of the fixed variances: fixed_small slightly under-disperses.
  for variance in ("fixed_large", "fixed_small"):
    m, v = _exact_output_moments(1000, variance)
    assert abs(m - MU) < 1e-4
    assert abs(v - SIGMA**2) < 0.02 * SIGMA**2


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ancestral_sampling_of_gaussian_data(variance):
  num_timesteps = 1000
  sched = _schedule(num_timesteps)
  shape = (256, 8, 8, 1)
  n = int(np.prod(shape))
  x = np.asarray(
    samplers.sample(
      _gaussian_eps(sched), sched, shape, jax.random.key(3), variance=variance, clip_x0=False
    ),
    np.float64,
  ).ravel()
  mean, var = x.mean(), x.var(ddof=1)
  exp_mean, exp_var = _exact_output_moments(num_timesteps, variance)
  # 5 standard errors over n i.i.d. scalars: sigma / sqrt(n) for the mean,
  # sigma^2 sqrt(2 / (n - 1)) for the variance (~0.004 and ~0.0028 here).
  se_mean = np.sqrt(exp_var / n)
  se_var = exp_var * np.sqrt(2.0 / (n - 1))
  assert abs(mean - exp_mean) < 5.0 * se_mean, (mean, exp_mean, se_mean)
  assert abs(var - exp_var) < 5.0 * se_var, (var, exp_var, se_var)
  # Against the data distribution itself: the same tolerance plus the float64 bias bound.
  assert abs(mean - MU) < 5.0 * se_mean + 1e-4
  assert abs(var - SIGMA**2) < 5.0 * se_var + abs(exp_var - SIGMA**2)
  # Independent pixels: neighbouring pixels are uncorrelated.
  pixels = x.reshape(shape)
  corr = np.corrcoef(pixels[:, :, :-1].ravel(), pixels[:, :, 1:].ravel())[0, 1]
  assert abs(corr) < 5.0 / np.sqrt(pixels[:, :, 1:].size)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_short_chain_matches_the_exact_step_moments(variance):
  # Few large steps, where beta_t and beta~_t differ a lot: the output moments pin down the
  # step mean, the noise scale exp(0.5 log_variance) and the variance option.
  num_timesteps, beta_start, beta_end = 4, 0.2, 0.6
  sched = schedules.make_schedule("linear", num_timesteps, beta_start=beta_start, beta_end=beta_end)
  shape = (1024, 4, 4, 1)
  n = int(np.prod(shape))
  x = np.asarray(
    _sample_jit(
      _gaussian_eps(sched), sched, shape, jax.random.key(4), variance=variance, clip_x0=False
    ),
    np.float64,
  ).ravel()
  exp_mean, exp_var = _exact_output_moments(
    num_timesteps, variance, beta_start=beta_start, beta_end=beta_end
  )
  other = "fixed_small" if variance == "fixed_large" else "fixed_large"
  _, other_var = _exact_output_moments(
    num_timesteps, other, beta_start=beta_start, beta_end=beta_end
  )
  se_var = exp_var * np.sqrt(2.0 / (n - 1))
  assert abs(exp_var - other_var) > 20.0 * se_var  # the two options are far apart here
  # 5 standard errors.
  assert abs(x.mean() - exp_mean) < 5.0 * np.sqrt(exp_var / n), (x.mean(), exp_mean)
  assert abs(x.var(ddof=1) - exp_var) < 5.0 * se_var, (x.var(ddof=1), exp_var, se_var)
