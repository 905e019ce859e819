"""Sampler accuracy with exact scores (diffusion_jax.analytic): convergence, orders, distributions.

The model is replaced by the exact E[ε | x_t] of Gaussian (mixture) data, so the only error left
is the sampler's discretisation. Deterministic samplers are compared with the exact
probability-flow ODE solution from the same x_T (`analytic.ode_solution`); stochastic ones with
the data distribution, within stated multiples of the sampling standard error.

On the mixture a few trajectories pass near the boundary between two modes, where the flow
amplifies any step error; they dominate the RMS error, so the orders there use the median
per-sample error (the typical trajectory). On the Gaussian both agree.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.core import schedules
from diffusion_jax.sampling import samplers, solvers
from diffusion_jax.testing import analytic

PROBLEMS = analytic.standard_problems()
BATCH = 256

# XLA's cheapest pipeline and the shared compilation cache: ~40 small programs compile here.
pytestmark = pytest.mark.usefixtures("fast_compile")


@functools.cache
def _schedule() -> schedules.Schedule:
  return schedules.make_schedule("linear", 1000)


@functools.cache
def _compiled(problem, sampler, num_steps, batch, prediction, options):
  data, schedule = PROBLEMS[problem], _schedule()
  denoise_fn = analytic.exact_denoise_fn(data, schedule, prediction)
  shape = (batch, *data.means.shape[1:])
  return jax.jit(
    lambda key: samplers.sample(
      denoise_fn,
      schedule,
      shape,
      key,
      sampler=sampler,
      num_steps=num_steps,
      prediction=prediction,
      clip_x0=False,
      **dict(options),
    )
  )


def _run(problem, sampler, num_steps, *, batch=BATCH, seed=0, prediction="eps", **options):
  """Samples [batch, *E] (float64) of the exact model of `problem`."""
  fn = _compiled(problem, sampler, num_steps, batch, prediction, tuple(sorted(options.items())))
  return np.asarray(fn(jax.random.key(seed)), np.float64)


@functools.cache
def _reference(problem, batch=BATCH, seed=0):
  data = PROBLEMS[problem]
  x_T, _ = samplers.initial_noise(jax.random.key(seed), (batch, *data.means.shape[1:]))
  return analytic.ode_solution(data, _schedule(), x_T, num_steps=500)


def _errors(problem, sampler, num_steps, **options):
  """Per-sample RMS errors [BATCH] against the exact ODE solution."""
  x = _run(problem, sampler, num_steps, **options)
  diff = (x - _reference(problem)).reshape(BATCH, -1)
  return np.sqrt(np.mean(diff**2, axis=1))


def _summary(errors, how):
  return float(np.sqrt(np.mean(errors**2))) if how == "rms" else float(np.median(errors))


def test_model_predictions_agree_for_every_parameterisation():
  data, schedule = PROBLEMS["mixture_8x8"], _schedule()
  t = jnp.int32(300)
  alpha, sigma = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  results = {}
  for prediction in ("eps", "x0", "v"):
    fn = analytic.exact_denoise_fn(data, schedule, prediction)
    results[prediction] = solvers.model_predictions(
      fn, x, t, alpha, sigma, prediction=prediction, clip_x0=False
    )
  for prediction in ("x0", "v"):
    for got, want in zip(results[prediction], results["eps"], strict=True):
      np.testing.assert_allclose(got, want, atol=2e-5)
  x0, eps = results["eps"]
  np.testing.assert_allclose(alpha * x0 + sigma * eps, x, atol=1e-5)
  x0, eps = solvers.model_predictions(
    analytic.exact_denoise_fn(data, schedule),
    3.0 * x,
    t,
    alpha,
    sigma,
    prediction="eps",
    clip_x0=True,
  )
  assert np.abs(x0).max() <= 1.0 and np.abs(x0).max() == 1.0
  np.testing.assert_allclose(alpha * x0 + sigma * eps, 3.0 * x, atol=1e-5)


@pytest.mark.parametrize(
  "sampler, num_steps, options",
  [("ddpm", 20, {}), ("ddim", 20, {}), ("dpm_solver++", 10, {}), ("heun", 10, {})],
)
def test_every_sampler_works_with_every_prediction(sampler, num_steps, options):
  # Exact ε, x0 and v models describe the same model: the samples agree up to float rounding.
  runs = {
    p: _run("mixture_2d", sampler, num_steps, prediction=p, **options) for p in ("eps", "x0", "v")
  }
  np.testing.assert_allclose(runs["x0"], runs["eps"], atol=2e-4)
  np.testing.assert_allclose(runs["v"], runs["eps"], atol=2e-4)


# (sampler, num_steps giving about 10, 20, 40 model calls, bound on the median error at the last)
CONVERGENCE = [
  ("ddim", (10, 20, 40), 0.03),
  ("dpm_solver++", (10, 20, 40), 3e-3),
  ("heun", (5, 10, 20), 0.03),
]


@pytest.mark.parametrize("sampler, steps, bound", CONVERGENCE)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(sampler, steps, bound):
  errors = [_summary(_errors("mixture_2d", sampler, n), "median") for n in steps]
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[-1] < bound, errors


# (problem, sampler, num_steps pair, error summary, order range), at step counts where
# discretisation error dominates: DPM-Solver++ is pre-asymptotic below ~20 calls, and beyond ~100
# it meets the error of the integer timesteps near t = 0 (see benchmarks/results/samplers.md).
# Measured: about 1.0 (DDIM), 2.0-2.3 (DPM-Solver++) and 2.1-2.3 (Heun) over several seeds; the
# mixture is pre-asymptotic for longer (Heun from 19 to 39 calls: 2.6).
ORDERS = [
  ("gaussian_2d", "ddim", (20, 40), "rms", (0.7, 1.4)),
  ("mixture_2d", "ddim", (20, 40), "median", (0.7, 1.4)),
  ("gaussian_2d", "dpm_solver++", (20, 40), "rms", (1.6, 2.6)),
  ("mixture_2d", "dpm_solver++", (20, 40), "median", (1.6, 2.6)),
  ("gaussian_2d", "heun", (10, 20), "rms", (1.6, 2.6)),
  ("mixture_2d", "heun", (20, 40), "median", (1.6, 2.6)),
]


@pytest.mark.parametrize("problem, sampler, steps, how, expected", ORDERS)
def test_order_of_convergence(problem, sampler, steps, how, expected):
  nfe = [samplers.num_function_evaluations(sampler, n) for n in steps]
  e1, e2 = (_summary(_errors(problem, sampler, n), how) for n in steps)
  order = -math.log(e2 / e1) / math.log(nfe[1] / nfe[0])
  assert expected[0] < order < expected[1], (e1, e2, order)


@pytest.mark.parametrize("problem, how", [("gaussian_2d", "rms"), ("mixture_2d", "median")])
def test_dpm_solver_pp_at_20_calls_beats_ddim_at_50(problem, how):
  dpm = _summary(_errors(problem, "dpm_solver++", 20), how)
  ddim = _summary(_errors(problem, "ddim", 50), how)
  assert dpm < ddim, (dpm, ddim)


def test_dpm_solver_pp_lower_order_final_changes_only_the_step_into_t_0():
  default = _errors("gaussian_2d", "dpm_solver++", 20)
  lower = _errors("gaussian_2d", "dpm_solver++", 20, lower_order_final=True)
  assert 0 < np.max(np.abs(lower - default)) and np.median(lower) < 2 * np.median(default)
  # With 2 steps there is no second-order step to lower.
  np.testing.assert_array_equal(
    _run("gaussian_2d", "dpm_solver++", 2, lower_order_final=True),
    _run("gaussian_2d", "dpm_solver++", 2),
  )


def _component_stats(x, data):
  """Per component: the fraction of samples it is most responsible for, their mean and var."""
  r = np.asarray(analytic.responsibilities(data, jnp.asarray(x, jnp.float32), jnp.ones(len(x))))
  label = r.argmax(axis=1)
  return [(np.mean(label == k), x[label == k]) for k in range(r.shape[1])]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_all_steps_sample_the_mixture_within_sampling_error(sampler):
  data = PROBLEMS["mixture_2d"]
  n = 4096
  x = _run("mixture_2d", sampler, 1000, batch=n, seed=3)
  weights = np.exp(np.asarray(data.log_weights, np.float64))
  means, stds = np.asarray(data.means, np.float64), np.asarray(data.stds, np.float64)
  # The modes are > 4 standard deviations apart: assigning a sample to its most responsible
  # component mislabels a fraction < 1e-4, far below the binomial standard errors (~0.007).
  for k, (fraction, members) in enumerate(_component_stats(x, data)):
    m = len(members)
    assert abs(fraction - weights[k]) < 5 * np.sqrt(weights[k] * (1 - weights[k]) / n)
    # 5 standard errors: s/√m for the mean, s²√(2/(m-1)) for the variance, per coordinate.
    np.testing.assert_array_less(np.abs(members.mean(0) - means[k]), 5 * stds[k] / np.sqrt(m))
    np.testing.assert_array_less(
      np.abs(members.var(0, ddof=1) - stds[k] ** 2), 5 * stds[k] ** 2 * np.sqrt(2 / (m - 1))
    )


def test_ddim_with_all_steps_samples_the_gaussian_within_sampling_error():
  # (DDPM's moments with all steps are tested in test_samplers.py, against exact recursions.)
  data = PROBLEMS["gaussian_2d"]
  n = 8192
  x = _run("gaussian_2d", "ddim", 1000, batch=n, seed=4)
  mean, std = np.asarray(data.means[0], np.float64), np.asarray(data.stds[0], np.float64)
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * std / np.sqrt(n))
  np.testing.assert_array_less(np.abs(x.var(0, ddof=1) - std**2), 5 * std**2 * np.sqrt(2 / n))
  assert abs(np.corrcoef(x.T)[0, 1]) < 5 / np.sqrt(n)


@pytest.mark.parametrize(
  "sampler, options", [("ddpm", {}), ("ddpm", {"variance": "fixed_small"}), ("ddim", {"eta": 1.0})]
)
def test_stochastic_samplers_converge_in_distribution(sampler, options):
  # KL of the samples' Gaussian fit to the data (sampling floor ~(2 + 3) / (2 n) ≈ 6e-4); the
  # benchmark measures 0.72 / 0.57 at 10 steps and 5e-3 / 2e-2 at 100 (fixed_large / small).
  data = PROBLEMS["gaussian_2d"]
  kl = [
    analytic.gaussian_kl(_run("gaussian_2d", sampler, s, batch=4096, seed=5, **options), data)
    for s in (10, 100)
  ]
  assert kl[0] > 0.2 and kl[1] < 0.05, kl


def test_the_unet_takes_the_float_timesteps_of_heun():
  # The U-Net's sinusoidal embedding takes float t: integer-valued floats give the int output,
  # and between two timesteps the output moves continuously.
  config = dict(
    name="unet",
    channels=8,
    channel_mult=(1,),
    num_res_blocks=0,
    attn_resolutions=(),
    num_heads=1,
    dropout=0.0,
    num_groups=4,
    resamp_with_conv=True,
    out_channels=1,
    dtype="float32",
  )
  model = models.make_model(config)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  params = jax.jit(model.init)(jax.random.key(1), x, jnp.zeros((2,), jnp.float32))["params"]
  # Nonzero last layers (they start at zero), so the output depends on t.
  params = jax.tree.map(lambda p: p + 0.05, params)
  apply = jax.jit(lambda t: model.apply({"params": params}, x, t, train=False))
  at_int = apply(jnp.array([7, 300], jnp.int32))
  at_float = apply(jnp.array([7.0, 300.0]))
  near = apply(jnp.array([7.001, 300.001]))
  np.testing.assert_allclose(at_float, at_int, rtol=1e-6, atol=1e-6)
  assert 0 < np.abs(np.asarray(near - at_int)).max() < 1e-2
