"""Tests for diffusion_jax.analytic: the exact scores, the exact ODE map and the distances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm

from diffusion_jax.core import schedules
from diffusion_jax.testing import analytic

PROBLEMS = analytic.standard_problems()


def _log_density(data, x_t, alpha_bar):
  """log p_t(x_t) of one example, written independently of analytic.py."""
  alpha, sigma2 = jnp.sqrt(alpha_bar), 1.0 - alpha_bar
  scale = jnp.sqrt(alpha_bar * jnp.square(data.stds) + sigma2)  # [K, *E]
  per_component = jnp.sum(
    norm.logpdf(x_t[None], alpha * data.means, scale).reshape(scale.shape[0], -1), axis=1
  )
  return logsumexp(per_component + data.log_weights)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_exact_eps_is_minus_sigma_times_the_score(name):
  data = PROBLEMS[name]
  event = data.means.shape[1:]
  alpha_bar = jnp.array([0.999, 0.9, 0.5, 0.1, 0.001, 0.3])
  x_t = jax.random.normal(jax.random.key(0), (6, *event))
  score = jax.jit(jax.vmap(jax.grad(_log_density, argnums=1), (None, 0, 0)))(data, x_t, alpha_bar)
  sigma = jnp.sqrt(1 - alpha_bar).reshape(-1, *[1] * len(event))
  alpha = jnp.sqrt(alpha_bar).reshape(sigma.shape)
  eps = jax.jit(analytic.exact_eps)(data, x_t, alpha_bar)
  np.testing.assert_allclose(eps, -sigma * score, rtol=2e-4, atol=2e-5)
  # Tweedie: E[x0 | x_t] = (x_t + σ² ∇ log p) / α.
  x0 = jax.jit(analytic.exact_x0)(data, x_t, alpha_bar)
  np.testing.assert_allclose(x0, (x_t - sigma * eps) / alpha, rtol=2e-4, atol=2e-4)


def test_gaussian_eps_closed_form_and_predictions():
  mean, std = np.array([0.3, -0.2]), np.array([0.5, 0.2])
  data = analytic.gaussian(mean, std)
  schedule = schedules.make_schedule("linear", 100)
  x_t = jax.random.normal(jax.random.key(1), (5, 2))
  t = jnp.array([0, 10, 50, 90, 99])
  abar = schedule.alphas_cumprod[t][:, None]
  expected = jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mean) / (abar * std**2 + 1 - abar)
  outputs = {p: analytic.exact_denoise_fn(data, schedule, p)(x_t, t) for p in ("eps", "x0", "v")}
  np.testing.assert_allclose(outputs["eps"], expected, rtol=1e-5, atol=1e-6)
  # x_t = α x0 + σ ε and v = α ε - σ x0.
  alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1 - abar)
  np.testing.assert_allclose(alpha * outputs["x0"] + sigma * outputs["eps"], x_t, atol=1e-5)
  np.testing.assert_allclose(
    outputs["v"], alpha * outputs["eps"] - sigma * outputs["x0"], atol=1e-6
  )
  # Float timesteps at integer values read the same ᾱ as integer ones.
  np.testing.assert_allclose(
    analytic.exact_denoise_fn(data, schedule)(x_t, t.astype(jnp.float32)), expected, rtol=1e-4
  )


def test_ode_solution_rk4_matches_the_closed_form():
  # The same Gaussian written as two equal components goes through the RK4 path.
  schedule = schedules.make_schedule("cosine", 200)
  one = analytic.gaussian([0.3, -0.2], [0.5, 0.2])
  two = analytic.mixture([0.5, 0.5], np.array([[0.3, -0.2]] * 2), np.array([[0.5, 0.2]] * 2))
  x_T = jax.random.normal(jax.random.key(2), (64, 2))
  closed = analytic.ode_solution(one, schedule, x_T)
  rk4 = analytic.ode_solution(two, schedule, x_T, num_steps=400)
  np.testing.assert_allclose(rk4, closed, atol=1e-7)
  # With σ̃_max ≫ 1 and σ̃_min ≪ s the map is about x0 = μ + s x_T: N(0, I) goes to the data.
  shift = closed - np.array([0.3, -0.2])
  np.testing.assert_allclose(shift, np.array([0.5, 0.2]) * np.asarray(x_T), rtol=0.02, atol=1e-3)


def test_distances():
  data = PROBLEMS["gaussian_2d"]
  n = 10_000
  draw = jax.jit(analytic.sample_data, static_argnums=2)
  exact = np.asarray(draw(data, jax.random.key(3), n))
  np.testing.assert_allclose(exact.mean(0), [0.3, -0.2], atol=0.02)
  np.testing.assert_allclose(exact.std(0), [0.5, 0.2], rtol=0.03)
  # The KL of exact draws is the sampling floor, about (d + d(d+1)/2) / (2n) = 2.5e-4.
  assert analytic.gaussian_kl(exact, data) < 2e-3
  assert analytic.gaussian_kl(exact + np.array([0.1, 0.0]), data) == pytest.approx(0.02, rel=0.1)
  other = np.asarray(draw(data, jax.random.key(4), n))
  key = jax.random.key(5)
  assert analytic.sliced_wasserstein(exact, exact, key) == 0.0
  assert analytic.sliced_wasserstein(exact, other, key) < 0.015
  # A shift by δ along x gives SW₂ = δ √(E[u_x²]) = δ / √2 in 2-D.
  shifted = analytic.sliced_wasserstein(exact, exact + np.array([0.2, 0.0]), key)
  assert shifted == pytest.approx(0.2 / np.sqrt(2), rel=0.1)
