"""diffusers' scheduler configs read by `diffusion_jax.pretrained.scheduler`: diffusers' ᾱ and
inference timesteps exactly, the prediction types in the project's names, and one-line errors.

The fixture (tests/fixtures/diffusers_scheduler, written by its make_fixture.py with torch and
diffusers) holds five published-style configs and diffusers' numbers for them; no torch here.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from diffusion_jax.core.schedules import Schedule
from diffusion_jax.pretrained import WeightsError, inference_timesteps, load_scheduler
from diffusion_jax.pretrained import scheduler as diffusers_scheduler

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "diffusers_scheduler"
NAMES = ("sd15_pndm", "sd2_v_trailing", "ddpm_cifar10", "cosine_x0", "trained_euler")


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE / "reference.npz") as f:
    return dict(f)


@pytest.mark.parametrize("name", NAMES)
def test_alphas_cumprod_match_diffusers(name, reference):
  config = load_scheduler(str(FIXTURE / name))
  # diffusers' own code in float64: equal to float64 rounding.
  np.testing.assert_allclose(
    config.alphas_cumprod, reference[f"{name}/alphas_cumprod_f64"], rtol=0, atol=1e-12
  )
  schedule = diffusers_scheduler.schedule(config)
  assert isinstance(schedule, Schedule) and schedule.num_timesteps == config.num_train_timesteps
  assert schedule.alphas_cumprod.dtype == np.float32
  # diffusers' float32 tensor: equal to float32 rounding (its cumprod's, ~5e-7 at most).
  np.testing.assert_allclose(
    np.asarray(schedule.alphas_cumprod), reference[f"{name}/alphas_cumprod"], rtol=0, atol=1e-6
  )
  np.testing.assert_allclose(np.asarray(schedule.betas), config.betas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [50, 20])
def test_inference_timesteps_match_diffusers(name, steps, reference):
  timesteps = inference_timesteps(load_scheduler(str(FIXTURE / name)), steps)
  expected = reference[f"{name}/timesteps_{steps}"]
  assert timesteps.dtype == np.int64
  np.testing.assert_array_equal(timesteps, expected)
  assert np.all(np.diff(timesteps) < 0)


def test_fields_and_prediction_names():
  sd15 = load_scheduler(str(FIXTURE / "sd15_pndm"))
  assert (sd15.class_name, sd15.prediction, sd15.steps_offset) == ("PNDMScheduler", "eps", 1)
  assert (sd15.timestep_spacing, sd15.clip_sample) == ("leading", False)  # PNDM's defaults
  sd2 = load_scheduler(str(FIXTURE / "sd2_v_trailing"))
  assert (sd2.prediction, sd2.timestep_spacing) == ("v", "trailing")
  cosine = load_scheduler(str(FIXTURE / "cosine_x0"))
  assert (cosine.prediction, cosine.clip_sample, cosine.clip_sample_range) == ("x0", True, 2.0)
  ddpm = load_scheduler(str(FIXTURE / "ddpm_cifar10"))
  assert (ddpm.prediction, ddpm.timestep_spacing, ddpm.steps_offset) == ("eps", "leading", 0)
  assert load_scheduler(str(FIXTURE / "trained_euler")).num_train_timesteps == 100


def test_pipeline_root_and_file(tmp_path):
  shutil.copytree(FIXTURE / "sd2_v_trailing", tmp_path / "scheduler")
  from_root = load_scheduler(str(tmp_path))
  from_file = load_scheduler(str(tmp_path / "scheduler" / "scheduler_config.json"))
  np.testing.assert_array_equal(from_root.betas, from_file.betas)
  assert from_root.prediction == "v"


def _write(tmp_path, **changes):
  config = json.loads((FIXTURE / "sd15_pndm" / "scheduler_config.json").read_text())
  config.update(changes)
  (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
  return str(tmp_path)


@pytest.mark.parametrize(
  "changes, words",
  [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"_class_name": "UniPCMultistepScheduler"}, "_class_name='UniPCMultistepScheduler'"),
    ({"prediction_type": "flow"}, "prediction_type='flow'"),
    ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
  ],
)
def test_unsupported_is_one_line(tmp_path, changes, words):
  with pytest.raises(WeightsError) as info:
    load_scheduler(_write(tmp_path, **changes))
  assert words in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_one_line(tmp_path):
  with pytest.raises(WeightsError, match="no scheduler_config.json") as info:
    load_scheduler(str(tmp_path))
  assert "\n" not in str(info.value)


def test_steps_out_of_range():
  config = load_scheduler(str(FIXTURE / "sd15_pndm"))
  with pytest.raises(ValueError, match="num_steps"):
    inference_timesteps(config, 1001)
  with pytest.raises(ValueError, match="steps_offset"):
    inference_timesteps(config, 1000)  # leading + offset 1 would reach t = 1000
