"""Tests for diffusion_jax.models: shapes, the DDPM parameter count, the timestep embedding,
dropout, the zero-initialised output, batch independence and the config errors."""

import functools
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.models import layers

# Small enough to compile in seconds on a CPU, but with every kind of layer: two levels (one
# Downsample/Upsample), NIN shortcuts, attention at 4x4 with two heads.
TINY = dict(
  name="unet",
  channels=16,
  channel_mult=(1, 2),
  num_res_blocks=1,
  attn_resolutions=(4,),
  num_heads=2,
  dropout=0.1,
  num_groups=4,
  resamp_with_conv=True,
  out_channels=3,
  dtype="float32",
)

CIFAR10 = dict(
  name="unet",
  channels=128,
  channel_mult=(1, 2, 2, 2),
  num_res_blocks=2,
  attn_resolutions=(16,),
  num_heads=1,
  dropout=0.1,
  num_groups=32,
  resamp_with_conv=True,
  out_channels=3,
  dtype="float32",
)


# The tests compile whole networks (and their gradients): the shared compilation cache and XLA's
# cheap pipeline.
pytestmark = pytest.mark.usefixtures("fast_compile")


def _inputs(seed=0, batch=2, size=8, channels=3):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, channels)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
  return x, t


def _config(**overrides):
  return models.make_model({**TINY, **overrides}).config


@functools.cache
def _jitted_apply(config):
  # One compiled function per config, shared by the tests: eager dispatch and repeated
  # compilation would dominate the test time on a CPU.
  return jax.jit(models.UNet(config).apply, static_argnames="train")


def _apply(config, params, x, t, **kwargs):
  return _jitted_apply(config)({"params": params}, x, t, **kwargs)


def _param_shapes(config, x, t):
  return jax.eval_shape(models.UNet(config).init, jax.random.key(0), x, t)["params"]


def _random_params(config, x, t, seed=1):
  """Random parameters with unit-scale activations, in place of an init whose zero-initialised
  layers would hide the network's behaviour (and whose RNG is slow to compile on a CPU)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape, name = leaf.shape, path[-1].key
    if name == "kernel":
      value = rng.normal(0, 1 / math.sqrt(math.prod(shape[:-1])), shape)
    elif name == "scale":
      value = 1 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, _param_shapes(config, x, t))


def _num_params(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "overrides, size, in_channels",
  [
    ({}, 8, 3),
    # Three levels, pooling and plain resizing, no attention, no res blocks on the down path.
    (
      {
        "channel_mult": (1, 2, 2),
        "num_res_blocks": 0,
        "attn_resolutions": (),
        "out_channels": 6,
        "resamp_with_conv": False,
      },
      16,
      1,
    ),
    ({"dtype": "bfloat16"}, 8, 3),
    # 2x2 patches folded into channels: the U-Net runs at 8x8 and still returns 16x16.
    ({"patch_size": 2}, 16, 3),
  ],
)
def test_output_shape_and_dtype(overrides, size, in_channels):
  config = _config(**overrides)
  x, t = _inputs(size=size, channels=in_channels)
  out = _apply(config, _random_params(config, x, t), x, t)
  assert out.shape == (2, size, size, config.out_channels)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  # Parameters stay float32 whatever the compute dtype.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_param_shapes(config, x, t)))


def test_bfloat16_close_to_float32():
  x, t = _inputs()
  params = _random_params(_config(), x, t)
  out32 = _apply(_config(), params, x, t)
  out16 = _apply(_config(dtype="bfloat16"), params, x, t)
  rel = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
  assert rel < 0.05, rel


def _expected_num_params(
  channels, channel_mult, num_res_blocks, attn_resolutions, size, c_in, c_out
):
  """Counts the DDPM U-Net's parameters layer by layer, from the paper's architecture."""

  def conv3(c_i, c_o):
    return 9 * c_i * c_o + c_o

  def dense(c_i, c_o):
    return c_i * c_o + c_o

  def norm(c):
    return 2 * c  # scale and bias

  temb = 4 * channels

  def res(c_i, c_o):
    shortcut = dense(c_i, c_o) if c_i != c_o else 0
    return norm(c_i) + conv3(c_i, c_o) + dense(temb, c_o) + norm(c_o) + conv3(c_o, c_o) + shortcut

  def attn(c):
    return norm(c) + 4 * dense(c, c)  # q, k, v, output projection

  total = conv3(c_in, channels) + dense(channels, temb) + dense(temb, temb)
  skips, c, pixels = [channels], channels, size
  for level, mult in enumerate(channel_mult):
    for _ in range(num_res_blocks):
      total += res(c, channels * mult) + (
        attn(channels * mult) if pixels in attn_resolutions else 0
      )
      c = channels * mult
      skips.append(c)
    if level != len(channel_mult) - 1:
      total += conv3(c, c)
      skips.append(c)
      pixels //= 2
  total += res(c, c) + attn(c) + res(c, c)
  for level in reversed(range(len(channel_mult))):
    for _ in range(num_res_blocks + 1):
      c_new = channels * channel_mult[level]
      total += res(c + skips.pop(), c_new) + (attn(c_new) if pixels in attn_resolutions else 0)
      c = c_new
    if level != 0:
      total += conv3(c, c)
      pixels *= 2
  assert not skips
  return total + norm(c) + conv3(c, c_out)


def test_cifar10_parameter_count():
  model = models.make_model(CIFAR10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  count = _num_params(shapes)
  expected = _expected_num_params(128, (1, 2, 2, 2), 2, (16,), 32, 3, 3)
  assert count == expected
  # The count of the original TensorFlow code (the paper's "35.7M").
  assert count == 35_746_307 == models.CIFAR10_NUM_PARAMS
  # Attention sits exactly where the feature maps are 16x16 (level 1), and in the middle; the
  # count alone cannot tell level 1 from levels 2 and 3, which have the same width.
  attention = sorted(name for name in shapes if "attn" in name)
  assert attention == [
    "down_1_attn_0",
    "down_1_attn_1",
    "mid_attn_1",
    "up_1_attn_0",
    "up_1_attn_1",
    "up_1_attn_2",
  ]
  out = jax.eval_shape(model.apply, {"params": shapes}, x, t)
  assert out.shape == (1, 32, 32, 3) and out.dtype == jnp.float32


def test_make_model_accepts_config_dict():
  from configs import default

  model = models.make_model(default.get_config().model)
  assert model.config == models.UNetConfig(**{k: v for k, v in CIFAR10.items() if k != "name"})


def test_tiny_parameter_count_matches_hand_count():
  x, t = _inputs()
  shapes = _param_shapes(_config(), x, t)
  assert _num_params(shapes) == _expected_num_params(16, (1, 2), 1, (4,), 8, 3, 3)


def test_timestep_embedding_closed_form():
  t = jnp.array([0, 1, 10, 999], jnp.int32)
  emb = layers.timestep_embedding(t, 8)
  # Four frequencies from 1 down to 1/10000, geometrically spaced.
  freqs = np.array([1.0, 10_000 ** (-1 / 3), 10_000 ** (-2 / 3), 1e-4])
  args = np.array([0, 1, 10, 999], np.float64)[:, None] * freqs[None, :]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  assert emb.shape == (4, 8) and emb.dtype == jnp.float32
  np.testing.assert_allclose(emb, expected, atol=2e-4)
  np.testing.assert_array_equal(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
  # Float timesteps: integer values agree with int input, fractional ones interpolate.
  np.testing.assert_allclose(layers.timestep_embedding(t.astype(jnp.float32), 8), emb)
  half = layers.timestep_embedding(jnp.array([2.5]), 8)
  np.testing.assert_allclose(half[0, 0], np.sin(2.5), atol=1e-6)
  # An odd width gets a zero column.
  odd = layers.timestep_embedding(t, 9)
  np.testing.assert_allclose(odd[:, :8], emb)
  np.testing.assert_array_equal(odd[:, 8], 0)


def test_output_depends_on_timestep():
  config = _config()
  x, _ = _inputs()
  x = jnp.concatenate([x[:1], x[:1]])  # the same image twice
  t = jnp.array([3, 700], jnp.int32)
  params = _random_params(config, x, t)
  out = _apply(config, params, x, t)
  assert np.abs(out[0] - out[1]).max() > 1e-2


def test_dropout():
  config = _config()
  x, t = _inputs()
  params = _random_params(config, x, t)
  # Any key implementation works; threefry's dropout masks are slow to compile on a CPU.
  k1, k2 = jax.random.key(10, impl="unsafe_rbg"), jax.random.key(11, impl="unsafe_rbg")
  eval_a = _apply(config, params, x, t, train=False)
  np.testing.assert_array_equal(eval_a, _apply(config, params, x, t))
  train_1 = _apply(config, params, x, t, train=True, rngs={"dropout": k1})
  train_1b = _apply(config, params, x, t, train=True, rngs={"dropout": k1})
  train_2 = _apply(config, params, x, t, train=True, rngs={"dropout": k2})
  np.testing.assert_array_equal(train_1, train_1b)
  assert np.abs(train_1 - train_2).max() > 1e-2
  assert np.abs(train_1 - eval_a).max() > 1e-2
  # Without dropout, train mode needs no key and computes the eval function.
  no_drop = _apply(_config(dropout=0.0), params, x, t, train=True)
  np.testing.assert_allclose(no_drop, eval_a, atol=1e-5)


def test_zero_output_at_init():
  config = _config()
  x, t = _inputs()
  # The default threefry RNG is slow to compile on a CPU; the init's structure is the same.
  key = jax.random.key(0, impl="unsafe_rbg")
  params = jax.jit(models.UNet(config).init)(key, x, t)["params"]
  out = _apply(config, params, x, t)
  np.testing.assert_array_equal(out, np.zeros((2, 8, 8, 3)))
  # Every residual branch ends in a zero layer, so each block starts as the identity; the other
  # kernels are random, so the features reaching conv_out are not (training can start).
  for name, sub in params.items():
    if "_block_" in name:
      assert not np.any(sub["conv2"]["kernel"]), name
      assert np.all(sub["conv1"]["kernel"] != 0), name
    if "_attn_" in name:
      assert not np.any(sub["proj_out"]["kernel"]), name
      assert np.all(sub["q"]["kernel"] != 0), name
  assert np.all(params["conv_in"]["kernel"] != 0)


def test_batch_independence():
  config = _config()
  x, t = _inputs(seed=3)
  params = _random_params(config, x, t)
  out = _apply(config, params, x, t)
  for i in range(2):
    alone = _apply(config, params, x[i : i + 1], t[i : i + 1])
    np.testing.assert_allclose(out[i : i + 1], alone, rtol=1e-4, atol=1e-5)
  # Swapping the examples swaps the outputs.
  np.testing.assert_allclose(_apply(config, params, x[::-1], t[::-1]), out[::-1], atol=1e-5)


@pytest.mark.parametrize(
  "overrides, image_size, fields",
  [
    ({}, 30, ("data.image_size", "model.channel_mult")),
    ({"channels": 48}, 32, ("model.num_groups", "model.channel_mult")),
    ({"num_groups": 12}, 32, ("model.num_groups",)),
    ({"name": "dit"}, 32, ("model.name", "unet")),
    ({"dtype": "int8"}, 32, ("model.dtype",)),
    ({"patch_size": 3}, 32, ("data.image_size", "model.patch_size")),
    ({"patch_size": 0}, 32, ("model.patch_size",)),
  ],
)
def test_bad_config_errors(overrides, image_size, fields):
  config = {**CIFAR10, **overrides}
  with pytest.raises(ValueError) as error:
    models.check_model_config(config, image_size)
  message = str(error.value)
  assert "\n" not in message
  for field in fields:
    assert field in message


def test_valid_config_passes_and_call_time_check():
  models.check_model_config(CIFAR10, 32)
  models.check_model_config(TINY, 8)
  with pytest.raises(ValueError, match="model.name"):
    models.make_model({**TINY, "name": "dit"})
  # The module checks the size it is called with too.
  model = models.make_model(CIFAR10)
  x = jax.ShapeDtypeStruct((1, 30, 30, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  with pytest.raises(ValueError, match="data.image_size"):
    jax.eval_shape(model.init, jax.random.key(0), x, t)


def test_models_package_imports_no_training_libraries():
  code = (
    "import sys, diffusion_jax.models; "
    "bad = [m for m in ('ml_collections', 'optax', 'orbax', 'tensorflow_datasets', 'grain') "
    "if m in sys.modules]; assert not bad, bad"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


def test_space_to_depth_layout_and_inverse():
  x = jnp.arange(2 * 6 * 4 * 3, dtype=jnp.float32).reshape(2, 6, 4, 3)
  folded = layers.space_to_depth(x, 2)
  assert folded.shape == (2, 3, 2, 12)
  # Channel block (r, c) of patch (i, j) is the pixel (2i + r, 2j + c), all its channels.
  for i, j, r, c in [(0, 0, 0, 0), (1, 1, 1, 0), (2, 0, 0, 1), (2, 1, 1, 1)]:
    start = (2 * r + c) * 3
    np.testing.assert_array_equal(folded[:, i, j, start : start + 3], x[:, 2 * i + r, 2 * j + c])
  np.testing.assert_array_equal(layers.depth_to_space(folded, 2), x)


def _network_under(choice, value, seed):
  """(output, parameters' gradient of a squared loss, the gradient's jaxpr, parameters) of a
  small U-Net on random parameters, with the speed path `choice` of `FastPaths` set to `value`.

  The tiny network without the down path's ResBlocks: still two levels (one Downsample and
  Upsample), ResBlocks with and without a NIN shortcut, attention in the middle and at 4x4."""
  return _network(_config(num_res_blocks=0, fast={choice: value}), seed)


@functools.cache
def _network(config, seed):
  # Cached: the plain network (every speed path off) is the reference of more than one test.
  x, t = _inputs(seed=seed)
  params = _random_params(config, x, t)

  def loss(p):
    out = models.UNet(config).apply({"params": p}, x, t)
    return jnp.sum(jnp.square(out)), out

  # One trace gives both the jaxpr and one compiled program for the gradient and the output.
  traced = jax.jit(jax.grad(loss, has_aux=True)).trace(params)
  grads, out = traced.lower().compile()(params)
  return out, grads, str(traced.jaxpr), params


def _assert_equal_up_to_rounding(want, got):
  """Every leaf within 1e-5 (relative) of the other, or of the largest entry of `want`."""
  scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)


def test_held_branch_gradient_changes_no_gradient():
  """`fast.skips.residual` with hold: the same function and gradient, a barrier per block."""
  out, grads, jaxpr, params = _network_under("hold_branch_gradient", False, 4)
  held_out, held_grads, held_jaxpr, _ = _network_under("hold_branch_gradient", True, 4)
  blocks = sum(1 for name in params if "_block_" in name or "_attn_" in name)
  barriers = held_jaxpr.count("optimization_barrier") - jaxpr.count("optimization_barrier")
  assert blocks > 0 and barriers == blocks
  np.testing.assert_array_equal(held_out, out)
  _assert_equal_up_to_rounding(grads, held_grads)


@pytest.mark.parametrize("out_channels", [8, 12])
def test_res_block_reads_parts_as_their_concatenation(out_channels):
  """The up path hands a ResBlock (h, skip): the parameters, the output and the gradients are
  those of the block on their concatenation (with a NIN projection, and without one)."""
  rng = np.random.default_rng(5)
  h, skip = (jnp.asarray(rng.normal(size=(2, 4, 4, c)), jnp.float32) for c in (8, 4))
  temb = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
  both = jnp.concatenate([h, skip], axis=-1)
  # Groups of 3 channels: one straddles the cut between h and skip.
  block = layers.ResBlock(out_channels, num_groups=4)
  # Jitted (eager dispatch compiles every operation on its own); threefry's initialisers are slow
  # to compile on a CPU, and any key implementation draws the same way from both inputs.
  init = jax.jit(block.init)
  key = jax.random.key(0, impl="unsafe_rbg")
  params = init(key, both, temb)
  from_parts = init(key, (h, skip), temb)
  assert jax.tree.structure(params) == jax.tree.structure(from_parts)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(from_parts), strict=True):
    np.testing.assert_array_equal(a, b)
  # Random parameters, so that the zero-initialised layers do not hide anything.
  params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  w = jnp.asarray(rng.normal(size=(2, 4, 4, out_channels)), jnp.float32)

  def loss(x):
    out = block.apply(params, x, temb)
    return jnp.sum(out * w), out

  # The output and the gradient of its product with w, one program per input structure.
  out_and_grad = jax.jit(jax.grad(loss, has_aux=True))
  (dh, dskip), out_parts = out_and_grad((h, skip))
  d_both, out_both = out_and_grad(both)
  assert out_parts.shape == (2, 4, 4, out_channels)
  np.testing.assert_allclose(out_parts, out_both, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jnp.concatenate([dh, dskip], axis=-1), d_both, rtol=1e-5, atol=1e-5)


def test_up_path_in_parts_is_the_concatenated_network():
  """`FastPaths.skips_in_parts`: the same parameters, output and gradients."""
  # The inputs of test_held_branch_gradient_changes_no_gradient: the plain network is shared.
  out, grads, _, _ = _network_under("skips_in_parts", False, 4)
  parts_out, parts_grads, _, _ = _network_under("skips_in_parts", True, 4)
  _assert_equal_up_to_rounding(out, parts_out)
  _assert_equal_up_to_rounding(grads, parts_grads)
