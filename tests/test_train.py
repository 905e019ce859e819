"""Tests of diffusion_jax.train: the training loop and its files, exact resuming, seeds, the pure
train step (metrics, warm-up, EMA, per-example keys), sampling from a checkpoint, the stop on
a non-finite loss, SIGKILL and SIGTERM during a run, and broken checkpoints."""

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from run_files import load_state, random_params, read_metrics, trees_equal

from diffusion_jax.core import diffusion, rng
from diffusion_jax.experiment import generate, optim, sample_mode, train
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.runtime import checkpoints, images, interrupts
from diffusion_jax.runtime.errors import ConfigError

pytestmark = pytest.mark.usefixtures("fast_compile")

# ---------------------------------------------------------------- helpers


def saved_steps(workdir):
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"))
  try:
    return store.all_steps()
  finally:
    store.close()


def assert_bitwise_equal(first, second):
  """Same tree structure, and every leaf has the same shape, dtype and bytes."""
  assert jax.tree.structure(first) == jax.tree.structure(second)
  leaves = jax.tree_util.tree_flatten_with_path(first)[0]
  for (path, a), b in zip(leaves, jax.tree.leaves(second), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    name = jax.tree_util.keystr(path)
    assert (a.shape, a.dtype) == (b.shape, b.dtype), name
    assert a.tobytes() == b.tobytes(), f"{name} differs"


def read_png(path):
  with Image.open(path) as image:
    return np.asarray(image)


def read_npz(path):
  with np.load(path) as f:
    return f["samples"]


def global_norm64(tree):
  return math.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree)))


def warmup_lr(train_config, step):
  """Linear warm-up from 0 to the learning rate over `warmup_steps`, then constant."""
  return train_config.learning_rate * min(step / max(train_config.warmup_steps, 1), 1.0)


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def reference(fast_compile, tiny_config, tmp_path_factory):
  """One uninterrupted run of 6 steps (checkpoints and grids at steps 3 and 6)."""
  config = tiny_config()
  workdir = str(tmp_path_factory.mktemp("reference"))
  last = train.train_and_evaluate(config, workdir)
  return types.SimpleNamespace(config=config, workdir=workdir, last=last)


@pytest.fixture(scope="module")
def resumed(reference, tiny_config, tmp_path_factory):
  """The reference run's config trained in two calls: to step 3, then on to step 6."""
  workdir = str(tmp_path_factory.mktemp("resumed"))
  train.train_and_evaluate(tiny_config({"train.num_steps": 3}), workdir)
  first_metrics = read_metrics(workdir)
  first_steps = saved_steps(workdir)
  train.train_and_evaluate(tiny_config(), workdir)
  return types.SimpleNamespace(
    workdir=workdir, first_metrics=first_metrics, first_steps=first_steps
  )


# ---------------------------------------------------------------- the training loop


def test_train_writes_config_metrics_checkpoints_and_grids(reference):
  config, workdir = reference.config, reference.workdir
  # The config as given, with each "auto" speed setting resolved for this backend.
  resolved = run_lib.resolve_auto(config, jax.default_backend())
  with open(os.path.join(workdir, "config.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(resolved.to_dict()))
  assert '"auto"' not in json.dumps(written)
  # The loss-curve picture, redrawn at each checkpoint.
  with Image.open(os.path.join(workdir, "metrics.png")) as picture:
    assert picture.format == "PNG" and picture.size == (1000, 700)

  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, config.train.num_steps + 1))
  for r in records:
    assert {"step", "loss", "grad_norm", "param_norm", "lr"} <= set(r)
    assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "param_norm", "lr"))
    # The step taking state.step = s - 1 to s uses the learning rate of s - 1.
    assert r["lr"] == pytest.approx(warmup_lr(config.train, r["step"] - 1), rel=1e-6)
  assert reference.last == {k: v for k, v in records[-1].items() if k != "step"}

  assert saved_steps(workdir) == [3, 6]
  for step in (3, 6):
    # Previews by DPM-Solver++ (train.grid_sampler), which the file name says.
    name = os.path.join(workdir, "samples", f"step_{step:07d}_dpm_solver++_20steps")
    samples = read_npz(name + ".npz")
    assert samples.dtype == np.uint8
    assert samples.shape == (config.train.num_grid_samples, 8, 8, 3)
    np.testing.assert_array_equal(
      read_png(name + ".png"), images.make_grid(images.upscale(samples))
    )


def test_checkpoint_holds_the_trained_state(reference):
  state = load_state(reference.config, reference.workdir)
  assert int(state.step) == reference.config.train.num_steps
  leaves = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
  assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
  assert global_norm64(state.params) == pytest.approx(reference.last["param_norm"], rel=1e-5)
  # Steps 4..6 moved the parameters, and the EMA lags behind them.
  earlier = load_state(reference.config, reference.workdir, step=3)
  assert not trees_equal(state.params, earlier.params)
  assert not trees_equal(state.params, state.ema_params)


def test_resume_reproduces_the_uninterrupted_run(reference, resumed):
  assert resumed.first_steps == [3]
  assert [r["step"] for r in resumed.first_metrics] == [1, 2, 3]
  assert saved_steps(resumed.workdir) == [3, 6]

  expected = load_state(reference.config, reference.workdir)
  actual = load_state(reference.config, resumed.workdir)
  assert int(actual.step) == int(expected.step) == 6
  assert_bitwise_equal(actual.params, expected.params)
  assert_bitwise_equal(actual.ema_params, expected.ema_params)
  assert_bitwise_equal(actual.opt_state, expected.opt_state)

  # Every step is logged once, and the resumed steps 4..6 log exactly the uninterrupted values.
  records = read_metrics(resumed.workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[3:] == read_metrics(reference.workdir)[3:]
  # The final grids come from equal EMA parameters and the same sample key.
  grid = "samples/step_0000006_dpm_solver++_20steps.npz"
  np.testing.assert_array_equal(
    read_npz(os.path.join(resumed.workdir, grid)), read_npz(os.path.join(reference.workdir, grid))
  )


def test_same_seed_gives_identical_runs(reference, resumed):
  # The first half of the resumed run is an independent 3-step run of the same config and seed.
  expected = load_state(reference.config, reference.workdir, step=3)
  actual = load_state(reference.config, resumed.workdir, step=3)
  assert_bitwise_equal(actual, expected)
  assert resumed.first_metrics == read_metrics(reference.workdir)[:3]


def test_different_seed_gives_different_params(reference, tiny_config, tmp_path):
  # Also checks which steps are logged and saved: the first, the multiples of log_every and the
  # last; only the last is a multiple of nothing else here, and sample_every=0 samples at the end.
  config = tiny_config(
    {
      "seed": 1,
      "train.num_steps": 3,
      "train.log_every": 5,
      "train.checkpoint_every": 100,
      "train.sample_every": 0,
    }
  )
  train.train_and_evaluate(config, str(tmp_path))
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 3]
  assert saved_steps(tmp_path) == [3]
  assert sorted(os.listdir(tmp_path / "samples")) == [
    "step_0000003_dpm_solver++_20steps.npz",
    "step_0000003_dpm_solver++_20steps.png",
  ]

  other = load_state(config, str(tmp_path))
  same_steps = load_state(reference.config, reference.workdir, step=3)
  assert int(other.step) == int(same_steps.step) == 3
  assert not trees_equal(other.params, same_steps.params)
  assert records[-1]["loss"] != read_metrics(reference.workdir)[2]["loss"]


# ---------------------------------------------------------------- the train step


@pytest.fixture(scope="module")
def step_setup(reference, tiny_config, tmp_path_factory):
  """A jitted train step of the tiny model with dropout and the config's prediction (v), the loss
  it must compute example by example, a trained and a fresh state, a batch."""
  config = tiny_config({"model.dropout": 0.1})
  run = run_lib.make_run(config)
  step_fn = jax.jit(
    functools.partial(
      step_lib.train_step,
      model=run.model,
      schedule=run.schedule,
      tx=run.tx,
      train_config=config.train,
      prediction=config.diffusion.prediction,
    )
  )

  @jax.jit
  def expected_loss(params, image, loss_keys, dropout_keys):
    """{prediction: mean_j simple_loss(x0_j, loss_keys[j])} for v and eps, the network on
    example j alone with dropout from dropout_keys[j]."""
    x0 = image.astype(jnp.float32) / 127.5 - 1.0
    losses = {"v": [], "eps": []}
    for j in range(x0.shape[0]):

      def denoise_fn(x_t, t, j=j):
        return run.model.apply(
          {"params": params}, x_t, t, train=True, dropout_keys=dropout_keys[j][None]
        )

      for prediction, values in losses.items():
        values.append(
          diffusion.simple_loss(
            run.schedule, denoise_fn, x0[j : j + 1], loss_keys[j], prediction=prediction
          )[0]
        )
    return {prediction: jnp.mean(jnp.stack(values)) for prediction, values in losses.items()}

  empty = checkpoints.CheckpointStore(str(tmp_path_factory.mktemp("fresh")))
  fresh = jax.device_get(run_lib.restore_or_init(run, empty))
  empty.close()
  trained = load_state(config, reference.workdir, step=3)
  batch = {"image": np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)}
  return types.SimpleNamespace(
    config=config,
    run=run,
    step_fn=step_fn,
    expected_loss=expected_loss,
    fresh=fresh,
    trained=trained,
    batch=batch,
  )


def copy_tree(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_train_step_is_pure(step_setup):
  s = step_setup
  key = jax.random.key(42)
  before = jax.device_get(copy_tree(s.trained))
  first = jax.device_get(s.step_fn(copy_tree(s.trained), copy_tree(s.batch), key))
  second = jax.device_get(s.step_fn(copy_tree(s.trained), copy_tree(s.batch), key))
  assert_bitwise_equal(first, second)
  assert_bitwise_equal(s.trained, before)
  _, other_metrics = s.step_fn(s.trained, s.batch, jax.random.key(43))
  assert float(other_metrics["loss"]) != float(first[1]["loss"])


def test_train_step_metrics(step_setup):
  s = step_setup
  state, metrics = jax.device_get(s.step_fn(s.trained, s.batch, jax.random.key(0)))
  assert set(metrics) == {"loss", "grad_norm", "param_norm", "lr"}
  for name, value in metrics.items():
    assert value.shape == () and value.dtype == np.float32, name
    assert np.isfinite(value), name
  assert int(state.step) == int(s.trained.step) + 1
  assert float(metrics["param_norm"]) == pytest.approx(global_norm64(state.params), rel=1e-5)
  assert float(metrics["loss"]) > 0 and float(metrics["grad_norm"]) > 0


def mixed_tree(seed, scale=1.0):
  """A tree of float32 leaves of several shapes, like a network's parameters or gradients."""
  np_rng = np.random.default_rng(seed)
  shapes = {"conv": (3, 3, 4, 5), "bias": (5,), "dense": (7, 3), "scalar": ()}
  return {k: jnp.asarray(scale * np_rng.normal(size=v), jnp.float32) for k, v in shapes.items()}


def test_global_norm_and_its_flat_copy():
  """The norm of all leaves together, as float64 arithmetic gives it; the copy read back from
  the flat vector is the tree itself, bit for bit, and an empty tree has norm 0."""
  tree = mixed_tree(0)
  copy, norm = jax.jit(optim.flat_copy_and_norm)(tree)
  assert_bitwise_equal(copy, tree)
  assert norm.dtype == jnp.float32
  assert float(norm) == pytest.approx(global_norm64(tree), rel=1e-6)
  assert float(optim.global_norm(tree)) == float(norm)
  assert float(optim.global_norm({})) == 0.0


@pytest.mark.parametrize("scale", [0.01, 10.0])  # global norm below / above the threshold
def test_clip_by_global_norm_equals_optax(scale):
  """Same state and same clipped gradients as optax's, whether it computes the norm itself or is
  handed it; the whole optimizer of the config accepts the norm with or without clipping."""
  import optax

  grads, params = mixed_tree(1, scale), mixed_tree(2)
  ours, theirs = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  state = ours.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(theirs.init(params))
  expected, _ = theirs.update(grads, theirs.init(params))
  for kwargs in ({}, {"grad_norm": optim.global_norm(grads)}):
    clipped, new_state = ours.update(grads, state, params, **kwargs)
    assert new_state == state
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
  if scale < 1:
    assert_bitwise_equal(clipped, grads)  # below the threshold: untouched
  else:
    assert global_norm64(clipped) == pytest.approx(1.0, rel=1e-6)
  for clip in (1.0, 0.0):
    config = ml_collections.ConfigDict(
      {"learning_rate": 1e-3, "warmup_steps": 0, "num_steps": 10, "cooldown_steps": 0}
    )
    config.update(adam_b1=0.9, adam_b2=0.99, adam_eps=1e-8, grad_clip=clip)
    tx = optim.make_optimizer(config)
    opt_state = tx.init(params)
    with_norm = tx.update(grads, opt_state, params, grad_norm=optim.global_norm(grads))
    without = tx.update(grads, opt_state, params)
    assert_bitwise_equal(with_norm, without)


@pytest.mark.parametrize("step", [0, 1, 2, 5])
def test_learning_rate_follows_the_linear_warmup(step_setup, step):
  s = step_setup
  state = s.trained.replace(step=np.int32(step))
  _, metrics = s.step_fn(state, s.batch, jax.random.key(0))
  expected = warmup_lr(s.config.train, step)
  assert float(metrics["lr"]) == pytest.approx(expected, rel=1e-6, abs=0.0)
  assert float(optim.learning_rate_schedule(s.config.train)(jnp.int32(step))) == pytest.approx(
    expected
  )


def test_learning_rate_cooldown_reaches_zero_at_num_steps():
  config = ml_collections.ConfigDict(
    {"learning_rate": 1e-3, "warmup_steps": 10, "num_steps": 100, "cooldown_steps": 40}
  )
  schedule = optim.learning_rate_schedule(config)
  # Warm-up, plateau, then a straight line from (60, lr) to (100, 0).
  expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 59: 1e-3, 60: 1e-3, 70: 7.5e-4, 99: 2.5e-5, 100: 0.0}
  for step, lr in expected.items():
    assert float(schedule(jnp.int32(step))) == pytest.approx(lr, rel=1e-6, abs=1e-12), step
  # Without a cool-down the rate stays constant after the warm-up, whatever num_steps is.
  config.cooldown_steps = 0
  assert float(optim.learning_rate_schedule(config)(jnp.int32(99))) == pytest.approx(1e-3)


def test_first_step_has_zero_learning_rate(step_setup):
  s = step_setup
  state, metrics = jax.device_get(s.step_fn(s.fresh, s.batch, jax.random.key(0)))
  assert float(metrics["lr"]) == 0.0
  assert float(metrics["grad_norm"]) > 0
  assert_bitwise_equal(state.params, s.fresh.params)
  assert not trees_equal(state.opt_state, s.fresh.opt_state)  # the Adam moments did move


@pytest.mark.parametrize("start", ["fresh", "trained", "late"])
def test_ema_is_the_warmed_up_incremental_update(step_setup, start):
  s = step_setup
  if start == "fresh":
    # EMA params start equal to params; scale them so that the update is visible even though
    # the first step (learning rate 0) leaves the params unchanged.
    state = s.fresh.replace(ema_params=jax.tree.map(lambda x: x * 0.5, s.fresh.params))
  elif start == "trained":
    state = s.trained
  else:
    state = s.trained.replace(step=np.int32(100_000))
  step = int(state.step)
  decay = min(s.config.train.ema_decay, (1 + step) / (10 + step))
  assert decay == {"fresh": 0.1, "trained": 4 / 13, "late": s.config.train.ema_decay}[start]

  new_state, _ = jax.device_get(s.step_fn(state, s.batch, jax.random.key(0)))
  for old_ema, new_params, new_ema in zip(
    jax.tree.leaves(state.ema_params),
    jax.tree.leaves(new_state.params),
    jax.tree.leaves(new_state.ema_params),
    strict=True,
  ):
    expected = decay * np.float64(old_ema) + (1 - decay) * np.float64(new_params)
    np.testing.assert_allclose(new_ema, expected, rtol=2e-6, atol=1e-7)
  assert not trees_equal(new_state.ema_params, new_state.params)


def test_loss_uses_the_documented_per_example_keys(step_setup):
  """loss = mean_j simple_loss(x0_j, loss_key_j) with the model's dropout from dropout_key_j,
  (loss_key_j, dropout_key_j) = split(fold_in(fold_in(train_key, step), j)): the network on the
  whole batch gives each example the loss it has alone."""
  s = step_setup
  batch_size = s.batch["image"].shape[0]

  def expected_loss(*args):
    return s.expected_loss(*args)["v"]

  train_key = rng.stream_key(7, rng.TRAIN)
  # Perturbed parameters: after a few steps the zero-initialised last layers are still nearly
  # zero, which would hide the dropout masks (and so the dropout keys) from the loss; against
  # the v target (of unit scale at every noise level) the network's output must be large too.
  noise = np.random.default_rng(1)
  params = jax.tree.map(
    lambda x: x + 0.3 * noise.standard_normal(x.shape).astype(x.dtype), s.trained.params
  )
  state = s.trained.replace(params=params)
  step_key = jax.random.fold_in(train_key, int(state.step))
  pairs = [jax.random.split(jax.random.fold_in(step_key, j)) for j in range(batch_size)]
  loss_keys = jnp.stack([p[0] for p in pairs])
  dropout_keys = jnp.stack([p[1] for p in pairs])

  _, metrics = s.step_fn(state, s.batch, train_key)
  loss = float(metrics["loss"])
  expected = float(expected_loss(state.params, s.batch["image"], loss_keys, dropout_keys))
  assert loss == pytest.approx(expected, rel=1e-5)
  # The comparison is sensitive to the derivation: other dropout keys or keys of other example
  # indices give other losses.
  swapped = float(expected_loss(state.params, s.batch["image"], loss_keys, loss_keys))
  assert swapped != pytest.approx(expected, rel=1e-3)
  shifted = float(expected_loss(state.params, s.batch["image"], loss_keys[::-1], dropout_keys))
  assert shifted != pytest.approx(expected, rel=1e-3)


def test_train_step_without_dropout_uses_the_same_per_example_keys(reference):
  """Without dropout the model runs once on the whole batch; the loss is the same formula."""
  run = run_lib.make_run(reference.config)
  assert not step_lib._uses_dropout(run.model)
  assert run.diffusion.prediction == "v"
  # The step training uses (the reference run's program).
  step_fn = step_lib.compile_train_step(run)
  # Random last layers: a freshly initialised U-Net outputs zeros, whatever t and noise it sees.
  params = random_params(run, scale=0.1)
  state = step_lib.TrainState(
    step=jnp.int32(4),
    params=copy_tree(params),
    ema_params=copy_tree(params),
    opt_state=run.tx.init(params),
  )
  batch = {"image": np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)}
  train_key = rng.stream_key(5, rng.TRAIN)
  step_key = jax.random.fold_in(train_key, 4)

  @jax.jit
  def per_example_losses(params, image, loss_keys):
    x0 = image.astype(jnp.float32) / 127.5 - 1.0
    denoise_fn = lambda x_t, t: run.model.apply({"params": params}, x_t, t, train=False)
    losses = [
      diffusion.simple_loss(run.schedule, denoise_fn, x0[j : j + 1], key, prediction="v")[0]
      for j, key in enumerate(loss_keys)
    ]
    return jnp.stack(losses)

  def expected(order):
    loss_keys = jnp.stack([jax.random.split(jax.random.fold_in(step_key, k))[0] for k in order])
    return float(jnp.mean(per_example_losses(params, batch["image"], loss_keys)))

  expected_in_order, expected_reversed = expected([0, 1, 2, 3]), expected([3, 2, 1, 0])
  _, metrics = step_fn(state, batch, train_key)
  assert float(metrics["loss"]) == pytest.approx(expected_in_order, rel=1e-5)
  assert float(metrics["loss"]) != pytest.approx(expected_reversed, rel=1e-3)


def test_train_step_loss_follows_the_configured_prediction(step_setup):
  """With prediction="v" the step's loss is L_simple against v, for the same per-example keys."""
  s = step_setup
  assert s.config.diffusion.prediction == "v"
  train_key = rng.stream_key(3, rng.TRAIN)
  state = s.trained
  step_key = jax.random.fold_in(train_key, int(state.step))
  batch_size = s.batch["image"].shape[0]
  pairs = [jax.random.split(jax.random.fold_in(step_key, j)) for j in range(batch_size)]
  loss_keys = jnp.stack([p[0] for p in pairs])
  dropout_keys = jnp.stack([p[1] for p in pairs])

  expected = s.expected_loss(state.params, s.batch["image"], loss_keys, dropout_keys)

  _, metrics = s.step_fn(state, s.batch, train_key)
  assert float(metrics["loss"]) == pytest.approx(float(expected["v"]), rel=1e-5)
  assert float(metrics["loss"]) != pytest.approx(float(expected["eps"]), rel=1e-2)


# ---------------------------------------------------------------- sampling from a checkpoint


@pytest.fixture(scope="module")
def sample_workdir(reference, tmp_path_factory):
  """A copy of the reference run's checkpoints, for the sample mode to write into."""
  workdir = tmp_path_factory.mktemp("sample")
  shutil.copytree(os.path.join(reference.workdir, "checkpoints"), workdir / "checkpoints")
  return str(workdir)


@pytest.fixture(scope="module")
def seed0_samples(reference, sample_workdir):
  png, npz, samples = sample_mode.sample_from_checkpoint(reference.config, sample_workdir)
  return types.SimpleNamespace(png=png, npz=npz, samples=samples, npz_data=read_npz(npz))


def test_sample_from_checkpoint_writes_png_and_npz(reference, sample_workdir, seed0_samples):
  out = seed0_samples
  name = os.path.join(sample_workdir, "samples", "samples_0000006_seed0")
  assert os.path.abspath(out.png) == name + ".png"
  assert os.path.abspath(out.npz) == name + ".npz"
  num_samples = reference.config.sample.num_samples
  assert out.samples.dtype == np.uint8 and out.samples.shape == (num_samples, 8, 8, 3)
  np.testing.assert_array_equal(out.npz_data, out.samples)
  np.testing.assert_array_equal(read_png(out.png), images.make_grid(images.upscale(out.samples)))
  # Distinct noise per sample gives distinct images.
  assert len({s.tobytes() for s in out.samples}) == num_samples


def test_sample_seed_controls_the_samples(reference, sample_workdir, seed0_samples, tiny_config):
  _, again_npz, _ = sample_mode.sample_from_checkpoint(reference.config, sample_workdir)
  np.testing.assert_array_equal(read_npz(again_npz), seed0_samples.npz_data)

  _, npz, samples = sample_mode.sample_from_checkpoint(
    tiny_config({"sample.seed": 1, "sample.save_images": True}), sample_workdir
  )
  assert os.path.basename(npz) == "samples_0000006_seed1.npz"
  # sample.save_images: one PNG per image, at its own size, beside the grid.
  folder = os.path.join(sample_workdir, "samples", "samples_0000006_seed1")
  assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(len(samples))]
  for i, sample in enumerate(samples):
    np.testing.assert_array_equal(read_png(os.path.join(folder, f"{i:06d}.png")), sample)
  assert samples.shape == seed0_samples.samples.shape
  for a, b in zip(samples, seed0_samples.samples, strict=True):
    assert not np.array_equal(a, b)


def test_samples_do_not_depend_on_the_batch_size(sample_workdir, seed0_samples, tiny_config):
  # Two calls of 2 images, the second cut to 1: image i depends only on its index.
  config = tiny_config({"sample.batch_size": 2, "sample.num_samples": 3})
  _, _, samples = sample_mode.sample_from_checkpoint(config, sample_workdir)
  expected = seed0_samples.samples[:3]
  assert samples.shape == expected.shape
  diff = np.abs(samples.astype(np.int16) - expected.astype(np.int16))
  # Equal up to float rounding at a pixel-level boundary.
  assert diff.max() <= 1 and np.mean(diff > 0) < 0.01


def test_sample_from_an_empty_workdir_is_a_config_error(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match="--workdir=.*no checkpoint") as excinfo:
    sample_mode.sample_from_checkpoint(tiny_config(), str(tmp_path))
  assert "\n" not in str(excinfo.value)


# ---------------------------------------------------------------- non-finite loss


def test_non_finite_metrics_stop_training_and_keep_the_checkpoint(reference, tiny_config, tmp_path):
  shutil.copytree(
    os.path.join(reference.workdir, "checkpoints", "3"), tmp_path / "checkpoints" / "3"
  )
  # Step 4 (from the step-3 checkpoint) takes an Adam step of size ~1e30: the new parameters
  # overflow float32 in their norm, and the loss of every later step is not finite.
  config = tiny_config({"train.learning_rate": 1e30})
  with pytest.raises(FloatingPointError, match=r"non-finite .* at step 4\b"):
    train.train_and_evaluate(config, str(tmp_path))

  assert saved_steps(tmp_path) == [3]
  kept = load_state(reference.config, str(tmp_path))
  assert_bitwise_equal(kept, load_state(reference.config, reference.workdir, step=3))
  assert not [r for r in read_metrics(tmp_path) if r["step"] >= 4]

  # The kept checkpoint is good: training on with a sane config gives the reference run.
  train.train_and_evaluate(reference.config, str(tmp_path))
  assert_bitwise_equal(
    load_state(reference.config, str(tmp_path)), load_state(reference.config, reference.workdir)
  )


# ---------------------------------------------------------------- interruptions and corruption

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")


def start_worker(signal_name, step, wait_for, workdir, overrides, env):
  """main.py --config=shapes with `overrides`, sent `signal_name` in the middle of `step`."""
  flags = [f"--config.{name}={value!r}" for name, value in overrides.items()]
  command = [sys.executable, WORKER, signal_name, str(step), wait_for, "--config=shapes"]
  return subprocess.Popen(
    [*command, f"--workdir={workdir}", *flags],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def finish(process):
  stdout, stderr = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def last_record_per_step(workdir):
  """metrics.jsonl as {step: record}; a step logged again after a restart keeps its last record."""
  return {r["step"]: r for r in read_metrics(workdir)}


@pytest.fixture(scope="module")
def interrupted(reference, tmp_path_factory, tiny_overrides, fast_compile_env):
  """The reference config through main.py, stopped once, then trained on to the end.

  kill: SIGKILL in step 5, once the checkpoint of step 3 is on disk. term: SIGTERM in step 4
  (not a checkpoint step). Both start together; then each is resumed with the same config.
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env = {**env, "JAX_PLATFORMS": "cpu", **fast_compile_env}
  root = tmp_path_factory.mktemp("interrupted")
  kill, term = str(root / "kill"), str(root / "term")
  first = {
    "kill": start_worker(
      "SIGKILL", 5, os.path.join(kill, "checkpoints", "3"), kill, tiny_overrides, env
    ),
    "term": start_worker("SIGTERM", 4, "-", term, tiny_overrides, env),
  }
  first = {name: finish(process) for name, process in first.items()}
  after_stop = {
    name: types.SimpleNamespace(steps=saved_steps(w), metrics=read_metrics(w))
    for name, w in (("kill", kill), ("term", term))
  }
  # The restarts run the same config in this process (what main.py calls): an exception fails
  # the fixture.
  for workdir in (kill, term):
    train.train_and_evaluate(reference.config, workdir)
  return types.SimpleNamespace(
    workdirs={"kill": kill, "term": term}, first=first, after_stop=after_stop
  )


def assert_same_final_run(reference, workdir):
  expected = load_state(reference.config, reference.workdir)
  actual = load_state(reference.config, workdir)
  assert int(actual.step) == int(expected.step) == reference.config.train.num_steps
  assert_bitwise_equal(actual.params, expected.params)
  assert_bitwise_equal(actual.ema_params, expected.ema_params)
  assert_bitwise_equal(actual.opt_state, expected.opt_state)
  assert saved_steps(workdir)[-1] == reference.config.train.num_steps
  assert last_record_per_step(workdir) == last_record_per_step(reference.workdir)


def test_sigkill_after_a_checkpoint_loses_only_the_later_steps(reference, interrupted):
  killed = interrupted.first["kill"]
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  # Steps 1..4 were logged, only step 3 was saved: the restart redoes steps 4..6.
  assert interrupted.after_stop["kill"].steps == [3]
  assert [r["step"] for r in interrupted.after_stop["kill"].metrics] == [1, 2, 3, 4]
  records = read_metrics(interrupted.workdirs["kill"])
  assert [r["step"] for r in records] == [1, 2, 3, 4, 4, 5, 6]
  # Bitwise the uninterrupted run, and step 4 logs the same values both times.
  assert records[3] == records[4]
  assert_same_final_run(reference, interrupted.workdirs["kill"])


def test_sigterm_saves_the_current_step_and_exits_cleanly(reference, interrupted):
  stopped = interrupted.first["term"]
  assert stopped.returncode == 0, stopped.stderr
  assert "Traceback" not in stopped.stderr
  message = "stopped by SIGTERM at step 4; checkpoint saved; run the same command to resume"
  assert stopped.stderr.strip().splitlines()[-1] == message
  assert interrupted.after_stop["term"].steps == [3, 4]
  assert [r["step"] for r in interrupted.after_stop["term"].metrics] == [1, 2, 3, 4]
  # The step-4 checkpoint holds the state of the uninterrupted run after 4 steps: resuming from
  # it logs steps 5 and 6 only and ends bitwise at the reference.
  records = read_metrics(interrupted.workdirs["term"])
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert_same_final_run(reference, interrupted.workdirs["term"])


def test_stop_on_signals_sets_a_flag_and_restores_the_handlers():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be set in the main thread")
  received = []
  original = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with interrupts.stop_on_signals() as stop:
      assert stop.signal_name is None
      signal.raise_signal(signal.SIGINT)
      # Only the flag: the previous handler did not run.
      assert stop.signal_name == "SIGINT" and received == []
      # A second signal while the stop is pending goes to the previous handler (Ctrl-C twice).
      signal.raise_signal(signal.SIGINT)
      assert received == [signal.SIGINT]
    assert stop.signal_name == "SIGINT"
    assert {s: signal.getsignal(s) for s in before} == before
  finally:
    signal.signal(signal.SIGINT, original)


def break_truncate_the_largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def break_remove_the_metadata(step_dir):
  # The run's own metadata (data position and config); Orbax's _CHECKPOINT_METADATA is optional.
  os.remove(os.path.join(step_dir, "meta", "metadata"))


@pytest.mark.parametrize(
  "damage", [break_truncate_the_largest_file, break_remove_the_metadata], ids=["truncated", "meta"]
)
def test_a_broken_latest_checkpoint_falls_back_to_the_previous_one(
  reference, tmp_path, caplog, damage
):
  shutil.copytree(os.path.join(reference.workdir, "checkpoints"), tmp_path / "checkpoints")
  damage(str(tmp_path / "checkpoints" / "6"))
  with caplog.at_level("WARNING"):
    state = load_state(reference.config, str(tmp_path))
  assert "checkpoint at step 6 is damaged" in caplog.text
  assert_bitwise_equal(state, load_state(reference.config, reference.workdir, step=3))
  # Training resumes from step 3 (the same fallback) and writes a good step 6 over the broken one.
  train.train_and_evaluate(reference.config, str(tmp_path))
  assert [r["step"] for r in read_metrics(tmp_path)] == [4, 5, 6]
  assert_bitwise_equal(
    load_state(reference.config, str(tmp_path)), load_state(reference.config, reference.workdir)
  )


def test_load_rebuilds_a_run_from_its_directory(reference):
  """The Python API of the README: a run directory alone gives the network, the trained state
  and samples from any sampler."""
  run, state = run_lib.load(reference.workdir)
  assert_bitwise_equal(state, load_state(reference.config, reference.workdir))
  assert run.model.config == run_lib.make_run(reference.config).model.config
  sample_fn = run.sample_fn(sampler="ddim", num_steps=3)
  samples = generate.generate(sample_fn, state.ema_params, jax.random.key(0), 3, 4)
  assert samples.shape == (3, 8, 8, 3) and samples.dtype == np.uint8
  with pytest.raises(ConfigError, match="config.json does not exist"):
    run_lib.load(os.path.join(reference.workdir, "nothing_here"))
