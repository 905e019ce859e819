"""Tests of the speed switches: several train steps per call (bitwise the same however the steps
are split into calls), the sub-pixel Upsample, fused attention, rematerialisation, Winograd
convolutions and bfloat16 compute, each against the plain computation within its stated
tolerance."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_files import load_state, read_metrics
from test_models import TINY

from diffusion_jax import models
from diffusion_jax.core import rng
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import train
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.models import FastPaths, attention, layers, unet
from diffusion_jax.models.fast import subpixel
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime.errors import ConfigError

pytestmark = pytest.mark.usefixtures("fast_compile")


def leaves_bitwise_equal(first, second):
  pairs = zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
  return all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in pairs)


def flat(tree):
  return np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(tree)])


def relative_difference(first, second):
  """|second - first| / |first|, global L2 norms over all leaves."""
  first, second = flat(first), flat(second)
  return float(np.linalg.norm(second - first) / np.linalg.norm(first))


def update_difference(start, first, second):
  """|second - first| / |first - start| (global L2 norms): how far two training results that
  should agree up to float rounding differ, relative to how far training moved the params."""
  start, first, second = flat(start), flat(first), flat(second)
  return float(np.linalg.norm(second - first) / np.linalg.norm(first - start))


def copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# ---------------------------------------------------------------- steps per call


# A 7-step run with 4 steps per call (log every 5, save every 3). Dropout on, so that the per-step
# keys matter; warm-up 0, so that every step moves the params. Both groups of tests below use it,
# so that they compile the same programs (the looped and the plain step, the init).
MULTI_OVERRIDES = {
  "model.dropout": 0.1,
  "train.warmup_steps": 0,
  "train.steps_per_call": 4,
  "train.num_steps": 7,
  "train.log_every": 5,
  "train.checkpoint_every": 3,
  "train.sample_every": 0,
  "train.num_grid_samples": 0,
  "train.keep_checkpoints": 10,
}


@pytest.fixture(scope="module")
def multi_setup(tiny_config):
  run = run_lib.make_run(tiny_config(MULTI_OVERRIDES))
  state = jax.device_get(run.init_state(rng.stream_key(0, rng.INIT)))
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 8, 8, 3), dtype=np.uint8)
  return run, state, images


def test_steps_per_call_does_not_depend_on_the_split(multi_setup):
  run, state0, images = multi_setup
  key = rng.stream_key(0, rng.TRAIN)
  k = run.train.steps_per_call
  looped = step_lib.compile_train_step(run, steps_per_call=k)

  def run_calls(split):
    state, first = copy_tree(state0), 0
    for n in split:
      # The call reads batches[:n]; the rest of the k slots are filler.
      rows = np.concatenate([images[first : first + n], images[:1].repeat(k - n, axis=0)])
      batch = parallel.put_batch({"image": rows}, run.mesh, axis=1)
      state, metrics = looped(state, batch, n, key)
      first += n
    return jax.device_get((state, metrics))

  once = run_calls([3])
  assert int(once[0].step) == 3
  for split in ([1, 1, 1], [2, 1], [1, 2]):
    assert leaves_bitwise_equal(run_calls(split), once), split

  # The plain step, compiled as a program of its own, agrees up to float rounding.
  plain = step_lib.compile_train_step(run)
  state = copy_tree(state0)
  losses = []
  for i in range(3):
    state, metrics = plain(state, parallel.put_batch({"image": images[i]}, run.mesh), key)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 3
  moved = update_difference(state0.params, jax.device_get(state.params), once[0].params)
  assert moved < 1e-4
  assert math.isclose(float(once[1]["loss"]), losses[-1], rel_tol=1e-5)
  # param_norm, added once per call, is the norm of the parameters the call returns.
  assert math.isclose(
    float(once[1]["param_norm"]), np.linalg.norm(flat(once[0].params)), rel_tol=1e-5
  )
  assert math.isclose(
    float(metrics["param_norm"]), np.linalg.norm(flat(jax.device_get(state.params))), rel_tol=1e-5
  )
  # ... and the steps really differ from each other (different batches and keys).
  assert len(set(losses)) == 3


@pytest.fixture(scope="module")
def multi_runs(tiny_config, tmp_path_factory):
  """The MULTI_OVERRIDES run straight, resumed at 4, and with one step per call."""
  overrides = MULTI_OVERRIDES
  straight = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(tiny_config(overrides), straight)
  resumed = str(tmp_path_factory.mktemp("resumed"))
  train.train_and_evaluate(tiny_config({**overrides, "train.num_steps": 4}), resumed)
  train.train_and_evaluate(tiny_config(overrides), resumed)
  plain = str(tmp_path_factory.mktemp("plain"))
  train.train_and_evaluate(tiny_config({**overrides, "train.steps_per_call": 1}), plain)
  return tiny_config(overrides), straight, resumed, plain


def test_loop_with_steps_per_call_logs_saves_and_resumes_exactly(multi_runs):
  config, straight, resumed, plain = multi_runs
  init = jax.device_get(run_lib.make_run(config).init_state(rng.stream_key(config.seed, rng.INIT)))
  # Calls end where a step logs or saves, 1-3, 4-5, 6, 7, and log there; the first call's end
  # takes the place of step 1.
  assert [r["step"] for r in read_metrics(straight)] == [3, 5, 6, 7]
  assert [r["step"] for r in read_metrics(plain)] == [1, 3, 5, 6, 7]
  for step in (3, 6, 7):
    first, second = load_state(config, straight, step), load_state(config, resumed, step)
    assert int(first.step) == step
    # Resuming at step 4 splits the steps into other calls (1-3, 4 | 5, 6, 7): same bits.
    assert leaves_bitwise_equal(first, second), step
    # Against one step per call (a program of its own): the same up to float rounding.
    other = load_state(config, plain, step).params
    assert update_difference(init.params, other, first.params) < 1e-4


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"train.steps_per_call": 0}, "train.steps_per_call=0"),
    ({"train.steps_per_call": 2, "seeds": "0,1"}, "seed study"),
    ({"model.attention": "flash"}, "model.attention='flash'"),
    ({"model.conv": "fft"}, "model.conv='fft'"),
    ({"model.microbatch": -4}, "model.microbatch=-4"),
  ],
)
def test_bad_fast_path_settings_are_config_errors(tiny_config, overrides, message):
  with pytest.raises(ConfigError, match=message) as error:
    run_lib.make_run(tiny_config(overrides))
  assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the network

# Two levels (one Downsample/Upsample), attention at 4x4 with two heads (in the middle and on the
# up path), ResBlocks with and without a NIN shortcut, dropout; XLA's convolutions. No ResBlocks on
# the down path: every kind of layer, in fewer layers to compile.
NET = unet.unet_config_from({**TINY, "conv": "xla", "num_res_blocks": 0})


def _net_inputs():
  np_rng = np.random.default_rng(0)
  x = jnp.asarray(np_rng.uniform(-1, 1, (3, 8, 8, 3)), jnp.float32)
  t = jnp.asarray([3, 300, 900], jnp.int32)
  return x, t


def _random_params(config, x, t):
  """Unit-scale random parameters (the init's zero layers would hide differences), drawn with
  NumPy: jax.random would compile a program per parameter shape."""
  shapes = jax.eval_shape(unet.UNet(config).init, jax.random.key(0), x, t)["params"]
  np_rng = np.random.default_rng(1)

  def draw(s):
    scale = math.sqrt(math.prod(s.shape[:-1]) if len(s.shape) > 1 else 10)
    return jnp.asarray(np_rng.normal(size=s.shape) / scale, jnp.float32)

  return jax.tree.map(draw, shapes)


def _loss_and_grads(config, params, x, t):
  model = unet.UNet(config)
  keys = jax.random.split(jax.random.key(5), x.shape[0])

  def loss(params):
    out = model.apply({"params": params}, x, t, train=True, dropout_keys=keys)
    return jnp.mean(jnp.square(out - x))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def net_reference():
  """(x, t, params, loss, grads) of the plain network, computed once for the tests that compare
  a variant of it against it."""
  x, t = _net_inputs()
  params = _random_params(NET, x, t)
  return x, t, params, *_loss_and_grads(NET, params, x, t)


def test_subpixel_conv_is_the_upsampled_convolution():
  np_rng = np.random.default_rng(3)
  # Not square, odd sizes: every phase and border case.
  x = jnp.asarray(np_rng.normal(size=(2, 5, 7, 6)), jnp.float32)
  sub = subpixel.SubpixelConv(4)
  params = sub.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: jnp.asarray(np_rng.normal(size=p.shape), jnp.float32), params)
  plain = layers.conv3x3(4, jnp.float32, "conv")
  upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  expected = plain.apply(params, upsampled)
  actual = sub.apply(params, x)
  assert actual.shape == (2, 10, 14, 4)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
  # The same initialisation as the plain conv of the same name (checkpoints interchange).
  x_up = jnp.zeros((1, 8, 8, 6))
  inits = [
    layers.Upsample(subpixel=flag).init(jax.random.key(7), x_up[:, :4, :4]) for flag in (1, 0)
  ]
  assert leaves_bitwise_equal(*inits)


@pytest.mark.parametrize(
  "overrides, tolerance",
  [
    ({"subpixel_upsample": False}, 1e-5),
    ({"attention": "fused"}, 1e-5),
    ({"remat": True}, 1e-5),
    # Winograd for every 3x3 convolution (the tiny network is below winograd_large's threshold).
    ({"conv": "winograd"}, 1e-5),
    # The reference GroupNorm (flax's formula, autodiff) against the fused operation.
    ({"fast": FastPaths(group_norm="reference")}, 1e-5),
    # (hold_branch_gradient and skips_in_parts: tests/test_models.py; recompute_dz:
    # tests/test_groupnorm.py.)
  ],
)
def test_network_switches_change_only_rounding(net_reference, overrides, tolerance):
  x, t, params, loss, grads = net_reference
  other = dataclasses.replace(NET, **overrides)
  # Same parameter tree, so either setting loads the other's checkpoints.
  shapes = [jax.eval_shape(unet.UNet(c).init, jax.random.key(0), x, t) for c in (NET, other)]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
  other_loss, other_grads = _loss_and_grads(other, params, x, t)
  assert math.isclose(float(loss), float(other_loss), rel_tol=tolerance)
  assert relative_difference(grads, other_grads) < tolerance


def test_fused_attention_with_a_mask_matches_the_plain_one():
  np_rng = np.random.default_rng(4)
  q = jnp.asarray(np_rng.normal(size=(2, 6, 3, 8)), jnp.float32)
  k, v = (jnp.asarray(np_rng.normal(size=(2, 5, 3, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray([[True, True, False, True, False], [True, False, False, False, False]])
  plain = attention.attention(q, k, v, mask, jnp.float32, "plain")
  fused = attention.attention(q, k, v, mask, jnp.float32, "fused")
  np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-6)
  # The second example attends to its first key only.
  np.testing.assert_allclose(fused[1], jnp.broadcast_to(v[1, :1], (6, 3, 8)), atol=1e-6)


def test_fused_attention_falls_back_to_xla_where_cudnn_is_absent(monkeypatch):
  # Asked for cuDNN's flash attention where cuDNN refuses, "fused" computes XLA's, bitwise.
  np_rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(np_rng.normal(size=(2, 16, 1, 32)), jnp.bfloat16) for _ in range(3))
  xla = attention.attention(q, k, v, None, jnp.bfloat16, "fused", flash=False)
  if jax.default_backend() != "gpu":  # no cuDNN here: the real call refuses
    assert attention._cudnn_attention(q, k, v, None) is None
    np.testing.assert_array_equal(
      attention.attention(q, k, v, None, jnp.bfloat16, "fused", flash=True), xla
    )
  # cuDNN refusing the inputs, on any backend.
  dot_product_attention = jax.nn.dot_product_attention

  def refusing(*args, implementation=None, **kwargs):
    if implementation == "cudnn":
      raise NotImplementedError("cuDNN does not take these inputs")
    return dot_product_attention(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
  assert attention._cudnn_attention(q, k, v, None) is None
  np.testing.assert_array_equal(
    attention.attention(q, k, v, None, jnp.bfloat16, "fused", flash=True), xla
  )


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's attention needs a GPU")
def test_cudnn_flash_attention_matches_the_plain_one_on_a_gpu():
  # The CIFAR-10 network's 16x16 self-attention: 256 tokens, one head of 256 channels, bfloat16.
  np_rng = np.random.default_rng(6)
  q, k, v = (jnp.asarray(np_rng.normal(size=(4, 256, 1, 256)), jnp.bfloat16) for _ in range(3))
  assert attention._cudnn_attention(q, k, v, None) is not None
  fn = lambda impl: (
    lambda q, k, v: attention.attention(q, k, v, None, jnp.bfloat16, impl, flash=True)
  )
  cot = jnp.asarray(np_rng.normal(size=q.shape), jnp.bfloat16)
  grads = {}
  for impl in ("plain", "fused"):
    out, vjp = jax.vjp(fn(impl), q, k, v)
    grads[impl] = (out, *vjp(cot))
  for fused, plain in zip(grads["fused"], grads["plain"], strict=True):
    fused, plain = np.asarray(fused, np.float32), np.asarray(plain, np.float32)
    assert np.linalg.norm(fused - plain) < 0.02 * np.linalg.norm(plain)


# bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%), in every layer's inputs and
# weights; float32 parameters, GroupNorm statistics, softmax and loss keep the error from
# growing with depth. The stated bound: the loss within 0.5%, the gradient within 2% (relative
# L2 norm); this network gives 0.12% and 0.79%.
BF16_LOSS_BOUND = 0.005
BF16_GRAD_BOUND = 0.02


def test_bfloat16_loss_and_gradient_within_the_stated_bound(net_reference):
  x, t, params, loss32, grads32 = net_reference
  loss16, grads16 = _loss_and_grads(dataclasses.replace(NET, dtype="bfloat16"), params, x, t)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  assert abs(float(loss16) / float(loss32) - 1) < BF16_LOSS_BOUND
  rel = relative_difference(grads32, grads16)
  assert rel < BF16_GRAD_BOUND, rel
  # Not vacuous: the two computations do differ.
  assert float(loss16) != float(loss32)


def test_in_chunks_applies_the_function_chunk_by_chunk_in_order():
  calls = []

  def fn(x, t, *, scale):
    calls.append(x.shape)  # traced once per distinct shape
    return x * t[:, None] + scale

  x = jnp.arange(24.0).reshape(12, 2)
  t = jnp.arange(12.0)
  scale = jnp.arange(12.0)[:, None] * 100
  expected = fn(x, t, scale=scale)
  calls.clear()
  for chunk, num_devices in ((3, 1), (2, 2), (1, 4)):
    out = jax.jit(models.in_chunks(fn, chunk, num_devices))(x, t, scale=scale)
    np.testing.assert_array_equal(out, expected)
    assert calls[-1] == (chunk * num_devices, 2)  # the function saw one chunk at a time
  # Chunk i of n holds examples j * n + i: a batch sharded in blocks over the devices stays put.
  seen = []
  jax.jit(models.in_chunks(lambda x, t: jax.debug.callback(seen.append, x) or x, 2, 2))(x, t)
  expected_chunks = [[0, 6, 12, 18], [2, 8, 14, 20], [4, 10, 16, 22]]
  assert [np.asarray(c)[:, 0].tolist() for c in seen] == expected_chunks
  # No whole chunks: one call on the whole batch.
  calls.clear()
  jax.jit(models.in_chunks(fn, 5, 1))(x, t, scale=scale)
  assert calls == [(12, 2)]


def test_microbatched_sampling_network_matches_the_whole_batch():
  x, t = _net_inputs()
  x, t = jnp.concatenate([x] * 4), jnp.concatenate([t] * 4)
  params = _random_params(NET, x, t)
  apply = lambda x, t: unet.UNet(NET).apply({"params": params}, x, t)
  whole = jax.jit(apply)(x, t)
  chunked = jax.jit(models.in_chunks(apply, 4))(x, t)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "backend, expected",
  [
    ("cpu", ("winograd_large", "false", "false", "false", "false", "unroll")),
    ("gpu", ("xla", "true", "true", "true", "true", "vmap")),
    ("tpu", ("xla", "true", "true", "true", "false", "vmap")),
  ],
)
def test_auto_settings_resolve_once_per_backend(tiny_config, backend, expected):
  config = tiny_config()
  resolved = run_lib.resolve_auto(config, backend)
  fast = resolved.model.fast
  got = (resolved.model.conv, fast.recompute_dz, fast.hold_branch_gradient, fast.skips_in_parts)
  got += (fast.flash_attention, resolved.train.seed_batching)
  assert got == expected
  assert config.model.conv == "auto" and config.model.fast.recompute_dz == "auto"  # a copy
  # Explicit values are kept, and the model sees exactly the resolved choices.
  config.model.fast.skips_in_parts = "true"
  assert run_lib.resolve_auto(config, "cpu").model.fast.skips_in_parts == "true"
  paths = models.make_model(resolved.model).config.fast
  assert paths.skips_in_parts is (expected[3] == "true") and paths.group_norm == "fused"


def test_a_run_holds_no_auto_setting(tiny_config):
  run = run_lib.make_run(tiny_config())
  assert '"auto"' not in json.dumps(run.config.to_dict())
  assert run.model.config.fast == models.make_model(run.config.model).config.fast
  with pytest.raises(ValueError, match="model.fast.skips_in_parts='maybe' must be true, false"):
    models.make_model({**TINY, "fast": {"skips_in_parts": "maybe"}})
