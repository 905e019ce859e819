"""The autoencoder's adversarial and perceptual terms: LDM's PatchGAN discriminator, its hinge
loss and adaptive weight, the LPIPS weighting, and training and resuming with a discriminator."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_files import load_state
from test_autoencoder_run import ae_config

from diffusion_jax.core import rng
from diffusion_jax.experiment import adversarial, autoencoder, train
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment.train_step import compile_train_step
from diffusion_jax.models.discriminator import (
  BatchStatsNorm,
  DiscriminatorConfig,
  PatchDiscriminator,
)
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime.errors import ConfigError
from tests.fixtures.lpips import weights

pytestmark = pytest.mark.usefixtures("fast_compile")

# 16x16 images: two discriminator layers give 2x2 patch logits.
GAN = {
  "autoencoder.disc_weight": 0.5,
  "autoencoder.disc_start": 2,
  "autoencoder.disc_channels": 8,
  "autoencoder.disc_layers": 2,
}


def test_the_discriminator_is_ldms_patchgan():
  model = PatchDiscriminator(DiscriminatorConfig())  # LDM's: 64 channels, 3 layers
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 64, 64, 3)))["params"]
  assert set(shapes) == {f"main_{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11)}
  # taming-transformers' NLayerDiscriminator(3, 64, 3): 2,765,633 parameters.
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == 2_765_633
  out = jax.eval_shape(model.apply, {"params": shapes}, jnp.zeros((2, 64, 64, 3)))
  assert out.shape == (2, 6, 6, 1)  # one logit per overlapping 70x70 patch


def test_batch_norm_uses_the_batch_statistics():
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)) * 3 + 1
  norm = BatchStatsNorm()
  variables = norm.init(jax.random.key(1), x)
  scale, bias = np.asarray(variables["params"]["scale"]), np.asarray(variables["params"]["bias"])
  xs = np.asarray(x, np.float64)
  expected = (xs - xs.mean((0, 1, 2))) / np.sqrt(xs.var((0, 1, 2)) + 1e-5) * scale + bias
  np.testing.assert_allclose(norm.apply(variables, x), expected, atol=1e-5)


@pytest.fixture(scope="module")
def gan_step():
  """A tiny autoencoder with a discriminator (no warm-up: both learn at full rate at once), its
  run, its jitted step, and the reconstruction loss and g_loss of a batch with their gradients,
  computed without the step's code."""
  config = ae_config(**{**GAN, "train.warmup_steps": 0})
  run = run_lib.make_run(config)
  state = _init(run)
  adversary = adversarial.Adversary(config.autoencoder, run.train)

  def direct(params, disc_params, x, keys):
    def losses(params):
      loss, _, out = autoencoder.loss_per_example(run.model, params, x, keys, config.autoencoder)
      return jnp.mean(loss), adversary.generator_loss(disc_params, out)

    last = lambda g: g["decoder"]["conv_out"]["kernel"]
    grad_rec = last(jax.grad(lambda p: losses(p)[0])(params))
    grad_g = last(jax.grad(lambda p: losses(p)[1])(params))
    return losses(params), grad_rec, grad_g

  # The train loop's own compiled step (which the training tests below load from the cache).
  return run, state, compile_train_step(run), jax.jit(direct)


def _init(run):
  """The run's fresh state as the train loop makes it (the same program: read from the cache)."""
  init = jax.jit(run.init_state, out_shardings=parallel.replicated(run.mesh))
  return init(rng.stream_key(run.config.seed, rng.INIT))


@pytest.mark.parametrize("step_index", [1, 2])
def test_the_adaptive_weight_and_losses_are_ldms(gan_step, step_index):
  run, state, step, direct = gan_step
  state = state.replace(step=jax.device_put(jnp.int32(step_index), state.step.sharding))
  images = jax.random.randint(jax.random.key(1), (4, 16, 16, 3), 0, 256).astype(jnp.uint8)
  key = jax.random.key(3)
  # Directly: the two losses of the same draws, each differentiated alone.
  x = images.astype(jnp.float32) / 127.5 - 1
  keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(key, step_index), j))(
    jnp.arange(4, dtype=jnp.uint32)
  )
  (rec, g), grad_rec, grad_g = direct(state.params, state.discriminator["params"], x, keys)
  ratio = np.linalg.norm(np.float64(grad_rec)) / (np.linalg.norm(np.float64(grad_g)) + 1e-4)
  weight = 0.5 * min(ratio, 1e4) if step_index >= 2 else 0.0

  # The batch placed on the mesh as the train loop places it.
  batch = parallel.put_batch({"image": np.asarray(images)}, run.mesh, axis=0)
  new_state, metrics = step(jax.tree.map(jnp.copy, state), batch, key)  # donated
  assert float(metrics["d_weight"]) == pytest.approx(weight, rel=1e-4, abs=1e-12)
  assert float(metrics["g_loss"]) == pytest.approx(float(g), rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(float(rec) + weight * float(g), rel=1e-4)
  # The discriminator trains (hinge loss) from disc_start on, and is left alone before.
  moved = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), new_state.discriminator, state.discriminator
  )
  assert any(jax.tree.leaves(moved["params"])) == (step_index >= 2)
  if step_index >= 2:
    real, fake = float(metrics["logits_real"]), float(metrics["logits_fake"])
    assert float(metrics["d_loss"]) > 0 and np.isfinite([real, fake]).all()
  else:
    assert float(metrics["d_loss"]) == 0.0


def test_the_perceptual_term_weighs_every_pixel_as_ldm():
  config = ae_config(**{"autoencoder.perceptual_weight": 0.25})
  run = run_lib.make_run(config)
  params = _init(run).params  # the program of the LPIPS run's initialisation below
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  keys = jax.random.split(jax.random.key(2), 2)
  distance = lambda a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3)) * 7.0  # any [B] function

  @jax.jit
  def both(params, x, keys):
    plain = autoencoder.loss_per_example(run.model, params, x, keys, config.autoencoder)
    perceptual = autoencoder.loss_per_example(
      run.model, params, x, keys, config.autoencoder, distance
    )
    return plain, perceptual

  (plain, terms, out), (with_p, p_terms, _) = both(params, x, keys)
  np.testing.assert_allclose(p_terms["lpips"], distance(x, out), rtol=1e-6)
  np.testing.assert_allclose(with_p, plain + 0.25 * p_terms["lpips"] * 16 * 16 * 3, rtol=1e-5)


def test_training_with_a_discriminator_resumes_exactly(tmp_path):
  overrides = {
    **GAN,
    "train.warmup_steps": 0,  # as `gan_step`, whose compiled step this loads from the cache
    "train.num_steps": 4,
    "train.sample_every": 0,
    "train.num_grid_samples": 0,
  }
  straight = ae_config(**{**overrides, "train.checkpoint_every": 2})
  train.train_and_evaluate(straight, str(tmp_path / "straight"))
  # A run stopped after 2 steps is its step-2 checkpoint; resumed, it trains on to 4.
  shutil.copytree(
    tmp_path / "straight" / "checkpoints" / "2", tmp_path / "parts" / "checkpoints" / "2"
  )
  metrics = train.train_and_evaluate(straight, str(tmp_path / "parts"))
  assert {"g_loss", "d_loss", "d_weight", "logits_real", "logits_fake"} <= set(metrics)
  a = load_state(straight, str(tmp_path / "straight"))
  b = load_state(straight, str(tmp_path / "parts"))
  assert a.discriminator is not None
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("autoencoder.disc_weight", -1.0, "disc_weight=-1.0 must be >= 0"),
    ("autoencoder.disc_layers", 0, "must be positive"),
    ("autoencoder.disc_layers", 3, "image_size=16 is too small for autoencoder.disc_layers=3"),
    ("autoencoder.lpips_weights", "/nonexistent/lpips.safetensors", "no such file"),
  ],
)
def test_bad_adversarial_fields_are_one_line_errors(field, value, message):
  with pytest.raises(ConfigError, match=message) as error:
    run_lib.make_run(ae_config(**{**GAN, field: value}))
  assert "\n" not in str(error.value)


def test_training_with_lpips_from_a_local_file(tmp_path):
  path = tmp_path / "lpips_vgg.npz"
  np.savez(path, **weights.random_state_dict(0))
  overrides = {
    "autoencoder.lpips_weights": str(path),
    "train.num_steps": 2,
    "train.sample_every": 0,
    "train.num_grid_samples": 0,
  }
  metrics = train.train_and_evaluate(ae_config(**overrides), str(tmp_path / "run"))
  assert metrics["lpips"] > 0 and np.isfinite(metrics["loss"])
  # LDM's weighting: each of the 16 * 16 * 3 values of an image carries its LPIPS.
  assert metrics["loss"] > metrics["lpips"] * 16 * 16 * 3
