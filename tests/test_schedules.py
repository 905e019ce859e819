"""Tests for diffusion_jax.schedules against float64 NumPy references of each formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import schedules

FIELDS = (
  "betas",
  "alphas_cumprod",
  "alphas_cumprod_prev",
  "sqrt_alphas_cumprod",
  "sqrt_one_minus_alphas_cumprod",
  "posterior_variance",
  "posterior_log_variance_clipped",
  "posterior_mean_coef1",
  "posterior_mean_coef2",
)

# A float64 value cast once to float32 is within half an ulp (2**-24 relative); allow about two
# ulps. The same quantities accumulated in float32 (e.g. a float32 cumprod over 1000 steps) are off
# by several times this.
RTOL = 2.5e-7


def _cosine_alphas_cumprod_closed_form(num_timesteps: int, s: float) -> np.ndarray:
  """f(t) / f(0) for t = 0..T, in float64."""
  t = np.arange(num_timesteps + 1, dtype=np.float64)
  f = np.cos(((t / num_timesteps + s) / (1.0 + s)) * np.pi / 2.0) ** 2
  return f / f[0]


def _reference_betas(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
  if name == "linear":
    return np.linspace(
      kwargs.get("beta_start", 1e-4), kwargs.get("beta_end", 0.02), num_timesteps, dtype=np.float64
    )
  abar = _cosine_alphas_cumprod_closed_form(num_timesteps, kwargs.get("s", 0.008))
  return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)


def _reference_fields(betas: np.ndarray) -> dict[str, np.ndarray]:
  """Every schedule field from its formula, in float64."""
  assert betas.dtype == np.float64
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  return {
    "betas": betas,
    "alphas_cumprod": abar,
    "alphas_cumprod_prev": abar_prev,
    "sqrt_alphas_cumprod": np.sqrt(abar),
    "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
    "posterior_variance": posterior_variance,
    "posterior_log_variance_clipped": np.log(
      np.concatenate([[posterior_variance[1]], posterior_variance[1:]])
    ),
    "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
    "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
  }


@pytest.mark.parametrize("num_timesteps", [10, 1000])
def test_linear_betas_match_float64_linspace(num_timesteps):
  sched = schedules.make_schedule("linear", num_timesteps)
  expected = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
  np.testing.assert_allclose(np.asarray(sched.betas, np.float64), expected, rtol=RTOL, atol=0)
  assert sched.num_timesteps == num_timesteps


def test_linear_kwargs_are_used():
  sched = schedules.make_schedule("linear", 50, beta_start=1e-3, beta_end=0.05)
  expected = np.linspace(1e-3, 0.05, 50, dtype=np.float64)
  np.testing.assert_allclose(np.asarray(sched.betas, np.float64), expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
  "name,num_timesteps,kwargs",
  [
    ("linear", 1000, {}),
    ("linear", 7, {"beta_start": 1e-3, "beta_end": 0.2}),
    ("cosine", 1000, {}),
    ("cosine", 40, {"s": 0.02}),
  ],
)
def test_every_field_matches_float64_formula(name, num_timesteps, kwargs):
  sched = schedules.make_schedule(name, num_timesteps, **kwargs)
  expected = _reference_fields(_reference_betas(name, num_timesteps, **kwargs))
  for field in FIELDS:
    got = getattr(sched, field)
    assert got.dtype == jnp.float32, field
    assert got.shape == (num_timesteps,), field
    np.testing.assert_allclose(
      np.asarray(got, np.float64), expected[field], rtol=RTOL, atol=1e-30, err_msg=field
    )


def test_posterior_values_at_t0():
  sched = schedules.make_schedule("linear", 100)
  assert float(sched.alphas_cumprod_prev[0]) == 1.0
  # beta~_0 = 0 exactly (x_{-1} = x0 is known), hence the clipped log variance uses beta~_1.
  assert float(sched.posterior_variance[0]) == 0.0
  assert float(sched.posterior_mean_coef2[0]) == 0.0
  np.testing.assert_allclose(float(sched.posterior_mean_coef1[0]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
    float(sched.posterior_log_variance_clipped[0]),
    np.log(float(sched.posterior_variance[1])),
    rtol=1e-6,
  )
  assert np.all(np.isfinite(np.asarray(sched.posterior_log_variance_clipped)))


@pytest.mark.parametrize("num_timesteps,s", [(1000, 0.008), (100, 0.008), (64, 0.05)])
def test_cosine_alphas_cumprod_closed_form(num_timesteps, s):
  sched = schedules.make_schedule("cosine", num_timesteps, s=s)
  betas = np.asarray(sched.betas, np.float64)
  abar = np.asarray(sched.alphas_cumprod, np.float64)
  closed = _cosine_alphas_cumprod_closed_form(num_timesteps, s)

  assert np.all(betas > 0)
  assert np.all(betas <= np.float32(0.999))
  # f(T) = cos^2(pi/2) ~ 0, so the last beta is the one that hits the clip.
  assert betas[-1] == np.float32(0.999)

  # Index t of the schedule is abar after t+1 steps: f(t+1)/f(0) while no beta up to t is clipped.
  unclipped = np.cumprod(betas < np.float32(0.999)).astype(bool)
  assert unclipped.sum() >= num_timesteps - 2
  np.testing.assert_allclose(abar[unclipped], closed[1:][unclipped], rtol=1e-6, atol=0)
  # After a clip, abar keeps following cumprod(1 - betas).
  first_clipped = int(unclipped.sum())
  np.testing.assert_allclose(
    abar[first_clipped], abar[first_clipped - 1] * (1.0 - 0.999), rtol=1e-5, atol=0
  )

  assert np.all(np.diff(abar) < 0)
  assert 0.0 < abar[-1] < abar[0] < 1.0


def test_cosine_s_changes_the_schedule():
  a = schedules.make_schedule("cosine", 100, s=0.008)
  b = schedules.make_schedule("cosine", 100, s=0.1)
  assert not np.allclose(np.asarray(a.betas), np.asarray(b.betas))


def test_linear_alphas_cumprod_monotone_and_bounded():
  sched = schedules.make_schedule("linear", 1000)
  abar = np.asarray(sched.alphas_cumprod)
  assert np.all(np.diff(abar) < 0)
  assert np.all((abar > 0) & (abar < 1))
  # Total noise at t = T-1 for the DDPM setting: abar_{T-1} = prod(1 - beta) ~ 4.0e-5.
  np.testing.assert_allclose(abar[-1], np.prod(1.0 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5)


def test_schedule_is_a_pytree():
  sched = schedules.make_schedule("linear", 20)
  leaves = jax.tree.leaves(sched)
  leaf_ids = {id(leaf) for leaf in leaves}
  for field in FIELDS:
    assert id(getattr(sched, field)) in leaf_ids, field
  for leaf in leaves:
    assert isinstance(leaf, jax.Array)
    assert leaf.shape == (20,)
    assert leaf.dtype == jnp.float32

  doubled = jax.tree.map(lambda x: 2 * x, sched)
  assert type(doubled) is type(sched)
  assert doubled.num_timesteps == 20
  np.testing.assert_array_equal(np.asarray(doubled.betas), 2 * np.asarray(sched.betas))


def test_schedule_under_jit_has_static_num_timesteps():
  traced_num_timesteps = []

  @jax.jit
  def f(sched, t):
    traced_num_timesteps.append(sched.num_timesteps)
    # Only a Python int can size an array inside jit.
    steps = jnp.arange(sched.num_timesteps)
    return sched.betas[t], steps.sum()

  s20 = schedules.make_schedule("linear", 20)
  beta, total = f(s20, 3)
  np.testing.assert_allclose(float(beta), float(s20.betas[3]), rtol=0)
  assert int(total) == 20 * 19 // 2
  assert traced_num_timesteps == [20]
  assert all(type(n) is int for n in traced_num_timesteps)

  # Same structure and length: cached. A different length is a different static value: retraced.
  f(schedules.make_schedule("linear", 20, beta_end=0.05), 3)
  assert traced_num_timesteps == [20]
  _, total = f(schedules.make_schedule("linear", 30), 3)
  assert int(total) == 30 * 29 // 2
  assert traced_num_timesteps == [20, 30]


def test_unknown_schedule_name():
  with pytest.raises(ValueError) as excinfo:
    schedules.make_schedule("quadratic_typo", 10)
  message = str(excinfo.value)
  assert "linear" in message
  assert "cosine" in message


def test_a_schedule_built_inside_a_trace_holds_concrete_arrays():
  """So that a cached Schedule first built under jit is reused by later traces, not leaked."""
  built = []

  @jax.jit
  def scaled(x):
    built.append(schedules.make_schedule("cosine", 10))
    return x * built[-1].betas[3]

  eager = schedules.make_schedule("cosine", 10)
  np.testing.assert_allclose(scaled(2.0), 2.0 * eager.betas[3], rtol=1e-6)
  for leaf in jax.tree.leaves(built[0]):
    assert not isinstance(leaf, jax.core.Tracer)
  np.testing.assert_array_equal(built[0].alphas_cumprod, eager.alphas_cumprod)
  # Reused in another trace: a leaked tracer would raise UnexpectedTracerError here.
  np.testing.assert_allclose(jax.jit(lambda x: x + built[0].betas[3])(1.0), 1.0 + eager.betas[3])
