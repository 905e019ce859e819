"""Fine-tuning Stable Diffusion through the project's trainer
(configs/stable_diffusion_finetune.py): published weights in, a resumable run, a diffusers
folder out.

The pipeline is the sd1 fixture (tests/fixtures/sd_pipelines) with a smaller random U-Net written
by `save_unet`, which keeps the compiled train step small; that diffusers reads such folders with
the project's numbers is checked by tests/fixtures/sd_pipelines/check_export.py.
"""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image
from run_files import load_state

from configs import stable_diffusion_finetune
from diffusion_jax.experiment import finetune, pretrained_mode, train
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.models import LatentUNet, LatentUNetConfig
from diffusion_jax.pretrained import load_pretrained, save_unet
from diffusion_jax.runtime.errors import ConfigError

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_pipelines"
CAPTIONS = ["a red circle", "a blue square", "a red square", "a blue circle"]

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("published") / "sd"
  shutil.copytree(FIXTURE / "sd1", folder)
  shutil.rmtree(folder / "unet")
  config = LatentUNetConfig(
    block_channels=(8, 8),
    cross_attention=(True, False),
    layers_per_block=1,
    num_heads=(2, 2),
    transformer_layers=(1, 1),
    context_dim=24,
    num_groups=4,
  )
  x, t, context = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 24))
  shapes = jax.eval_shape(LatentUNet(config).init, jax.random.key(0), x, t, context)["params"]
  # Random values from NumPy: compiling the network's initializers would take seconds.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  save_unet(str(folder / "unet"), config, params, False, 8)
  return folder


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("captioned")
  rng = np.random.default_rng(0)
  rows = []
  for i, caption in enumerate(CAPTIONS):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(folder / f"{i}.png")
    rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
  (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
  return folder


def _config(published, captioned, num_steps: int):
  config = stable_diffusion_finetune.get_config()
  config.pretrained = str(published)
  config.data.path = str(captioned)
  config.data.image_size = 16
  config.train.batch_size = 2
  config.train.num_steps = num_steps
  config.train.checkpoint_every = 100
  config.train.progress = False
  return config


def test_fine_tuning_resumes_exactly_and_exports_a_diffusers_folder(tmp_path, published, captioned):
  five = _config(published, captioned, 5)
  five.train.checkpoint_every = 3
  train.train_and_evaluate(five, str(tmp_path / "straight"))
  # A run stopped after 3 steps is its step-3 checkpoint; resumed, it trains on to 5.
  shutil.copytree(
    tmp_path / "straight" / "checkpoints" / "3", tmp_path / "parts" / "checkpoints" / "3"
  )
  metrics = train.train_and_evaluate(five, str(tmp_path / "parts"))
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  a = load_state(five, str(tmp_path / "straight"))
  b = load_state(five, str(tmp_path / "parts"))
  assert int(a.step) == int(b.step) == 5
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)

  # Only the U-Net trains: it moved from the published weights.
  start = load_pretrained(str(published)).params
  moved = jax.tree.map(lambda p, q: np.abs(np.asarray(p) - q).max(), a.params, start["unet"])
  assert max(jax.tree.leaves(moved)) > 0

  params, step = finetune.latest_unet(five, str(tmp_path / "parts"))
  assert step == 5
  folder = pretrained_mode.export(five, str(tmp_path / "parts"), params, step)
  assert sorted(os.listdir(folder)) == [
    "model_index.json",
    "scheduler",
    "text_encoder",
    "tokenizer",
    "unet",
    "vae",
  ]
  exported = load_pretrained(folder)
  ours, theirs = flatten_dict(exported.params["unet"]), flatten_dict(jax.device_get(b.ema_params))
  assert sorted(ours) == sorted(theirs)
  for key in ours:  # export then re-import is bitwise
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg="/".join(key))
  for part in ("vae", "text"):  # the frozen parts as published
    for x, y in zip(
      jax.tree.leaves(exported.params[part]), jax.tree.leaves(start[part]), strict=True
    ):
      np.testing.assert_array_equal(x, y)
  published_unet = json.loads((published / "unet" / "config.json").read_text())
  exported_unet = json.loads((pathlib.Path(folder) / "unet" / "config.json").read_text())
  for field, value in exported_unet.items():
    assert published_unet[field] == value, field


def test_a_folder_without_captions_is_a_one_line_error(tmp_path, published):
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "0.png")
  with pytest.raises(Exception, match="fine-tuning reads captions"):
    train.train_and_evaluate(_config(published, tmp_path, 1), str(tmp_path / "run"))


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("pretrained", "/nonexistent/sd", "config.pretrained: /nonexistent/sd: no such"),
    ("train.num_grid_samples", 4, "train.num_grid_samples must be 0"),
    ("data.image_size", 18, "data.image_size=18 must be a multiple of 4"),
  ],
)
def test_bad_fine_tuning_settings_are_named(published, captioned, field, value, message):
  config = _config(published, captioned, 1)
  section, _, key = field.rpartition(".")
  (config[section] if section else config)[key] = value
  with pytest.raises(ConfigError, match=message):
    run_lib.make_run(config)
