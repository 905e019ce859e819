"""Tests of the super-resolution stage: the block-average downsampling, noise-conditioning
augmentation, the U-Net's low-resolution input, its train step and its sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import shapes_sr
from diffusion_jax import data, text
from diffusion_jax.core import super_resolution as sr
from diffusion_jax.experiment import generate, low_res_inputs
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.models import UNetConfig, make_model
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import guidance

pytestmark = pytest.mark.usefixtures("fast_compile")

# The tiny setup at 8x8 enlarging 4x4 images, text-conditional (`tiny_config(..., text=True)`).
SR_OVERRIDES = {"model.low_res_size": 4}


# Jitted: op by op, the per-example draws of 512 examples took seconds.
augment = jax.jit(sr.augment, static_argnames="max_level")


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _random_params(model, *args, **kwargs):
  # The output layer starts at zero; random parameters everywhere make outputs depend on inputs.
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)["params"]
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), p.dtype), shapes)


# ---------------------------------------------------------------- downsampling and augmentation


@pytest.mark.parametrize("factor", [2, 3, 4, 6])
def test_downsample_is_the_block_average_and_exact_on_block_images(factor):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 4 * factor, 2 * factor, 3)).astype(np.float32)
  expected = x.reshape(2, 4, factor, 2, factor, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(sr.downsample(x, factor), expected, atol=1e-6)
  constant = np.full((1, 2 * factor, 2 * factor, 3), -0.37, np.float32)
  np.testing.assert_array_equal(sr.downsample(constant, factor), constant[:, :2, :2])
  if factor in (2, 4):  # block-constant images (a nearest upsampling) come back bit for bit
    low = data.normalize_images(rng.integers(0, 256, (2, 4, 2, 3), dtype=np.uint8))
    blocks = np.repeat(np.repeat(low, factor, axis=1), factor, axis=2)
    np.testing.assert_array_equal(sr.downsample(blocks, factor), low)
  with pytest.raises(ValueError, match="divisible"):
    sr.downsample(x[:, :-1], factor)


def test_augmentation_at_level_zero_leaves_the_input_unchanged():
  low = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3)), jnp.float32)
  out = augment(low, _keys(3), level=0.0)
  np.testing.assert_array_equal(out["low_res"], low)
  np.testing.assert_array_equal(out["aug_level"], np.zeros(3))
  np.testing.assert_array_equal(sr.alpha_sigma(jnp.zeros(1)), [[1.0], [0.0]])


def test_augmentation_is_the_forward_process_at_its_level():
  rng = np.random.default_rng(0)
  low = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(low.shape), jnp.float32)
  level = jnp.asarray([0.0, 0.25, 0.5, 1.0])
  alpha, sigma = np.cos(np.pi / 2 * level), np.sin(np.pi / 2 * level)
  expected = alpha[:, None, None, None] * low + sigma[:, None, None, None] * noise
  np.testing.assert_allclose(sr.noise_augment(low, level, noise), expected, atol=1e-6)
  # A fixed level s: (z_s - α z) / σ is the draw's noise, standard normal.
  out = augment(low, _keys(4), level=0.3)
  # Levels per example: each as if the whole batch had its level.
  mixed = augment(low, _keys(4), level=jnp.asarray([0.0, 0.3, 0.0, 0.3]))
  np.testing.assert_array_equal(mixed["low_res"][::2], low[::2])
  np.testing.assert_allclose(mixed["low_res"][1::2], out["low_res"][1::2], atol=1e-6)
  a, s = math.cos(0.15 * math.pi), math.sin(0.15 * math.pi)
  eps = np.asarray((out["low_res"] - a * low) / s)
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
  # Training levels: uniform in [0, max_level), per example from its own key only.
  keys = _keys(512)
  drawn = augment(jnp.zeros((512, 2, 2, 3)), keys, max_level=0.5)["aug_level"]
  assert 0 <= drawn.min() and drawn.max() < 0.5 and abs(float(drawn.mean()) - 0.25) < 0.03
  first = augment(jnp.zeros((2, 2, 2, 3)), keys[:2], max_level=0.5)
  np.testing.assert_array_equal(first["aug_level"], drawn[:2])


# ---------------------------------------------------------------- the model


def test_sr_unet_adds_the_low_res_input_and_the_level_embedding():
  base = dict(channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
  x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,), jnp.int32)
  low = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  plain = jax.eval_shape(make_model(UNetConfig(**base)).init, jax.random.key(0), x, t)["params"]
  off = make_model({**base, "low_res_size": 0})
  assert jax.eval_shape(off.init, jax.random.key(0), x, t)["params"] == plain
  model = make_model({**base, "low_res_size": 4})
  params = _random_params(model, x, t, low_res=low, aug_level=jnp.zeros(2))
  # Today's tree, plus the level's MLP and three more input channels of the first convolution.
  assert set(params) == set(plain) | {"aug_dense0", "aug_dense1"}
  assert params["conv_in"]["kernel"].shape == (3, 3, 6, 8)
  assert plain["conv_in"]["kernel"].shape == (3, 3, 3, 8)
  apply = jax.jit(lambda lr, s: model.apply({"params": params}, x, t, low_res=lr, aug_level=s))
  out = apply(low, jnp.zeros(2))
  assert out.shape == (2, 8, 8, 3)
  # Each example's output depends on its own low-res image and level.
  changed = apply(low.at[1].add(0.5), jnp.asarray([0.0, 0.0]))
  np.testing.assert_allclose(changed[0], out[0], atol=1e-5)
  assert np.abs(changed[1] - out[1]).max() > 1e-3
  assert np.abs(apply(low, jnp.asarray([0.0, 0.5]))[1] - out[1]).max() > 1e-3
  with pytest.raises(ValueError, match="pass low_res"):
    model.apply({"params": params}, x, t)
  with pytest.raises(ValueError, match="low_res_size"):
    model.apply({"params": params}, x, t, low_res=jnp.zeros((2, 2, 2, 3)))
  with pytest.raises(ValueError, match="no low-resolution input"):
    off.apply({"params": plain}, x, t, low_res=low)


def test_config_errors(tiny_config):
  with pytest.raises(ConfigError, match="model.low_res_size=3 must be a proper divisor"):
    run_lib.make_run(tiny_config({"model.low_res_size": 3}))
  with pytest.raises(ConfigError, match="sr.aug_level"):
    run_lib.make_run(tiny_config({"model.low_res_size": 4, "sr.aug_level": 1.5}))


def test_shapes_sr_config_builds_a_16_to_64_text_model():
  run = run_lib.make_run(shapes_sr.get_config())
  assert run.image_shape == (64, 64, 3) and run.low_res_size == 16 and run.cond_kind == "text"


# ---------------------------------------------------------------- training and sampling


def test_two_train_steps_of_a_tiny_sr_model(tiny_config):
  # Unconditional (the text path is the sampling test's): a train step compiles in seconds.
  run = run_lib.make_run(tiny_config({"model.low_res_size": 4}))
  low = {"low_res": jnp.zeros((1, 4, 4, 3)), "aug_level": jnp.zeros(1)}
  params = _random_params(run.model, jnp.zeros((1, 8, 8, 3)), jnp.zeros(1, jnp.int32), **low)
  ema = jax.tree.map(jnp.copy, params)  # a buffer of its own: the step donates the state
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, ema, run.tx.init(params))
  step = step_lib.compile_train_step(run)
  batch = {"image": np.stack([data.make_source(run.data)[i]["image"] for i in range(4)])}
  for _ in range(2):
    state, metrics = step(state, batch, jax.random.key(1))
  assert int(state.step) == 2 and all(np.isfinite(float(v)) for v in metrics.values())


def test_sampling_enlarges_low_res_images_independently_of_the_batch(tiny_config):
  run = run_lib.make_run(tiny_config(SR_OVERRIDES, text=True))
  x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
  example = {**run.prompt_condition([""]), "low_res": jnp.zeros((1, 4, 4, 3))}
  params = _random_params(run.model, x, t, **example)
  prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
  condition = run.with_low_res(run.prompt_condition(prompts), prompts)
  assert condition["low_res"].shape == (4, 4, 4, 3)
  options = dict(to_uint8=False, guidance_scale=3.0, aug_level=0.2, sampler="ddim", num_steps=3)

  def draw(batch_size, cond):
    fn = generate.make_sample_fn(
      run.model, run.schedule, run.image_shape, batch_size, run.mesh, **options
    )
    return generate.generate(fn, params, jax.random.key(2), 4, batch_size, cond)

  in_fours = draw(4, condition)
  assert in_fours.shape == (4, 8, 8, 3) and np.isfinite(in_fours).all()
  np.testing.assert_allclose(draw(2, condition), in_fours, atol=1e-3)
  other = {**condition, "low_res": condition["low_res"].copy()}
  other["low_res"][3] = -1.0
  changed = draw(4, other)
  np.testing.assert_allclose(changed[:3], in_fours[:3], atol=1e-3)
  assert np.abs(changed[3] - in_fours[3]).max() > 1e-3


def test_guidance_keeps_the_low_res_image_in_both_halves():
  seen = {}

  def apply_fn(x_t, t, tokens, low_res, aug_level):
    seen.update(tokens=tokens, low_res=low_res, aug_level=aug_level)
    # A "network" whose output is the sum of its condition: token ids and the low-res mean.
    value = tokens.sum(axis=1) + low_res.mean(axis=(1, 2, 3)) + aug_level
    return x_t + value[:, None, None, None]

  low = jnp.asarray([[[[0.5]]], [[[-0.25]]]]).repeat(2, axis=1).repeat(2, axis=2)
  image = {"low_res": low, "aug_level": jnp.asarray([0.1, 0.2])}
  cond = {"tokens": jnp.asarray([[1, 5, 0], [1, 7, 3]], jnp.int32)}
  denoise = guidance.guided(apply_fn, {**cond, **image}, 2.0)
  x = jnp.zeros((2, 2, 2, 1))
  out = denoise(x, jnp.zeros((2,), jnp.int32))
  np.testing.assert_array_equal(seen["low_res"], jnp.concatenate([low, low]))
  np.testing.assert_array_equal(seen["aug_level"], np.float32([0.1, 0.2, 0.1, 0.2]))
  # out_u + 2 (out_c - out_u), where only the tokens differ (the null prompt: [START, PAD, PAD]).
  null = text.START_ID
  expected = np.asarray([null + 2 * (6 - null) + 0.5 + 0.1, null + 2 * (11 - null) - 0.25 + 0.2])
  np.testing.assert_allclose(out[:, 0, 0, 0], expected, rtol=1e-6)


def test_low_res_inputs_are_training_images_of_the_prompted_class(tiny_config):
  source = data.make_source(tiny_config().data)
  labels = [int(source[i]["label"]) for i in range(len(source))]
  wanted = [labels[5], None, labels[5], None]
  low = low_res_inputs.from_data(source, wanted, 2)
  same = [i for i, label in enumerate(labels) if label == labels[5]][:2]
  rest = [i for i in range(len(source)) if i not in same]
  picks = [same[0], rest[0], same[1], rest[1]]
  images = data.normalize_images(np.stack([source[i]["image"] for i in picks]))
  np.testing.assert_array_equal(low, sr.downsample(images, 2))


def test_written_samples_keep_their_low_res_inputs(tmp_path):
  samples = np.full((3, 8, 8, 3), 200, np.uint8)
  low = np.full((3, 4, 4, 3), -1.0, np.float32)
  png, npz = generate.write_samples(str(tmp_path), "s", samples, low_res=low)
  with np.load(npz) as f:
    np.testing.assert_array_equal(f["samples"], samples)
    np.testing.assert_array_equal(f["low_res"], np.zeros((3, 4, 4, 3), np.uint8))
  grid = np.asarray(Image.open(png))
  # Each input left of its sample: 4 columns (2 pairs), dark and bright in turn.
  columns, pad = 4, 2
  width = (grid.shape[1] - pad * (columns + 1)) // columns
  centres = [pad + i * (width + pad) + width // 2 for i in range(columns)]
  assert list(grid[pad + width // 2, centres, 0]) == [0, 200, 0, 200]
