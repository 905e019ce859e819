"""Tests for diffusion_jax.core.sds: the exact SDS gradient, its draws, convergence to the mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.core import rendering, scene, schedules, sds
from diffusion_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from diffusion_jax.testing import analytic

T = 1000
SHAPE = (3, 4, 4, 2)


@functools.cache
def _schedule() -> schedules.Schedule:
  return schedules.make_schedule("linear", T)


def _network(x_t, t):
  """A made-up frozen network, nonlinear in x_t and t, so that its Jacobian would show."""
  scale = 1.0 + t.astype(jnp.float32).reshape(-1, 1, 1, 1) / T
  return 0.8 * jnp.tanh(2.0 * x_t) * scale + 0.3 * jnp.sin(x_t**2)


def _independent_draws(key, batch, event, t_range=(0.02, 0.98)):
  """t and ε of example j from fold_in(key, j), written without sds.py."""
  t_min, t_max = round(t_range[0] * T), min(round(t_range[1] * T), T - 1)
  ts, noises = [], []
  for j in range(batch):
    t_key, noise_key = jax.random.split(jax.random.fold_in(key, j))
    ts.append(int(jax.random.randint(t_key, (), t_min, t_max + 1, dtype=jnp.int32)))
    noises.append(np.asarray(jax.random.normal(noise_key, event, dtype=jnp.float32)))
  return np.array(ts, np.int32), np.stack(noises)


def test_sds_weight_is_sigma_squared_or_one():
  t = jnp.array([0, 20, 500, 999], jnp.int32)
  abar = np.asarray(_schedule().alphas_cumprod)[np.asarray(t)]
  np.testing.assert_allclose(sds.sds_weight(_schedule(), t), 1.0 - abar, rtol=1e-6)
  np.testing.assert_array_equal(sds.sds_weight(_schedule(), t, "uniform"), np.ones(4))
  with pytest.raises(ValueError, match="unknown SDS weighting"):
    sds.sds_weight(_schedule(), t, "snr")


def test_timestep_bounds_follow_dreamfusion_and_reject_bad_ranges():
  assert sds.timestep_bounds(1000, (0.02, 0.98)) == (20, 980)
  assert sds.timestep_bounds(1000, (0.0, 1.0)) == (0, 999)
  assert sds.timestep_bounds(50, (0.5, 0.5)) == (25, 25)
  with pytest.raises(ValueError, match="t_range"):
    sds.timestep_bounds(1000, (0.9, 0.1))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradient_is_the_sds_formula(prediction, reduction):
  schedule = _schedule()
  images = jax.random.uniform(jax.random.key(0), SHAPE, minval=-1.0, maxval=1.0)
  key = jax.random.key(7)
  loss_fn = lambda x: sds.sds_loss(
    schedule, _network, x, key, prediction=prediction, reduction=reduction
  )
  grad, aux = jax.grad(loss_fn, has_aux=True)(images)

  t, eps = _independent_draws(key, SHAPE[0], SHAPE[1:])
  abar = np.asarray(schedule.alphas_cumprod, np.float64)[t].reshape(-1, 1, 1, 1)
  x = np.asarray(images, np.float64)
  x_t = np.sqrt(abar) * x + np.sqrt(1 - abar) * eps
  out = np.asarray(_network(jnp.asarray(x_t, jnp.float32), jnp.asarray(t)), np.float64)
  eps_hat = {
    "eps": out,
    "x0": (x_t - np.sqrt(abar) * out) / np.sqrt(1 - abar),
    "v": np.sqrt(abar) * out + np.sqrt(1 - abar) * x_t,
  }[prediction]
  expected = (1 - abar) * (eps_hat - eps)
  scale = 1.0 if reduction == "sum" else 1.0 / SHAPE[0]
  np.testing.assert_allclose(grad, scale * expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(aux["t"], t)
  np.testing.assert_allclose(aux["grad_norm"], np.sqrt(np.sum(expected**2, axis=(1, 2, 3))), 1e-4)
  np.testing.assert_allclose(loss_fn(images)[0], scale * 0.5 * np.sum(expected**2), rtol=1e-4)

  # With the network's Jacobian (the gradient of the diffusion loss itself) the result differs
  # by far more than the tolerance: the test above would notice it.
  def full_loss(x):
    x_t = jnp.sqrt(abar) * x + jnp.sqrt(1 - abar) * eps
    return 0.5 * jnp.sum((1 - abar) * (_network(x_t, jnp.asarray(t)) - eps) ** 2)

  if prediction == "eps":
    full = jax.grad(full_loss)(images)
    assert np.max(np.abs(full - scale * expected)) > 0.05


def test_the_surrogate_gradient_is_bitwise_sds_grad():
  schedule, keys = _schedule(), jax.random.split(jax.random.key(3), SHAPE[0])
  images = jax.random.normal(jax.random.key(4), SHAPE)
  grad, aux = jax.grad(lambda x: sds.sds_loss(schedule, _network, x, keys), has_aux=True)(images)
  t, noise = sds.draw_sds_t_and_noise(schedule, keys, SHAPE)
  np.testing.assert_array_equal(grad, sds.sds_grad(schedule, _network, images, t, noise))
  np.testing.assert_array_equal(aux["t"], t)


def test_draws_of_an_example_do_not_depend_on_its_batch():
  schedule, keys = _schedule(), jax.random.split(jax.random.key(5), SHAPE[0])
  images = jax.random.normal(jax.random.key(6), SHAPE)
  grad_fn = jax.grad(lambda x, k: sds.sds_loss(schedule, _network, x, k)[0])
  whole = grad_fn(images, keys)
  alone = jnp.concatenate([grad_fn(images[j : j + 1], keys[j : j + 1]) for j in range(SHAPE[0])])
  np.testing.assert_allclose(whole, alone, rtol=1e-6, atol=1e-7)


def test_learned_range_output_uses_only_the_prediction_channels():
  schedule, key = _schedule(), jax.random.key(8)
  images = jax.random.normal(jax.random.key(9), SHAPE)
  with_variance = lambda x_t, t: jnp.concatenate([_network(x_t, t), jnp.cos(x_t)], axis=-1)
  grad_fn = lambda fn, variance: jax.grad(
    lambda x: sds.sds_loss(schedule, fn, x, key, variance=variance)[0]
  )(images)
  np.testing.assert_array_equal(
    grad_fn(with_variance, "learned_range"), grad_fn(_network, "fixed_large")
  )


def test_the_same_key_gives_bitwise_the_same_loss():
  schedule, images = _schedule(), jax.random.normal(jax.random.key(10), SHAPE)
  loss = jax.jit(lambda x, k: sds.sds_loss(schedule, _network, x, k, weighting="uniform")[0])
  a, b = loss(images, jax.random.key(11)), loss(images, jax.random.key(11))
  assert a.tobytes() == b.tobytes()
  assert loss(images, jax.random.key(12)) != a


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sds_on_an_image_converges_to_the_mode_of_gaussian_data(prediction):
  """x0 ~ N(μ, s² I); the renderer is the identity; SGD on the SDS gradient reaches μ."""
  schedule = _schedule()
  mu, s = jnp.array([0.6, -0.3, 0.1, -0.8]), 0.3
  if prediction == "eps":  # the exact ε̂ of the brief, written out
    abar_of = lambda t: schedule.alphas_cumprod[t][:, None]
    denoise_fn = lambda x_t, t: (
      jnp.sqrt(1 - abar_of(t))
      * (x_t - jnp.sqrt(abar_of(t)) * mu)
      / (abar_of(t) * s**2 + 1 - abar_of(t))
    )
  else:
    denoise_fn = analytic.exact_denoise_fn(analytic.gaussian(mu, s), schedule, prediction)
  views = 16

  def step(x, i):
    images = jnp.broadcast_to(x, (views, 4))
    grad = jax.grad(
      lambda im: sds.sds_loss(
        schedule,
        denoise_fn,
        im,
        jax.random.fold_in(jax.random.key(13), i),
        prediction=prediction,
        reduction="mean",
      )[0]
    )(images)
    return x - 0.5 * jnp.sum(grad, axis=0), None

  x, _ = jax.lax.scan(step, jnp.full((4,), 2.0), jnp.arange(400))
  np.testing.assert_allclose(x, mu, atol=0.05)


def test_through_a_renderer_only_the_renderer_is_differentiated():
  """∂L/∂θ = (∂x/∂θ)ᵀ g: the chain rule through the renderer, no network Jacobian."""
  schedule, key = _schedule(), jax.random.key(14)
  grid = scene.init_voxel_grid(jax.random.key(15), 6, density=0.5)
  render = lambda g: (
    2.0
    * rendering.render_view(
      scene.voxel_field(g, blob_density=3.0),
      30.0,
      15.0,
      2.5,
      height=5,
      width=5,
      fov_deg=40.0,
      near=1.0,
      far=4.0,
      num_samples=12,
    )["rgb"][None]
    - 1.0
  )
  grad = jax.jit(jax.grad(lambda g: sds.sds_loss(schedule, _network, render(g), key)[0]))(grid)

  @jax.jit
  def chain_rule(grid):
    images, vjp = jax.vjp(render, grid)
    keys = jax.random.fold_in(key, 0)[None]
    t, noise = sds.draw_sds_t_and_noise(schedule, keys, images.shape)
    return vjp(sds.sds_grad(schedule, _network, images, t, noise))[0]

  expected = chain_rule(grid)
  for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(grad.density))) > 0


def test_through_an_encoder_the_latent_gradient_flows_back_to_the_pixels():
  """Latent SDS: ∂L/∂x = (∂z/∂x)ᵀ g(z) for z = s · E(x).mean, with g the SDS gradient in
  latent space; the encoder is differentiated, the network in latent space is not."""
  model = Autoencoder(
    AutoencoderConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4, z_channels=2)
  )
  images = jax.random.uniform(jax.random.key(16), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
  params = model.init(jax.random.key(17), images)["params"]
  encode = lambda x: 0.7 * model.apply({"params": params}, x, method=Autoencoder.encode).mean
  schedule, key = _schedule(), jax.random.key(18)
  grad = jax.jit(jax.grad(lambda x: sds.sds_loss(schedule, _network, encode(x), key)[0]))(images)

  @jax.jit
  def chain_rule(x):
    latents, vjp = jax.vjp(encode, x)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(2))
    t, noise = sds.draw_sds_t_and_noise(schedule, keys, latents.shape)
    return vjp(sds.sds_grad(schedule, _network, latents, t, noise))[0]

  np.testing.assert_allclose(grad, chain_rule(images), rtol=1e-5, atol=1e-7)
  assert grad.shape == images.shape and float(jnp.max(jnp.abs(grad))) > 0
