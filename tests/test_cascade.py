"""Tests of the cascade (`experiment/cascade.py`): stages listed by a config, each run in turn on
the output of the one before, with per-stage settings, and outputs that depend only on (seed, i)."""

import os

import numpy as np
import pytest
from run_files import write_run

from configs import shapes_cascade
from diffusion_jax.experiment import cascade, sample_mode, saved_config, train
from diffusion_jax.runtime.errors import ConfigError

# The base: the tiny class-conditional setup at 8x8; the upsampler: 8x8 -> 16x16, unconditional.
BASE = {"model.num_classes": 12}
UPSAMPLER = {"data.image_size": 16, "model.low_res_size": 8}


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory, tiny_config):
  root = tmp_path_factory.mktemp("cascade")
  base, upsampler = str(root / "base"), str(root / "upsampler")
  write_run(tiny_config(BASE), base)
  write_run(tiny_config(UPSAMPLER), upsampler)
  return base, upsampler


def _cascade_config(stage_dirs, **sample):
  config = shapes_cascade.get_config()
  config.cascade.configs = ""
  config.cascade.workdirs = ",".join(stage_dirs)
  config.cascade.samplers = "ddim,ddim"
  config.cascade.num_steps = "3,2"
  config.cascade.guidance_scales = "2,"
  config.cascade.aug_levels = ",0.2"
  config.train.progress = False
  for name, value in sample.items():
    config.sample[name] = value
  return config


def test_cascade_output_depends_only_on_seed_and_index(stage_dirs, tmp_path):
  prompts = {"prompt": "red circle"}
  config = _cascade_config(stage_dirs, num_samples=4, **prompts)
  config.cascade.batch_sizes = "4,4"
  first = cascade.sample(config, str(tmp_path / "in_fours"))
  assert [s[2].shape for s in first] == [(4, 8, 8, 3), (4, 16, 16, 3)]
  # Other batch sizes per stage, and fewer images: the same images (to a unit of rounding).
  fewer = _cascade_config(stage_dirs, num_samples=3, **prompts)
  fewer.cascade.batch_sizes = "2,2"
  second = cascade.sample(fewer, str(tmp_path / "in_twos"))
  for (_, _, a), (_, _, b) in zip(first, second, strict=True):
    assert np.abs(a[:3].astype(int) - b.astype(int)).max() <= 1
  # The files: each stage's grid and npz; the upsampler's npz keeps its inputs, the base's images.
  png, npz, images = first[1]
  assert os.path.basename(npz) == "cascade_seed0_stage1.npz" and os.path.isfile(png)
  with np.load(npz) as f:
    np.testing.assert_array_equal(f["samples"], images)
    np.testing.assert_array_equal(f["low_res"], first[0][2])
    assert list(f["prompts"]) == ["red circle"] and float(f["guidance_scale"]) == 1.0
  with np.load(first[0][1]) as f:
    assert float(f["guidance_scale"]) == 2.0
  # Stage 0 is what --mode=sample of the base run draws with the same settings.
  base = saved_config.load(stage_dirs[0])
  base.sample.update(
    sampler="ddim", num_steps=3, guidance_scale=2.0, prompt="red circle", num_samples=4
  )
  base.train.progress = False
  drawn, _ = sample_mode.draw(base, stage_dirs[0], 4)
  np.testing.assert_array_equal(drawn, first[0][2])
  # Another sample seed draws other images.
  other = _cascade_config(stage_dirs, num_samples=4, seed=1, **prompts)
  assert not np.array_equal(cascade.sample(other, str(tmp_path / "seed1"))[1][2], images)


def test_per_stage_settings_and_size_checks(stage_dirs, tiny_config, tmp_path):
  config = _cascade_config(stage_dirs)
  base, upsampler = cascade.stages(config, str(tmp_path))
  assert (base.config.sample.sampler, base.config.sample.num_steps) == ("ddim", 3)
  assert base.config.sample.guidance_scale == 2.0 and upsampler.config.sr.aug_level == 0.2
  assert upsampler.config.sample.guidance_scale == tiny_config().sample.guidance_scale
  config.cascade.workdirs = ",".join(reversed(stage_dirs))
  with pytest.raises(ConfigError, match="stage 0 .* is a super-resolution model"):
    cascade.stages(config, str(tmp_path))
  config.cascade.workdirs = ",".join([stage_dirs[0], stage_dirs[0]])
  with pytest.raises(ConfigError, match="stage 1 .* is no super-resolution model"):
    cascade.stages(config, str(tmp_path))
  config = _cascade_config(stage_dirs)
  config.cascade.num_steps = "3"
  with pytest.raises(ConfigError, match="cascade.num_steps='3' has 1 items for a cascade of 2"):
    cascade.stages(config, str(tmp_path))
  config.cascade.num_steps = "3,many"
  with pytest.raises(ConfigError, match="cascade.num_steps: 'many' is not a valid int"):
    cascade.stages(config, str(tmp_path))


def test_a_stage_without_a_run(stage_dirs, tmp_path):
  config = _cascade_config(stage_dirs)
  config.cascade.workdirs = f"{stage_dirs[0]},{tmp_path / 'missing'}"
  with pytest.raises(ConfigError, match="stage 1: .*missing holds no run"):
    cascade.stages(config, str(tmp_path))
  # Named by its config, it has settings but no checkpoint yet.
  config.cascade.configs = "shapes,shapes_sr"
  config.cascade.workdirs = ""
  stages = cascade.stages(config, str(tmp_path))
  assert [s.workdir for s in stages] == [str(tmp_path / "shapes"), str(tmp_path / "shapes_sr")]
  with pytest.raises(ConfigError, match="cascade stage 0: .*no checkpoint"):
    cascade.sample(config, str(tmp_path))


def test_training_trains_each_stage_in_its_directory(monkeypatch, tmp_path):
  trained = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: trained.append((c, w)))
  cascade.train_stages(shapes_cascade.get_config(), str(tmp_path))
  assert [w for _, w in trained] == [str(tmp_path / "shapes_text"), str(tmp_path / "shapes_sr")]
  assert [c.model.low_res_size for c, _ in trained] == [0, 16]
  # The cascade's per-stage sampling settings go with each stage's config.
  assert [c.sample.guidance_scale for c, _ in trained] == [3.0, 1.0]
