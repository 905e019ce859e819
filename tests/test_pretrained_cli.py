"""Published weights from the command line: `--config=ddpm_pretrained` and
`--config=stable_diffusion` with `--config.pretrained=DIR --mode=sample`, and their one-line
errors."""

import pathlib
import runpy
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.experiment import pretrained_mode
from diffusion_jax.pretrained import load_pretrained
from diffusion_jax.runtime.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DDPM = FIXTURES / "diffusers_ddpm_unet" / "pipeline"
SD1 = FIXTURES / "sd_pipelines" / "sd1"


def _main(*args, env=None):
  return subprocess.run(
    [sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
    env=env,
  )  # fmt: skip


@pytest.fixture
def env(fast_compile_env):
  import os

  return {**os.environ, **fast_compile_env}


def test_ddpm_samples_do_not_depend_on_the_batch_size(tmp_path, env):
  result = _main(
    "--config=ddpm_pretrained",
    f"--config.pretrained={DDPM}",
    "--mode=sample",
    "--config.sample.sampler=ddim",
    "--config.sample.num_steps=3",
    "--config.sample.num_samples=4",
    "--config.sample.batch_size=2",
    f"--workdir={tmp_path}",
    env=env,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  npz = tmp_path / "samples" / "pretrained_seed0.npz"
  assert f"wrote 4 samples: {tmp_path / 'samples' / 'pretrained_seed0.png'}" in result.stdout
  with np.load(npz) as f:
    images = f[next(iter(f.files))]
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
  # Image i comes from fold_in(key(seed), i): two batches of 2 are one batch of 4.
  pipe = load_pretrained(str(DDPM))
  np.testing.assert_array_equal(images, pipe.sample(4, sampler="ddim", num_steps=3, seed=0))


def test_stable_diffusion_paints_into_a_picture(tmp_path, env):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(tmp_path / "photo.png")
  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 4:12] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  result = _main(
    "--config=stable_diffusion",
    f"--config.pretrained={SD1}",
    "--mode=sample",
    "--config.sample.prompt=a red circle",
    "--config.sample.negative_prompt=blurry",
    "--config.sample.num_steps=2",
    "--config.sample.num_samples=2",
    "--config.sample.batch_size=2",
    f"--config.sample.init_image={tmp_path / 'photo.png'}",
    f"--config.sample.mask={tmp_path / 'mask.png'}",
    "--config.sample.strength=0.5",
    f"--workdir={tmp_path / 'run'}",
    env=env,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  with np.load(tmp_path / "run" / "samples" / "pretrained_seed0_w7.5.npz") as f:
    assert f["prompts"].tolist() == ["a red circle"]
    assert f["guidance_scale"] == np.float32(7.5)
    images = [f[name] for name in f.files if f[name].dtype == np.uint8][0]
  assert images.shape == (2, 16, 16, 3)
  assert not np.array_equal(images[0], images[1])  # two draws of the masked region


def test_a_wrong_pretrained_path_is_a_one_line_error(tmp_path):
  result = _main(
    "--config=stable_diffusion", "--config.pretrained=/nonexistent", "--mode=sample",
    f"--workdir={tmp_path}",
  )  # fmt: skip
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last == "error: config.pretrained: /nonexistent: no such file or folder"
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
  ("name", "overrides", "message"),
  [
    ("stable_diffusion", {"pretrained": str(SD1)}, "needs a prompt"),
    ("stable_diffusion", {}, "config.pretrained is not set"),
    ("ddpm_pretrained", {"pretrained": str(DDPM), "sample.prompt": "x"}, "takes no prompt"),
    (
      "stable_diffusion",
      {"pretrained": str(SD1), "sample.prompt": "x", "sample.init_image": "/nonexistent.png"},
      "is not a readable picture",
    ),
    (
      "stable_diffusion",
      {"pretrained": str(SD1), "sample.prompt": "x", "sample.mask": "/nonexistent.png"},
      "sample.mask needs sample.init_image",
    ),
  ],
)
def test_bad_pretrained_sampling_settings_are_named(tmp_path, name, overrides, message):
  config = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()
  for field, value in overrides.items():
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
  with pytest.raises(ConfigError, match=message):
    pretrained_mode.sample(config, str(tmp_path))
