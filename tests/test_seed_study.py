"""Tests of seed studies: K seeds trained in one vmapped program against K single-seed runs, their
separate run directories and summary, resuming, bad seed lists, and sampling seed studies."""

import json
import os
import shutil
import types

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from run_files import load_state, read_metrics, trees_equal

from diffusion_jax.core import rng
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import sample_mode, studies, train
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime.errors import ConfigError

pytestmark = pytest.mark.usefixtures("fast_compile")

SEEDS = (0, 1, 2)
# Params of a seed trained in the vmapped program differ from its single run only by float
# rounding (XLA orders the reductions of the batched matmuls differently): about 1e-6 measured.
PARAM_ATOL = 1e-5
LOSS_RTOL = 1e-5


def max_abs_diff(first, second):
  pairs = zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)


@pytest.fixture(scope="module")
def study(tiny_config, tmp_path_factory):
  """A 3-seed study of the tiny setup and the three single-seed runs it must reproduce."""
  root = tmp_path_factory.mktemp("study")
  config = tiny_config({"seeds": ",".join(map(str, SEEDS)), "train.seed_batching": "vmap"})
  last = train.train_and_evaluate(config, str(root / "study"))
  singles = {}
  for seed in SEEDS:
    workdir = str(root / f"single_{seed}")
    train.train_and_evaluate(tiny_config({"seed": seed}), workdir)
    singles[seed] = workdir
  return types.SimpleNamespace(
    config=config, workdir=str(root / "study"), last=last, singles=singles
  )


def test_each_seed_of_the_study_equals_its_single_run(study, tiny_config):
  fresh = {}
  run = run_lib.make_run(tiny_config())
  # One program for every seed's initial state (the seed only enters through the key).
  init = jax.jit(lambda key: step_lib.init_state(run.model, run.tx, run.image_shape, key))
  for seed in SEEDS:
    config = tiny_config({"seed": seed})
    member = studies.member_workdir(study.workdir, seed)
    got, want = load_state(config, member), load_state(config, study.singles[seed])
    assert int(got.step) == int(want.step) == config.train.num_steps
    assert max_abs_diff(got.params, want.params) < PARAM_ATOL
    assert max_abs_diff(got.ema_params, want.ema_params) < PARAM_ATOL
    assert max_abs_diff(got.opt_state, want.opt_state) < PARAM_ATOL
    got_losses = [r["loss"] for r in read_metrics(member)]
    want_losses = [r["loss"] for r in read_metrics(study.singles[seed])]
    assert len(got_losses) == config.train.num_steps
    np.testing.assert_allclose(got_losses, want_losses, rtol=LOSS_RTOL)
    assert study.last[seed]["loss"] == pytest.approx(want_losses[-1], rel=LOSS_RTOL)
    fresh[seed] = jax.device_get(init(rng.stream_key(seed, rng.INIT)))
    # Training moved the params far more than the tolerance, so a wrong step would show.
    assert max_abs_diff(got.params, fresh[seed].params) > 100 * PARAM_ATOL
  # The seeds are different models (different init, data order and noise).
  assert max_abs_diff(fresh[0].params, fresh[1].params) > 100 * PARAM_ATOL


def test_study_layout_and_summary(study):
  config = study.config
  for seed in SEEDS:
    member = studies.member_workdir(study.workdir, seed)
    with open(os.path.join(member, "config.json")) as f:
      member_config = json.load(f)
    assert member_config["seed"] == seed and member_config["seeds"] == ""
    assert sorted(os.listdir(os.path.join(member, "checkpoints"))) == ["3", "6"]
    for step in (3, 6):
      for ext in ("png", "npz"):
        assert os.path.exists(
          os.path.join(member, "samples", f"step_{step:07d}_dpm_solver++_20steps.{ext}")
        )
  with open(os.path.join(study.workdir, "config.json")) as f:
    assert json.load(f)["seeds"] == "0,1,2"
  with open(os.path.join(study.workdir, "seed_summary.json")) as f:
    summary = json.load(f)
  assert summary["seeds"] == list(SEEDS)
  for row in summary["per_seed"]:
    metrics = read_metrics(studies.member_workdir(study.workdir, row["seed"]))
    assert row["final_loss"] == pytest.approx(metrics[-1]["loss"])
    assert set(row) == {"seed", "final_loss", "tail_loss", "swd", "pixel_mean"}
    assert row["swd"] > 0
  for name, across in summary["across_seeds"].items():
    values = [row[name] for row in summary["per_seed"]]
    assert across["mean"] == pytest.approx(np.mean(values))
    assert across["std"] == pytest.approx(np.std(values, ddof=1))
    assert across["ci95_low"] < across["mean"] < across["ci95_high"]
  with open(os.path.join(study.workdir, "seed_summary.md")) as f:
    table = f.read()
  assert table.count("\n") == 2 + len(SEEDS) + 3
  # The summary's figures come from the files alone: recomputing them gives the same JSON.
  train.write_study_summary(config, study.workdir)
  with open(os.path.join(study.workdir, "seed_summary.json")) as f:
    assert json.load(f) == summary


DROPOUT_SEEDS = (3, 4)


@pytest.fixture(scope="module")
def dropout_steps(tiny_config):
  """Two single steps with dropout of seeds 3 and 4 from their initial states, on batches of
  random pixels: the states and losses a seed study's step must reproduce."""
  config = tiny_config({"model.dropout": 0.1, "train.warmup_steps": 0})
  run = run_lib.make_run(config)
  init = jax.jit(lambda key: step_lib.init_state(run.model, run.tx, run.image_shape, key))
  keys = [rng.stream_key(s, rng.TRAIN) for s in DROPOUT_SEEDS]
  rows = np.random.default_rng(0).integers(0, 256, (2, 2, 4, 8, 8, 3), dtype=np.uint8)
  single = step_lib.compile_train_step(run)
  expected = []
  for i, seed in enumerate(DROPOUT_SEEDS):
    state, losses = init(rng.stream_key(seed, rng.INIT)), []
    for step in range(2):
      state, metrics = single(
        state, parallel.put_batch({"image": rows[step, i]}, run.mesh), keys[i]
      )
      losses.append(float(metrics["loss"]))
    expected.append((jax.device_get(state), losses))
  # Dropout is on: without it the same steps give other params (the dropped activations feed
  # the weight gradients of the layers after them).
  no_dropout = step_lib.compile_train_step(run_lib.make_run(tiny_config({"train.warmup_steps": 0})))
  state = init(rng.stream_key(DROPOUT_SEEDS[0], rng.INIT))
  for step in range(2):
    batch = parallel.put_batch({"image": rows[step, 0]}, run.mesh)
    state, _ = no_dropout(state, batch, keys[0])
  without_dropout = jax.device_get(state)
  return types.SimpleNamespace(
    config=config,
    init=init,
    keys=keys,
    rows=rows,
    expected=expected,
    without_dropout=without_dropout,
  )


@pytest.mark.parametrize("seed_batching", ["vmap", "unroll"])
def test_seed_study_step_with_dropout_matches_single_steps(dropout_steps, seed_batching):
  d = dropout_steps
  config = ml_collections.ConfigDict(d.config.to_dict())
  config.train.seed_batching = seed_batching
  run = run_lib.make_run(config)
  stacked = step_lib.compile_train_step(run, num_seeds=len(DROPOUT_SEEDS))
  state = train._stack(*[d.init(rng.stream_key(s, rng.INIT)) for s in DROPOUT_SEEDS])
  losses = []
  for step in range(2):
    batch = parallel.put_batch({"image": d.rows[step]}, run.mesh, axis=1)
    state, metrics = stacked(state, batch, jnp.stack(d.keys))
    losses.append(np.asarray(metrics["loss"]))
  state = jax.device_get(state)
  assert np.shape(metrics["param_norm"]) == (len(DROPOUT_SEEDS),)
  for i in range(len(DROPOUT_SEEDS)):
    want_state, want_losses = d.expected[i]
    got = jax.tree.map(lambda x, i=i: x[i], state)
    assert max_abs_diff(got.params, want_state.params) < PARAM_ATOL
    # param_norm, added once per call, is each seed's own.
    norm = np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(got.params)]))
    np.testing.assert_allclose(float(metrics["param_norm"][i]), norm, rtol=1e-5)
    np.testing.assert_allclose([loss[i] for loss in losses], want_losses, rtol=LOSS_RTOL)
  assert max_abs_diff(d.without_dropout.params, d.expected[0][0].params) > 10 * PARAM_ATOL


def test_study_resumes_from_the_newest_step_every_seed_has(study, tmp_path):
  """An interruption between the seeds' saves: seed 1 lacks the step-6 checkpoint."""
  workdir = str(tmp_path / "study")
  shutil.copytree(study.workdir, workdir)
  shutil.rmtree(os.path.join(studies.member_workdir(workdir, 1), "checkpoints", "6"))
  train.train_and_evaluate(study.config, workdir)
  for seed in SEEDS:
    member = studies.member_workdir(workdir, seed)
    config = studies.member_config(study.config, seed)
    want = load_state(config, studies.member_workdir(study.workdir, seed))
    assert trees_equal(load_state(config, member), want)
    # Steps 4-6 were logged twice; their second records equal the first.
    records = read_metrics(member)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    assert records[3:6] == records[6:]
  with (
    open(os.path.join(workdir, "seed_summary.json")) as f1,
    open(os.path.join(study.workdir, "seed_summary.json")) as f2,
  ):
    assert json.load(f1) == json.load(f2)


def test_adding_a_seed_to_a_started_study_is_an_error(study, tiny_config, tmp_path):
  workdir = str(tmp_path / "study")
  shutil.copytree(study.workdir, workdir)
  with pytest.raises(ConfigError, match="seed_5.* has no checkpoint") as excinfo:
    train.train_and_evaluate(tiny_config({"seeds": "0,1,2,5"}), workdir)
  assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("seeds", ["0,x", "1,1", "-1,2", "0;1"])
def test_bad_seed_lists_are_one_line_errors(tiny_config, seeds):
  for field in ("seeds", "sample.seeds"):
    with pytest.raises(ConfigError, match="distinct non-negative integers") as excinfo:
      run_lib.make_run(tiny_config({field: seeds}))
    assert "\n" not in str(excinfo.value) and field in str(excinfo.value)


def test_sampling_seed_study(study, tiny_config, tmp_path):
  workdir = str(tmp_path / "one")
  shutil.copytree(study.singles[0], workdir)
  config = tiny_config({"sample.seeds": "0,3"})
  written, (json_path, md_path) = sample_mode.sample_study(config, workdir)
  assert [os.path.basename(npz) for _, npz in written] == [
    "samples_0000006_seed0.npz",
    "samples_0000006_seed3.npz",
  ]
  sets = [np.load(npz)["samples"] for _, npz in written]
  # Each set is the one --mode=sample writes for its sample seed.
  _, _, alone = sample_mode.sample_from_checkpoint(tiny_config({"sample.seed": 3}), workdir)
  np.testing.assert_array_equal(sets[1], alone)
  # Disjoint streams: no image is shared between the sets.
  assert not {s.tobytes() for s in sets[0]} & {s.tobytes() for s in sets[1]}
  with open(json_path) as f:
    summary = json.load(f)
  assert summary["seeds"] == [0, 3] and os.path.exists(md_path)
  assert {row["seed"]: row["pixel_mean"] for row in summary["per_seed"]} == pytest.approx(
    {0: sets[0].mean() / 127.5 - 1, 3: sets[1].mean() / 127.5 - 1}
  )


def test_sampling_a_training_study_samples_every_seed(study, tiny_config, tmp_path):
  workdir = str(tmp_path / "study")
  shutil.copytree(study.workdir, workdir)
  written, (json_path, _) = sample_mode.sample_study(study.config, workdir)
  assert [os.path.dirname(os.path.dirname(npz)) for _, npz in written] == [
    studies.member_workdir(workdir, seed) for seed in SEEDS
  ]
  with open(json_path) as f:
    assert json.load(f)["seeds"] == list(SEEDS)
  with pytest.raises(ConfigError, match="not both"):
    sample_mode.sample_study(tiny_config({"seeds": "0,1,2", "sample.seeds": "0,1"}), workdir)


def test_flax_state_dict_round_trip_of_a_seed_slice(study, tiny_config):
  """A seed's slice of the stacked state is a TrainState that saves and loads like any other."""
  config = tiny_config({"seed": 1})
  state = load_state(config, studies.member_workdir(study.workdir, 1))
  stacked = train._stack(state, state)
  again = jax.device_get(train._take_seed(stacked, 1))
  assert trees_equal(
    flax.serialization.to_state_dict(again), flax.serialization.to_state_dict(state)
  )


def test_unknown_seed_batching_is_a_one_line_error(tiny_config):
  with pytest.raises(ConfigError, match="train.seed_batching='pmap' is unknown; valid: auto, vmap"):
    run_lib.make_run(tiny_config({"train.seed_batching": "pmap"}))
