"""Tests of --mode=sds (`experiment/sds_mode.py`): score distillation against a tiny prior run,
its outputs, exact resumption, reproducibility and its one-line errors."""

import os

import numpy as np
import pytest
from run_files import write_run

from configs import shapes_sds
from diffusion_jax.experiment import sds_mode
from diffusion_jax.runtime.errors import ConfigError


@pytest.fixture(scope="module")
def prior(tmp_path_factory, tiny_config):
  workdir = str(tmp_path_factory.mktemp("prior") / "run")
  write_run(tiny_config(text=True), workdir)  # a text-conditional prior at 8x8
  return workdir


def _config(prior, **sds):
  config = shapes_sds.get_config()
  config.sds.prior_workdir = prior
  config.sds.num_steps = 4
  config.sds.batch_size = 2
  config.sds.grid_size = 6
  config.sds.num_ray_samples = 6
  config.sds.num_views = 4
  config.sds.log_every = 1
  config.sds.checkpoint_every = 2
  config.train.progress = False
  for name, value in sds.items():
    config.sds[name] = value
  return config


def _views(workdir):
  with np.load(os.path.join(workdir, "sds", "views.npz")) as f:
    return f["views"]


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_sds_writes_its_views_and_resumes_exactly(prior, tmp_path, mode):
  config = _config(prior, mode=mode)
  straight = str(tmp_path / "straight")
  paths = sds_mode.run_sds(config, straight)
  views = _views(straight)
  assert views.shape == (4, 8, 8, 3) and views.dtype == np.uint8
  for name in ("png", "gif", "plot"):
    assert os.path.isfile(paths[name]), name
  with open(os.path.join(straight, "sds", "metrics.jsonl")) as f:
    assert len(f.readlines()) == 4
  # The parameters moved: the views are not the starting ones.
  assert len(np.unique(views)) > 1
  if mode == "3d":  # a scene: the views of the ring differ (resuming is the same code as 2d's)
    assert not np.array_equal(views[0], views[1])
    return
  assert all(np.array_equal(v, views[0]) for v in views)  # one image, seen from every view
  # Stopped after 2 steps (its checkpoint at step 2), then resumed: the same views, bitwise.
  parts = str(tmp_path / "parts")
  sds_mode.run_sds(_config(prior, mode=mode, num_steps=2), parts)
  sds_mode.run_sds(config, parts)
  np.testing.assert_array_equal(_views(parts), views)


def test_another_seed_draws_other_noise(prior, tmp_path):
  first, second = _config(prior, mode="2d", num_steps=2), _config(prior, mode="2d", num_steps=2)
  second.seed = 1
  sds_mode.run_sds(first, str(tmp_path / "seed0"))
  sds_mode.run_sds(second, str(tmp_path / "seed1"))
  assert not np.array_equal(_views(str(tmp_path / "seed0")), _views(str(tmp_path / "seed1")))


def test_the_ring_goes_round_the_object():
  settings = sds_mode.read_settings(_config("unused"))
  azimuth, elevation, distance = (np.asarray(c) for c in sds_mode.ring_cameras(settings))
  np.testing.assert_allclose(azimuth, [0, 90, 180, 270])
  np.testing.assert_allclose(elevation, 10.0)
  np.testing.assert_allclose(distance, 3.25)


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("mode", "4d", "sds.mode='4d' is unknown; valid: 3d, 2d"),
    ("num_steps", 0, "sds.num_steps=0 must be a positive integer"),
    ("t_max", 1.5, "need 0 <= t_min <= t_max <= 1"),
    ("shading", "phong", "sds.shading='phong'"),
  ],
)
def test_bad_settings_are_one_line_errors(field, value, message):
  with pytest.raises(ConfigError, match=message):
    sds_mode.read_settings(_config("unused", **{field: value}))


def test_the_prior_must_exist_and_be_conditional(tmp_path, tiny_config):
  with pytest.raises(ConfigError, match="holds no trained run"):
    sds_mode.run_sds(_config(str(tmp_path / "missing")), str(tmp_path / "out"))
  unconditional = str(tmp_path / "unconditional")
  write_run(tiny_config(), unconditional)
  with pytest.raises(ConfigError, match="text- or class-conditional"):
    sds_mode.run_sds(_config(unconditional), str(tmp_path / "out"))
