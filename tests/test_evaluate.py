"""Tests of training with the improved-DDPM options (learned variance, hybrid loss, importance
sampling of t) and of --mode=eval, the bits/dim of a checkpoint."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_files import load_state, read_metrics

from diffusion_jax import data
from diffusion_jax.core import likelihood, rng
from diffusion_jax.experiment import eval_mode, train
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime.errors import ConfigError

pytestmark = pytest.mark.usefixtures("fast_compile")

IDDPM = {
  "diffusion.variance": "learned_range",
  "model.out_channels": 6,
  "diffusion.loss": "hybrid",
  "diffusion.t_sampling": "importance",
  "eval.num_examples": 5,
  "eval.batch_size": 4,
  "eval.timesteps_per_call": 5,
}


@pytest.fixture(scope="module")
def iddpm_run(tiny_config, tmp_path_factory):
  """6 steps with the hybrid loss and importance sampling, and the same run in two calls."""
  config = tiny_config(IDDPM)
  workdir = str(tmp_path_factory.mktemp("iddpm"))
  train.train_and_evaluate(config, workdir)
  resumed = str(tmp_path_factory.mktemp("iddpm_resumed"))
  train.train_and_evaluate(tiny_config({**IDDPM, "train.num_steps": 3}), resumed)
  train.train_and_evaluate(config, resumed)
  return types.SimpleNamespace(config=config, workdir=workdir, resumed=resumed)


def test_hybrid_training_logs_its_terms_and_resumes_exactly(iddpm_run):
  records = read_metrics(iddpm_run.workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for r in records:
    assert all(np.isfinite(r[name]) for name in ("loss", "mse", "vlb"))
    # Uniform t until every t has 10 recorded losses: weights are 1 and loss = mse + λ T L_t.
    assert r["loss"] == pytest.approx(r["mse"] + 0.001 * 20 * r["vlb"], rel=1e-4)
  state = load_state(iddpm_run.config, iddpm_run.workdir)
  # The loss history of importance sampling is part of the state: 6 steps of 4 examples.
  assert int(np.sum(state.t_history.counts)) == 24
  again = load_state(iddpm_run.config, iddpm_run.resumed)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  assert read_metrics(iddpm_run.resumed) == records


def test_eval_matches_the_bound_computed_directly(iddpm_run, tiny_config):
  config = iddpm_run.config
  result, path = eval_mode.evaluate(config, iddpm_run.workdir)
  with open(path) as f:
    assert json.load(f) == result
  assert os.path.basename(path) == "bits_per_dim_0000006.json"
  assert (result["step"], result["split"], result["num_examples"]) == (6, "test", 5)
  # Directly: the first 5 held-out images, keys fold_in(eval key, i), one call.
  source = eval_mode._eval_source(config)
  images = np.stack([source[i]["image"] for i in range(5)])
  key = rng.stream_key(config.eval.seed, rng.EVAL)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(5, dtype=jnp.uint32))
  run = run_lib.make_run(config)
  params = load_state(config, iddpm_run.workdir).ema_params
  out = likelihood.bits_per_dim(
    run.schedule,
    lambda x_t, t: run.model.apply({"params": params}, x_t, t, train=False),
    data.normalize_images(images),
    keys,
    variance="learned_range",
    prediction=config.diffusion.prediction,
    clip_x0=True,
  )
  for name in eval_mode.FIGURES:
    assert result[name] == pytest.approx(float(np.mean(out[name])), rel=1e-5), name
  assert result["bits_per_dim"] == pytest.approx(
    result["prior"] + result["decoder"] + result["kl"], rel=1e-6
  )
  se = np.std(np.asarray(out["bits_per_dim"], np.float64), ddof=1) / np.sqrt(5)
  assert result["bits_per_dim_stderr"] == pytest.approx(se, rel=1e-4)
  # Another batch size (5 images in 3 calls, the last one padded) gives the same figure.
  small = tiny_config({**IDDPM, "eval.batch_size": 2, "eval.timesteps_per_call": 1})
  other, _ = eval_mode.evaluate(small, iddpm_run.workdir)
  assert other["bits_per_dim"] == pytest.approx(result["bits_per_dim"], rel=1e-5)


def test_the_shapes_test_split_is_another_set(tiny_config):
  config = tiny_config()
  train_set = data.make_source(config.data)
  config.data.split = "test"
  test_set = data.make_source(config.data)
  train_images = {train_set[i]["image"].tobytes() for i in range(len(train_set))}
  assert not any(test_set[i]["image"].tobytes() in train_images for i in range(len(test_set)))
  config.data.split = "validation"
  with pytest.raises(ConfigError, match="data.split='validation'.*valid: train, test"):
    data.make_source(config.data)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"diffusion.variance": "learned_range"}, "model.out_channels=3 does not fit .* set it to 6"),
    ({"model.out_channels": 6}, "model.out_channels=6 does not fit .* set it to 3"),
    ({"diffusion.loss": "hybrid"}, "learned_range"),
    ({"diffusion.loss": "l1"}, "diffusion.loss='l1'"),
    ({"diffusion.t_sampling": "sorted"}, "diffusion.t_sampling='sorted' is unknown"),
  ],
)
def test_bad_iddpm_settings_are_one_line_errors(tiny_config, overrides, message):
  with pytest.raises(ConfigError, match=message) as excinfo:
    run_lib.make_run(tiny_config(overrides))
  assert "\n" not in str(excinfo.value)


def test_eval_rejects_a_bad_timesteps_per_call(iddpm_run, tiny_config):
  with pytest.raises(ConfigError, match="eval.timesteps_per_call=3 must divide"):
    eval_mode.evaluate(tiny_config({**IDDPM, "eval.timesteps_per_call": 3}), iddpm_run.workdir)
