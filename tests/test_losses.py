"""Tests for diffusion_jax.losses: per-example keys, the hybrid's stop-gradient, the loss scales."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import diffusion, likelihood, losses, schedules

T = 50
SHAPE = (6, 4, 4, 2)


@functools.cache
def _schedule() -> schedules.Schedule:
  return schedules.make_schedule("cosine", T)


def _x0(seed: int = 0) -> jax.Array:
  """Data on the 8-bit grid (the discretized decoder's domain)."""
  levels = np.random.default_rng(seed).integers(0, 256, SHAPE)
  return jnp.asarray(2.0 * levels / 255.0 - 1.0, jnp.float32)


def _denoiser(params, variance: str, calls=None):
  """A made-up network, nonlinear in x_t and t, with 2C outputs for learned_range."""

  def denoise_fn(x_t, t):
    if calls is not None:
      calls.append(x_t.shape[0])
    scale = 1.0 + t.astype(jnp.float32).reshape(-1, 1, 1, 1) / T
    prediction = params["mean"] * jnp.tanh(x_t) * scale
    if variance != "learned_range":
      return prediction
    return jnp.concatenate([prediction, params["var"] * jnp.sin(2.0 * x_t)], axis=-1)

  return denoise_fn


PARAMS = {"mean": jnp.float32(0.7), "var": jnp.float32(0.5)}
CASES = [("simple", "fixed_large"), ("hybrid", "learned_range"), ("vlb", "learned_range")]
CASES += [("vlb", "fixed_small"), ("simple", "learned_range")]


@pytest.mark.parametrize("loss_type,variance", CASES)
def test_loss_per_example_keys_matches_one_example_at_a_time(loss_type, variance):
  x0 = _x0(1)
  keys = jax.random.split(jax.random.key(2), SHAPE[0])
  calls = []
  run = functools.partial(
    losses.loss_per_example_keys,
    _schedule(),
    _denoiser(PARAMS, variance, calls),
    loss_type=loss_type,
    variance=variance,
  )
  batched, terms = run(x0, keys)
  assert calls == [SHAPE[0]]  # one call on the whole batch
  assert batched.shape == (SHAPE[0],) and batched.dtype == jnp.float32
  expected_terms = {"t", "loss", "weight"} | {
    "simple": {"mse"},
    "hybrid": {"mse", "vlb"},
    "vlb": {"vlb"},
  }[loss_type]
  assert set(terms) == expected_terms
  np.testing.assert_array_equal(np.asarray(terms["weight"]), 1.0)
  np.testing.assert_array_equal(np.asarray(terms["loss"]), np.asarray(batched))
  single = [run(x0[j : j + 1], keys[j : j + 1]) for j in range(SHAPE[0])]
  np.testing.assert_allclose(
    np.asarray(batched), [float(s[0][0]) for s in single], rtol=1e-5, atol=1e-7
  )
  np.testing.assert_array_equal(np.asarray(terms["t"]), [int(s[1]["t"][0]) for s in single])
  assert len(set(np.asarray(batched).tolist())) == SHAPE[0]
  # Rows follow their keys: permuting the keys permutes the losses of identical examples.
  same = jnp.broadcast_to(x0[:1], x0.shape)
  a, _ = run(same, keys)
  b, _ = run(same, keys[::-1])
  np.testing.assert_allclose(np.asarray(a), np.asarray(b)[::-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_simple_loss_type_is_simple_loss_per_example_keys(prediction):
  x0 = _x0(3)
  keys = jax.random.split(jax.random.key(4), SHAPE[0])
  fn = _denoiser(PARAMS, "fixed_large")
  got, terms = losses.loss_per_example_keys(_schedule(), fn, x0, keys, prediction=prediction)
  expected = diffusion.simple_loss_per_example_keys(
    _schedule(), fn, x0, keys, prediction=prediction
  )
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  np.testing.assert_array_equal(np.asarray(terms["mse"]), np.asarray(expected))


def _fixed_draws(seed: int):
  rng = np.random.default_rng(seed)
  t = jnp.asarray(np.array([0, 1, 2, 17, 30, T - 1]), jnp.int32)
  return t, jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)


def test_loss_scales():
  """simple = mse; vlb = T * L_t; hybrid = mse + λ T L_t, with L_t = likelihood.vlb_terms."""
  x0 = _x0(5)
  t, noise = _fixed_draws(6)
  fn = _denoiser(PARAMS, "learned_range")
  run = functools.partial(losses.training_loss, _schedule(), fn, x0, t, noise)
  x_t = diffusion.q_sample(_schedule(), x0, t, noise)
  vlb = likelihood.vlb_terms(_schedule(), fn(x_t, t), x0, x_t, t, variance="learned_range")
  mse = jnp.mean(jnp.square(fn(x_t, t)[..., :2] - noise), axis=(1, 2, 3))
  simple, _ = run(loss_type="simple", variance="learned_range")
  vlb_loss, terms = run(loss_type="vlb", variance="learned_range")
  hybrid, hybrid_terms = run(loss_type="hybrid", variance="learned_range", vlb_weight=0.01)
  np.testing.assert_allclose(np.asarray(simple), np.asarray(mse), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(terms["vlb"]), np.asarray(vlb), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(vlb_loss), T * np.asarray(vlb), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(hybrid), np.asarray(mse + 0.01 * T * vlb), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(hybrid_terms["mse"]), np.asarray(mse), rtol=1e-6)


def test_hybrid_trains_the_variance_only_through_the_vlb():
  x0 = _x0(7)
  t, noise = _fixed_draws(8)

  def loss(params, loss_type, part=None):
    fn = _denoiser(params, "learned_range")
    value, terms = losses.training_loss(
      _schedule(), fn, x0, t, noise, loss_type=loss_type, variance="learned_range"
    )
    return jnp.sum(value if part is None else terms[part])

  grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
  hybrid = grad(PARAMS, "hybrid")
  mse = grad(PARAMS, "simple")
  vlb_part = grad(PARAMS, "hybrid", "vlb")
  # The vlb part has no gradient w.r.t. the mean channels (stop-gradient) and some w.r.t. the
  # variance channels; the squared error none w.r.t. the variance channels.
  assert float(vlb_part["mean"]) == 0.0
  assert abs(float(vlb_part["var"])) > 1e-3
  assert float(mse["var"]) == 0.0
  np.testing.assert_allclose(float(hybrid["mean"]), float(mse["mean"]), rtol=1e-6)
  np.testing.assert_allclose(float(hybrid["var"]), 0.001 * T * float(vlb_part["var"]), rtol=1e-5)
  # The plain vlb loss, without the stop-gradient, trains the mean as well.
  assert abs(float(grad(PARAMS, "vlb")["mean"])) > 1e-3


def test_importance_sampled_loss_is_weighted():
  x0 = _x0(9)
  keys = jax.random.split(jax.random.key(10), SHAPE[0])
  probs = jnp.asarray(np.random.default_rng(11).dirichlet(np.ones(T)), jnp.float32)
  fn = _denoiser(PARAMS, "learned_range")
  run = functools.partial(losses.loss_per_example_keys, _schedule(), fn, x0, keys, loss_type="vlb")
  weighted, terms = run(variance="learned_range", t_probs=probs)
  weight = 1.0 / (T * np.asarray(probs)[np.asarray(terms["t"])])
  np.testing.assert_allclose(np.asarray(terms["weight"]), weight, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(weighted), weight * np.asarray(terms["loss"]), rtol=1e-6)
  # The unweighted loss at the drawn t is the uniform-sampling loss at that t with the same noise.
  t = terms["t"]
  _, noise = jax.vmap(lambda k: diffusion.draw_t_and_noise(_schedule(), k, (1, *SHAPE[1:])))(keys)
  direct, _ = losses.training_loss(
    _schedule(), fn, x0, t, noise[:, 0], loss_type="vlb", variance="learned_range"
  )
  np.testing.assert_allclose(np.asarray(terms["loss"]), np.asarray(direct), rtol=1e-6)


def test_loss_errors():
  x0 = _x0(12)
  t, noise = _fixed_draws(13)
  run = functools.partial(losses.training_loss, _schedule())
  with pytest.raises(ValueError, match="loss 'hybrid' trains only a learned variance"):
    run(_denoiser(PARAMS, "fixed_large"), x0, t, noise, loss_type="hybrid")
  with pytest.raises(ValueError, match="unknown loss 'l1'; valid: simple, hybrid, vlb"):
    run(_denoiser(PARAMS, "fixed_large"), x0, t, noise, loss_type="l1")
  with pytest.raises(ValueError, match="unknown variance"):
    run(_denoiser(PARAMS, "fixed_large"), x0, t, noise, variance="learned")
  # A network with C outputs under learned_range (or 2C under a fixed variance) is caught.
  with pytest.raises(AssertionError):
    run(_denoiser(PARAMS, "fixed_large"), x0, t, noise, variance="learned_range")
  with pytest.raises(AssertionError):
    run(_denoiser(PARAMS, "learned_range"), x0, t, noise, variance="fixed_large")
