"""Tests for diffusion_jax.diffusion: closed forms, Gaussian algebra in float64, round trips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import diffusion, schedules

T = 1000
IMAGE = (4, 4, 3)
# Several timesteps per batch, each example with its own t; includes both ends.
TS = np.array([0, 1, 2, 37, 500, 998, 999], dtype=np.int32)
LOSS_SHAPE = (512, 4, 4, 1)


@functools.cache
def _schedule(name: str = "linear") -> schedules.Schedule:
  return schedules.make_schedule(name, T)


def _ref(name: str = "linear") -> dict[str, np.ndarray]:
  """Float64 betas, alphas and alphas_cumprod, independent of the code under test."""
  if name == "linear":
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
  else:
    t = np.arange(T + 1, dtype=np.float64)
    f = np.cos(((t / T + 0.008) / 1.008) * np.pi / 2.0) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  return {"betas": betas, "alphas": alphas, "abar": abar}


def _b(v: np.ndarray) -> np.ndarray:
  """[B] -> [B, 1, 1, 1]."""
  return np.asarray(v).reshape(-1, 1, 1, 1)


def _data(key: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """x0 uniform in [-1, 1] and standard normal noise, as float32."""
  rng = np.random.default_rng(key)
  x0 = rng.uniform(-1.0, 1.0, (batch, *IMAGE)).astype(np.float32)
  noise = rng.standard_normal((batch, *IMAGE)).astype(np.float32)
  return x0, noise


def _brute_force_posterior(x0, x_t, t):
  """q(x_{t-1} | x_t, x0) in float64 for t >= 1, by completing the square in x_{t-1}.

  q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t) contributes precision alpha_t / beta_t and
  linear term sqrt(alpha_t) x_t / beta_t; q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
  contributes precision 1 / (1 - abar_{t-1}) and linear term sqrt(abar_{t-1}) x0 / (1 - abar_{t-1}).
  """
  r = _ref()
  t = np.asarray(t)
  assert np.all(t >= 1)
  beta, alpha, abar_prev = r["betas"][t], r["alphas"][t], r["abar"][t - 1]
  precision = alpha / beta + 1.0 / (1.0 - abar_prev)
  linear = _b(np.sqrt(alpha) / beta) * np.float64(x_t) + _b(
    np.sqrt(abar_prev) / (1.0 - abar_prev)
  ) * np.float64(x0)
  variance = 1.0 / precision
  return linear * _b(variance), variance


# ---------------------------------------------------------------------------------------------
# q_sample


def test_q_sample_zero_noise_and_zero_signal():
  x0, noise = _data(0, len(TS))
  t = jnp.asarray(TS)
  abar = _ref()["abar"][TS]
  x_t = diffusion.q_sample(_schedule(), jnp.asarray(x0), t, jnp.zeros_like(x0))
  assert x_t.shape == x0.shape and x_t.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x_t), _b(np.sqrt(abar)) * x0, rtol=1e-6, atol=1e-7)
  x_t = diffusion.q_sample(_schedule(), jnp.zeros_like(x0), t, jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(x_t), _b(np.sqrt(1.0 - abar)) * noise, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_is_the_closed_form(name):
  x0, noise = _data(1, len(TS))
  abar = _ref(name)["abar"][TS]
  x_t = diffusion.q_sample(_schedule(name), jnp.asarray(x0), jnp.asarray(TS), jnp.asarray(noise))
  expected = _b(np.sqrt(abar)) * x0 + _b(np.sqrt(1.0 - abar)) * noise
  np.testing.assert_allclose(np.asarray(x_t), expected, rtol=1e-5, atol=1e-6)


def test_q_sample_statistics():
  # One constant image per t, many pixels: x_t ~ N(sqrt(abar) x0, 1 - abar) per pixel.
  ts = np.array([0, 10, 250, 999], dtype=np.int32)
  n = 64 * 64
  x0 = np.full((len(ts), 64, 64, 1), 0.7, np.float32)
  noise = jax.random.normal(jax.random.key(0), x0.shape, jnp.float32)
  x_t = np.asarray(diffusion.q_sample(_schedule(), jnp.asarray(x0), jnp.asarray(ts), noise))
  abar = _ref()["abar"][ts]
  mean = x_t.reshape(len(ts), -1).mean(axis=1)
  var = x_t.reshape(len(ts), -1).var(axis=1, ddof=1)
  exp_mean, exp_var = np.sqrt(abar) * 0.7, 1.0 - abar
  # 5 standard errors: sd / sqrt(n) for the mean, var * sqrt(2 / (n - 1)) for the variance.
  np.testing.assert_array_less(np.abs(mean - exp_mean), 5.0 * np.sqrt(exp_var / n))
  np.testing.assert_array_less(np.abs(var - exp_var), 5.0 * exp_var * np.sqrt(2.0 / (n - 1)))


# ---------------------------------------------------------------------------------------------
# q_posterior_mean_variance


@pytest.mark.parametrize("ts", [[1, 2, 3, 100, 500, 998, 999], [1, 1, 999, 999]])
def test_posterior_matches_brute_force_gaussian_algebra(ts):
  ts = np.asarray(ts, np.int32)
  x0, noise = _data(2, len(ts))
  abar = _ref()["abar"][ts]
  x_t = (_b(np.sqrt(abar)) * x0 + _b(np.sqrt(1.0 - abar)) * noise).astype(np.float32)
  mean, var, log_var = diffusion.q_posterior_mean_variance(
    _schedule(), jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(ts)
  )
  exp_mean, exp_var = _brute_force_posterior(x0, x_t, ts)
  assert mean.shape == x0.shape and mean.dtype == jnp.float32
  assert var.shape == (len(ts), 1, 1, 1)
  assert log_var.shape == (len(ts), 1, 1, 1)
  np.testing.assert_allclose(np.asarray(mean), exp_mean, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(var), _b(exp_var), rtol=1e-5, atol=0)
  np.testing.assert_allclose(np.asarray(log_var), _b(np.log(exp_var)), rtol=0, atol=1e-5)


def test_posterior_at_t0_is_a_point_mass_at_x0():
  ts = np.zeros(3, np.int32)
  x0, noise = _data(3, 3)
  x_t = diffusion.q_sample(_schedule(), jnp.asarray(x0), jnp.asarray(ts), jnp.asarray(noise))
  mean, var, log_var = diffusion.q_posterior_mean_variance(
    _schedule(), jnp.asarray(x0), x_t, jnp.asarray(ts)
  )
  np.testing.assert_allclose(np.asarray(mean), x0, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(var), 0.0)
  # Clipped: log beta~_1 rather than log 0.
  _, exp_var_1 = _brute_force_posterior(x0[:1], np.asarray(x_t)[:1], np.array([1]))
  np.testing.assert_allclose(np.asarray(log_var), np.log(exp_var_1[0]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# predict_x0_from_eps and p_mean_variance


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_predict_x0_from_eps_round_trip(name):
  ts = np.array([0, 1, 2, 37, 500, 900, 998], dtype=np.int32)
  x0, noise = _data(4, len(ts))
  t = jnp.asarray(ts)
  x_t = diffusion.q_sample(_schedule(name), jnp.asarray(x0), t, jnp.asarray(noise))
  got = diffusion.predict_x0_from_eps(_schedule(name), x_t, t, jnp.asarray(noise))
  assert got.shape == x0.shape and got.dtype == jnp.float32
  # float32 rounding of x_t is amplified by 1 / sqrt(abar_t).
  atol = _b(2e-6 / np.sqrt(_ref(name)["abar"][ts]))
  assert np.all(np.abs(np.asarray(got) - x0) <= atol)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_v_target_and_conversions_against_float64(name):
  ts = np.array([0, 1, 2, 37, 500, 900, 998, 999], dtype=np.int32)
  x0, noise = _data(11, len(ts))
  t = jnp.asarray(ts)
  sched = _schedule(name)
  x_t = diffusion.q_sample(sched, jnp.asarray(x0), t, jnp.asarray(noise))
  abar = _b(_ref(name)["abar"][ts])
  v = np.sqrt(abar) * np.float64(noise) - np.sqrt(1.0 - abar) * np.float64(x0)
  got_v = diffusion.v_target(sched, jnp.asarray(x0), t, jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(got_v), v, rtol=0, atol=1e-6)
  # x0 from v is well conditioned at every t (both coefficients are at most 1), unlike x0 from eps.
  got_x0 = diffusion.predict_x0(sched, x_t, t, jnp.asarray(v, jnp.float32), "v")
  np.testing.assert_allclose(np.asarray(got_x0), x0, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(
    np.asarray(diffusion.predict_x0(sched, x_t, t, jnp.asarray(x0), "x0")), x0
  )
  # eps from x0 inverts x0 from eps where 1 - abar_t is not tiny (t = 0 divides by ~1e-2).
  eps = diffusion.predict_eps_from_x0(sched, x_t, t, jnp.asarray(x0))
  atol = _b(2e-6 / np.sqrt(1.0 - abar))
  assert np.all(np.abs(np.asarray(eps) - noise) <= atol)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_every_prediction_with_its_true_target_gives_the_true_posterior(prediction):
  ts = np.array([1, 2, 37, 500, 998, 999], dtype=np.int32)
  x0, noise = _data(12, len(ts))
  t = jnp.asarray(ts)
  sched = _schedule("cosine")
  x_t = diffusion.q_sample(sched, jnp.asarray(x0), t, jnp.asarray(noise))
  target = {
    "eps": jnp.asarray(noise),
    "x0": jnp.asarray(x0),
    "v": diffusion.v_target(sched, jnp.asarray(x0), t, jnp.asarray(noise)),
  }[prediction]
  mean, _, _, pred_x0 = diffusion.p_mean_variance(
    sched, target, x_t, t, clip_x0=False, prediction=prediction
  )
  r = _ref("cosine")
  abar, abar_prev = r["abar"][ts], np.append(1.0, r["abar"])[ts]
  beta = r["betas"][ts]
  # The posterior mean of q(x_{t-1} | x_t, x0), in float64 from the reference schedule.
  coef1 = np.sqrt(abar_prev) * beta / (1.0 - abar)
  coef2 = np.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
  expected = _b(coef1) * np.float64(x0) + _b(coef2) * np.float64(np.asarray(x_t))
  # eps at t = 999 (abar ~ 0) carries float32 error amplified by 1 / sqrt(abar) into x0.
  tol = {"eps": 1e-3, "x0": 1e-5, "v": 1e-5}[prediction]
  np.testing.assert_allclose(np.asarray(mean), expected, rtol=0, atol=tol)
  assert pred_x0.shape == x0.shape


def test_unknown_prediction_name():
  x = jnp.zeros((1, *IMAGE))
  t = jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match="unknown prediction 'score'; valid: eps, x0, v"):
    diffusion.predict_x0(_schedule(), x, t, x, "score")
  with pytest.raises(ValueError, match="valid: eps, x0, v"):
    diffusion.simple_loss(_schedule(), lambda x_t, t: x_t, x, jax.random.key(0), prediction="e")


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_p_mean_variance_with_true_eps_is_the_true_posterior(variance):
  ts = np.array([1, 2, 37, 500, 998, 999], dtype=np.int32)
  x0, noise = _data(5, len(ts))
  t = jnp.asarray(ts)
  x_t = diffusion.q_sample(_schedule(), jnp.asarray(x0), t, jnp.asarray(noise))
  mean, _, _, pred_x0 = diffusion.p_mean_variance(
    _schedule(), jnp.asarray(noise), x_t, t, variance=variance, clip_x0=False
  )
  exp_mean, _ = _brute_force_posterior(x0, np.asarray(x_t), ts)
  assert mean.shape == x0.shape and pred_x0.shape == x0.shape
  np.testing.assert_allclose(np.asarray(mean), exp_mean, rtol=0, atol=2e-5)
  atol = _b(2e-6 / np.sqrt(_ref()["abar"][ts]))
  assert np.all(np.abs(np.asarray(pred_x0) - x0) <= atol)


def test_p_mean_is_the_eps_form_of_the_ddpm_mean():
  # For any eps: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), including t = 0.
  ts = np.array([0, 1, 2, 37, 500, 998, 999], dtype=np.int32)
  rng = np.random.default_rng(6)
  x_t = rng.standard_normal((len(ts), *IMAGE)).astype(np.float32)
  eps = rng.standard_normal((len(ts), *IMAGE)).astype(np.float32)
  mean, _, _, _ = diffusion.p_mean_variance(
    _schedule(), jnp.asarray(eps), jnp.asarray(x_t), jnp.asarray(ts), clip_x0=False
  )
  r = _ref()
  beta, alpha, abar = r["betas"][ts], r["alphas"][ts], r["abar"][ts]
  expected = (np.float64(x_t) - _b(beta / np.sqrt(1.0 - abar)) * eps) / _b(np.sqrt(alpha))
  # Relative to the size of the pred_x0 term, which carries the float32 error at large t.
  np.testing.assert_allclose(np.asarray(mean), expected, rtol=1e-4, atol=5e-5)


def test_fixed_large_and_fixed_small_variances():
  ts = np.array([0, 1, 2, 37, 500, 999], dtype=np.int32)
  x_t = np.random.default_rng(7).standard_normal((len(ts), *IMAGE)).astype(np.float32)
  eps = np.zeros_like(x_t)
  r = _ref()
  abar_prev = np.concatenate([[1.0], r["abar"][:-1]])
  beta_tilde = r["betas"] * (1.0 - abar_prev) / (1.0 - r["abar"])
  out = {}
  for variance in ("fixed_large", "fixed_small"):
    _, var, log_var, _ = diffusion.p_mean_variance(
      _schedule(), jnp.asarray(eps), jnp.asarray(x_t), jnp.asarray(ts), variance=variance
    )
    # Per example, constant over pixels.
    var = np.broadcast_to(np.asarray(var), x_t.shape).reshape(len(ts), -1)
    log_var = np.broadcast_to(np.asarray(log_var), x_t.shape).reshape(len(ts), -1)
    assert np.all(var == var[:, :1]) and np.all(log_var == log_var[:, :1])
    out[variance] = (var[:, 0], log_var[:, 0])

  large_var, large_log = out["fixed_large"]
  # beta_t, except log beta~_1 at t = 0 (beta_0 would put a tiny variance in the decoder).
  exp_large = np.concatenate([[beta_tilde[1]], r["betas"][ts[1:]]])
  np.testing.assert_allclose(large_var, exp_large, rtol=1e-5, atol=0)
  np.testing.assert_allclose(large_log, np.log(exp_large), rtol=0, atol=1e-5)

  small_var, small_log = out["fixed_small"]
  np.testing.assert_allclose(small_var, beta_tilde[ts], rtol=1e-5, atol=0)
  exp_small_log = np.log(np.concatenate([[beta_tilde[1]], beta_tilde[ts[1:]]]))
  np.testing.assert_allclose(small_log, exp_small_log, rtol=0, atol=1e-5)

  # beta_t > beta~_t for t >= 1.
  assert np.all(large_var[1:] > small_var[1:])


def test_unknown_variance_name():
  x = jnp.zeros((1, *IMAGE))
  with pytest.raises(ValueError) as excinfo:
    diffusion.p_mean_variance(_schedule(), x, x, jnp.array([5], jnp.int32), variance="learned_typo")
  assert "fixed_large" in str(excinfo.value)
  assert "fixed_small" in str(excinfo.value)


def test_clipping_bounds_pred_x0_and_feeds_the_mean():
  ts = np.array([0, 1, 37, 500, 999], dtype=np.int32)
  rng = np.random.default_rng(8)
  x_t = (2.0 * rng.standard_normal((len(ts), *IMAGE))).astype(np.float32)
  eps = (3.0 * rng.standard_normal((len(ts), *IMAGE))).astype(np.float32)
  args = (_schedule(), jnp.asarray(eps), jnp.asarray(x_t), jnp.asarray(ts))
  _, _, _, raw = diffusion.p_mean_variance(*args, clip_x0=False)
  mean, _, _, clipped = diffusion.p_mean_variance(*args, clip_x0=True)
  raw, clipped = np.asarray(raw), np.asarray(clipped)
  assert np.mean(np.abs(raw) > 1.0) > 0.3  # the clip is exercised
  assert np.all(np.abs(clipped) <= 1.0)
  np.testing.assert_allclose(clipped, np.clip(raw, -1.0, 1.0), rtol=0, atol=1e-6)

  r = _ref()
  abar_prev = np.concatenate([[1.0], r["abar"][:-1]])[ts]
  beta, alpha, abar = r["betas"][ts], r["alphas"][ts], r["abar"][ts]
  coef1 = beta * np.sqrt(abar_prev) / (1.0 - abar)
  coef2 = (1.0 - abar_prev) * np.sqrt(alpha) / (1.0 - abar)
  expected = _b(coef1) * np.float64(clipped) + _b(coef2) * np.float64(x_t)
  np.testing.assert_allclose(np.asarray(mean), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# simple_loss


def _exact_denoiser(sched, x0, extra=None):
  """Recovers the noise from x_t given the clean x0; adds `extra(t)` [B] to the output."""

  def denoise_fn(x_t, t):
    assert t.shape == (x0.shape[0],)
    assert t.dtype == jnp.int32
    sqrt_abar = sched.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sqrt_one_minus_abar = sched.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eps = (x_t - sqrt_abar * x0) / sqrt_one_minus_abar
    if extra is not None:
      eps = eps + extra(t).reshape(-1, 1, 1, 1)
    return eps

  return denoise_fn


def _loss_x0(seed: int) -> jax.Array:
  """x0 uniform in [-1, 1]; one shape for every loss test, so the draws compile once."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1.0, 1.0, LOSS_SHAPE), jnp.float32)


def test_simple_loss_is_zero_for_the_true_noise():
  x0 = _loss_x0(9)
  sched = _schedule()
  loss = diffusion.simple_loss(sched, _exact_denoiser(sched, x0), x0, jax.random.key(1))
  assert loss.shape == (LOSS_SHAPE[0],)
  assert loss.dtype == jnp.float32
  assert float(jnp.max(loss)) < 1e-7


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_simple_loss_is_zero_for_the_true_x0_and_v_targets(prediction):
  x0 = _loss_x0(13)
  sched = _schedule()
  eps_fn = _exact_denoiser(sched, x0)

  def denoise_fn(x_t, t):
    if prediction == "x0":
      return jnp.broadcast_to(x0, x_t.shape)
    return diffusion.v_target(sched, x0, t, eps_fn(x_t, t))

  loss = diffusion.simple_loss(sched, denoise_fn, x0, jax.random.key(1), prediction=prediction)
  # The exact eps recovered from x_t carries float32 rounding amplified by 1/sqrt(1 - abar_t).
  assert float(jnp.max(loss)) < 1e-6
  # A wrong target is not zero: the x0 model scored as eps has a loss near E[(x0 - eps)^2] = 4/3.
  wrong = diffusion.simple_loss(sched, denoise_fn, x0, jax.random.key(1), prediction="eps")
  assert float(jnp.mean(wrong)) > 0.3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_simple_loss_per_example_keys_matches_one_example_at_a_time(prediction):
  x0 = _loss_x0(14)[:6]
  keys = jax.random.split(jax.random.key(5), 6)
  sched = _schedule()
  calls = []

  def denoise_fn(x_t, t):
    calls.append(x_t.shape[0])
    # Depends on x_t and t nonlinearly, so a different t or noise shows in the loss.
    return jnp.tanh(x_t) * (1.0 + t.reshape(-1, 1, 1, 1) / 100.0)

  batched = diffusion.simple_loss_per_example_keys(
    sched, denoise_fn, x0, keys, prediction=prediction
  )
  assert calls == [6]  # one call on the whole batch
  single = [
    diffusion.simple_loss(sched, denoise_fn, x0[j : j + 1], keys[j], prediction=prediction)[0]
    for j in range(6)
  ]
  np.testing.assert_allclose(np.asarray(batched), np.asarray(single), rtol=1e-6)
  assert len(set(np.asarray(batched).tolist())) == 6
  # Rows follow their keys: permuting the keys permutes the losses of identical examples.
  same = jnp.broadcast_to(x0[:1], x0.shape)
  a = diffusion.simple_loss_per_example_keys(sched, denoise_fn, same, keys, prediction=prediction)
  b = diffusion.simple_loss_per_example_keys(
    sched, denoise_fn, same, keys[::-1], prediction=prediction
  )
  np.testing.assert_allclose(np.asarray(a), np.asarray(b)[::-1], rtol=1e-6)


def test_simple_loss_of_zero_prediction_is_mean_squared_noise():
  n = np.prod(LOSS_SHAPE)
  x0 = _loss_x0(10)
  losses = []
  for seed in range(2):
    loss = diffusion.simple_loss(
      _schedule(), lambda x_t, t: jnp.zeros_like(x_t), x0, jax.random.key(seed)
    )
    # Mean of eps^2 has mean 1 and variance 2 / n (chi-square); 5 standard errors.
    assert abs(float(loss.mean()) - 1.0) < 5.0 * np.sqrt(2.0 / n)
    losses.append(np.asarray(loss))
  assert not np.allclose(losses[0], losses[1])


def test_simple_loss_draws_t_uniformly():
  # An offset of sqrt(t) on the exact noise makes the per-example loss equal to t.
  t_max, num_keys = 10, 8
  sched = schedules.make_schedule("linear", t_max)
  x0 = _loss_x0(12)
  denoise_fn = _exact_denoiser(sched, x0, extra=lambda t: jnp.sqrt(t.astype(jnp.float32)))
  loss = np.concatenate(
    [
      np.asarray(diffusion.simple_loss(sched, denoise_fn, x0, jax.random.key(k)))
      for k in range(num_keys)
    ]
  )
  t = np.rint(loss).astype(int)
  np.testing.assert_allclose(loss, t, rtol=0, atol=1e-3)
  counts = np.bincount(t, minlength=t_max)
  assert counts.shape == (t_max,)  # nothing outside 0..T-1
  # Each count ~ Binomial(n, 1/T); 5 standard deviations.
  n = len(loss)
  assert np.all(np.abs(counts - n / t_max) < 5.0 * np.sqrt(n * (1 / t_max) * (1 - 1 / t_max)))


def test_simple_loss_same_key_same_loss_and_jit():
  x0 = _loss_x0(11)
  fn = lambda x_t, t: 0.5 * x_t
  a = diffusion.simple_loss(_schedule(), fn, x0, jax.random.key(5))
  b = diffusion.simple_loss(_schedule(), fn, x0, jax.random.key(5))
  jitted = jax.jit(lambda sched, x, key: diffusion.simple_loss(sched, fn, x, key))
  c = jitted(_schedule(), x0, jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5)
  d = diffusion.simple_loss(_schedule(), fn, x0, jax.random.key(6))
  assert not np.allclose(np.asarray(a), np.asarray(d))


# ---------------------------------------------------------------------------------------------
# learned-range variance


def _learned_output(eps: np.ndarray, v: np.ndarray) -> jnp.ndarray:
  return jnp.concatenate([jnp.asarray(eps), jnp.asarray(v, jnp.float32)], axis=-1)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_learned_range_endpoints_are_the_fixed_variances(name):
  """v = +1 gives fixed_large's log-variance at every t >= 1 and v = -1 fixed_small's at every t.

  Bit for bit (the interpolation weights are exactly 1 and 0). At t = 0, v = +1 gives log β[0]
  instead of fixed_large's log β̃[1], and the variance exp(log β̃[1]) of v = -1 stands in for
  fixed_small's unclipped β̃[0] = 0; the sampler uses only the log-variance, and not at t = 0.
  """
  sched = _schedule(name)
  ts = np.arange(T, dtype=np.int32)
  rng = np.random.default_rng(20)
  x_t = rng.standard_normal((T, 2, 2, 3)).astype(np.float32)
  eps = rng.standard_normal((T, 2, 2, 3)).astype(np.float32)
  args = (jnp.asarray(x_t), jnp.asarray(ts))
  fixed = {
    variance: diffusion.p_mean_variance(sched, jnp.asarray(eps), *args, variance=variance)
    for variance in ("fixed_large", "fixed_small")
  }
  for v, variance in ((1.0, "fixed_large"), (-1.0, "fixed_small")):
    mean, var, log_var, pred_x0 = diffusion.p_mean_variance(
      sched, _learned_output(eps, np.full_like(eps, v)), *args, variance="learned_range"
    )
    assert var.shape == log_var.shape == x_t.shape  # per pixel
    f_mean, f_var, f_log_var, f_pred_x0 = (np.asarray(a) for a in fixed[variance])
    np.testing.assert_array_equal(np.asarray(mean), f_mean)
    np.testing.assert_array_equal(np.asarray(pred_x0), f_pred_x0)
    f_log_var = np.broadcast_to(f_log_var, x_t.shape)
    f_var = np.broadcast_to(f_var, x_t.shape)
    first = 1 if variance == "fixed_large" else 0
    np.testing.assert_array_equal(np.asarray(log_var)[first:], f_log_var[first:])
    np.testing.assert_allclose(np.asarray(var)[1:], f_var[1:], rtol=1e-6)
  # t = 0 with v = +1: beta_0.
  _, var, log_var, _ = diffusion.p_mean_variance(
    sched,
    _learned_output(eps[:1], np.ones_like(eps[:1])),
    *(a[:1] for a in args),
    variance="learned_range",
  )
  np.testing.assert_allclose(np.asarray(var), _ref(name)["betas"][0], rtol=1e-5)


def test_learned_range_interpolates_log_variance_per_pixel():
  ts = np.array([0, 1, 2, 37, 500, 998, 999], dtype=np.int32)
  rng = np.random.default_rng(21)
  x_t = rng.standard_normal((len(ts), *IMAGE)).astype(np.float32)
  eps = rng.standard_normal((len(ts), *IMAGE)).astype(np.float32)
  v = rng.uniform(-1.0, 1.0, (len(ts), *IMAGE)).astype(np.float32)
  _, var, log_var, _ = diffusion.p_mean_variance(
    _schedule(),
    _learned_output(eps, v),
    jnp.asarray(x_t),
    jnp.asarray(ts),
    variance="learned_range",
  )
  r = _ref()
  abar_prev = np.concatenate([[1.0], r["abar"][:-1]])
  beta_tilde = r["betas"] * (1.0 - abar_prev) / (1.0 - r["abar"])
  min_log = np.log(np.append(beta_tilde[1], beta_tilde[1:]))[ts]
  max_log = np.log(r["betas"])[ts]
  frac = (np.float64(v) + 1.0) / 2.0
  expected = frac * _b(max_log) + (1.0 - frac) * _b(min_log)
  np.testing.assert_allclose(np.asarray(log_var), expected, rtol=0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(var), np.exp(expected), rtol=2e-5)
  # Between the two fixed variances (inclusive) for t >= 1.
  assert np.all(np.asarray(log_var)[1:] <= _b(max_log[1:]) + 1e-6)
  assert np.all(np.asarray(log_var)[1:] >= _b(min_log[1:]) - 1e-6)


def test_split_output_and_output_channels():
  out = jnp.arange(2 * 2 * 2 * 6, dtype=jnp.float32).reshape(2, 2, 2, 6)
  prediction, v = diffusion.split_output(out, "learned_range")
  np.testing.assert_array_equal(np.asarray(prediction), np.asarray(out[..., :3]))
  np.testing.assert_array_equal(np.asarray(v), np.asarray(out[..., 3:]))
  for variance in ("fixed_large", "fixed_small"):
    prediction, v = diffusion.split_output(out, variance)
    assert prediction is out and v is None
    assert diffusion.output_channels(3, variance) == 3
  assert diffusion.output_channels(3, "learned_range") == 6
  with pytest.raises(ValueError, match="even number of output channels"):
    diffusion.split_output(out[..., :5], "learned_range")
  with pytest.raises(ValueError, match="valid: fixed_large, fixed_small, learned_range"):
    diffusion.output_channels(3, "learned")
  # A learned-range output of the wrong width for x_t is a shape error, not a silent broadcast.
  with pytest.raises(AssertionError):
    diffusion.p_mean_variance(
      _schedule(), out[..., :4], out[..., :3], jnp.array([3, 4]), variance="learned_range"
    )


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_prediction_conversions_round_trip(name):
  """v -> x0 -> eps -> v and eps -> x0 -> v -> x0 -> eps, in float32 against the start.

  x0 from v and v from (x0, eps) have coefficients at most 1; eps from x0 divides by
  sqrt(1 - abar_t) (about 1e-2 at t = 0), x0 from eps by sqrt(abar_t) (about 1e-2 at the last t
  of the cosine schedule): the tolerances scale with those factors.
  """
  ts = np.array([0, 1, 2, 37, 500, 900, 998, 999], dtype=np.int32)
  sched = _schedule(name)
  rng = np.random.default_rng(22)
  x_t = jnp.asarray(rng.standard_normal((len(ts), *IMAGE)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((len(ts), *IMAGE)), jnp.float32)
  t = jnp.asarray(ts)
  abar = _b(_ref(name)["abar"][ts])
  x0 = diffusion.predict_x0(sched, x_t, t, v, "v")
  eps = diffusion.predict_eps_from_x0(sched, x_t, t, x0)
  v_back = diffusion.v_target(sched, x0, t, eps)
  assert np.all(np.abs(np.asarray(v_back - v)) <= 3e-6 / np.sqrt(1.0 - abar))
  # The same x0 from eps and from v, and the eps-model's x0 turned back into eps.
  x0_from_eps = diffusion.predict_x0(sched, x_t, t, eps, "eps")
  assert np.all(np.abs(np.asarray(x0_from_eps - x0)) <= 3e-6 / np.sqrt(abar * (1.0 - abar)))
  eps2 = diffusion.predict_eps_from_x0(sched, x_t, t, x0_from_eps)
  assert np.all(np.abs(np.asarray(eps2 - eps)) <= 3e-6 / np.sqrt(abar * (1.0 - abar)))
  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps holds for the converted pair.
  np.testing.assert_allclose(
    np.asarray(diffusion.q_sample(sched, x0, t, eps)), np.asarray(x_t), rtol=0, atol=1e-5
  )


def test_draw_t_from_probabilities():
  t_max, n = 8, 4000
  sched = schedules.make_schedule("linear", t_max)
  probs = jnp.asarray([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0], jnp.float32)
  keys = jax.random.split(jax.random.key(0), n)
  draw = jax.jit(jax.vmap(lambda k: diffusion.draw_t_and_noise(sched, k, (1, 2), t_probs=probs)))
  t, noise = draw(keys)
  counts = np.bincount(np.asarray(t).ravel(), minlength=t_max)
  p = np.asarray(probs, np.float64)
  assert counts[-1] == 0  # p = 0 is never drawn
  # Each count ~ Binomial(n, p_t); 5 standard deviations.
  assert np.all(np.abs(counts - n * p) <= 5.0 * np.sqrt(n * p * (1.0 - p)) + 1e-9), counts
  # The noise does not depend on how t is drawn.
  _, uniform_noise = jax.vmap(lambda k: diffusion.draw_t_and_noise(sched, k, (1, 2)))(keys)
  np.testing.assert_array_equal(np.asarray(noise), np.asarray(uniform_noise))
