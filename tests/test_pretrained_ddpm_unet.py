"""diffusers' UNet2DModel (DDPM's published U-Nets) read by `diffusion_jax.pretrained`: diffusers'
numbers, both attention namings, the way back, google/ddpm-cifar10-32's config as the project's
CIFAR-10 network, and one-line errors for folders that do not fit.

The fixture (tests/fixtures/diffusers_ddpm_unet, written by its make_fixture.py with torch and
diffusers) is a DDPM pipeline folder with a tiny random UNet2DModel, and diffusers' outputs on
fixed inputs; no torch here.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax.traverse_util import flatten_dict

from configs import cifar10
from diffusion_jax.models import UNetConfig, unet_config_from
from diffusion_jax.models.attention import AttnBlock
from diffusion_jax.models.fast import FastPaths
from diffusion_jax.models.unet import CIFAR10_NUM_PARAMS
from diffusion_jax.pretrained import (
  DDPM,
  WeightsError,
  inference_timesteps,
  load_pretrained,
  read_safetensors,
)
from diffusion_jax.pretrained.ddpm_unet import (
  ddpm_unet_config_from_diffusers,
  ddpm_unet_state_dict,
  ddpm_unet_weight_map,
  load_ddpm_unet,
  save_ddpm_unet,
)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "diffusers_ddpm_unet"
PIPELINE = FIXTURE / "pipeline"
UNET = PIPELINE / "unet"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# google/ddpm-cifar10-32's unet/config.json (diffusers 0.0.4, as published).
DDPM_CIFAR10_32 = {
  "_class_name": "UNet2DModel",
  "_diffusers_version": "0.0.4",
  "act_fn": "silu",
  "attention_head_dim": None,
  "block_out_channels": [128, 256, 256, 256],
  "center_input_sample": False,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
  "downsample_padding": 0,
  "flip_sin_to_cos": False,
  "freq_shift": 1,
  "in_channels": 3,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-06,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 32,
  "time_embedding_type": "positional",
  "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

pytestmark = pytest.mark.usefixtures("fast_compile")
# The original's computation (the fast paths match it: test_fast_paths.py), which compiles faster.
REFERENCE_PATHS = dict(fast=FastPaths(group_norm="reference"), subpixel_upsample=False)


@pytest.fixture(scope="module")
def loaded():
  return load_ddpm_unet(str(PIPELINE), **REFERENCE_PATHS)


@pytest.fixture(scope="module")
def tensors():
  return safetensors.numpy.load_file(UNET / WEIGHTS)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def eps_fn(loaded):
  model, params, _ = loaded
  return jax.jit(lambda x, t: model.apply({"params": params}, x, t))


def _assert_same_params(a, b):
  a, b = flatten_dict(a), flatten_dict(b)
  assert sorted(a) == sorted(b)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(path))


def _relative_error(ours, theirs) -> float:
  return float(np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs))


def _write_folder(folder: pathlib.Path, tensors: dict, config_edits=None, name=WEIGHTS):
  folder.mkdir(parents=True, exist_ok=True)
  config = json.loads((UNET / "config.json").read_text())
  config.update(config_edits or {})
  (folder / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, folder / name)
  return str(folder)


def test_output_matches_diffusers(loaded, eps_fn, reference):
  model, _, image_size = loaded
  assert image_size == 16
  assert model.config == UNetConfig(
    channels=4,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    num_heads=1,
    dropout=0.0,
    num_groups=2,
    **REFERENCE_PATHS,
  )
  for name, t in (("eps", reference["t"]), ("eps_frac", reference["t_frac"])):
    ours = eps_fn(reference["x"], t.astype(np.float32))
    # Measured: 6.7e-7 and 8.0e-7 (5.0e-7 and 5.5e-7 with the default paths and XLA's usual
    # optimizations; |eps| up to 3.6); diffusers' own float32 output is 3.8e-7 and 4.4e-7 from
    # its float64 one.
    assert _relative_error(ours, reference[name]) <= 1e-4, name
    assert _relative_error(ours, reference[f"{name}_f64"]) <= 1e-4, name


def test_attention_head_dim_gives_heads(tmp_path, loaded, tensors, reference):
  folder = _write_folder(tmp_path / "unet", tensors, {"attention_head_dim": 4})
  model, params, _ = load_ddpm_unet(folder, **REFERENCE_PATHS)
  assert model.config == dataclasses.replace(loaded[0].config, num_heads=2)
  block = AttnBlock(model.config.num_heads, model.config.num_groups)
  ours = jax.jit(block.apply)({"params": params["mid_attn_1"]}, reference["attn_x"])
  # Measured: 3.6e-8.
  assert _relative_error(ours, reference["attn_heads"]) <= 1e-4


def test_ddim_pipeline_output_is_reproduced(reference):
  # DDIMPipeline (eta 0, clip_sample) from the same x_T: `load_pretrained`'s DDPM on diffusers'
  # own timestep grid, x̂0 clipped and ε̂ kept as diffusers' DDIMScheduler does.
  pipe = load_pretrained(str(PIPELINE), **REFERENCE_PATHS)
  assert isinstance(pipe, DDPM) and pipe.image_size == 16
  np.testing.assert_array_equal(inference_timesteps(pipe.scheduler, 4), reference["ddim_timesteps"])
  x = pipe.sample(2, sampler="ddim", num_steps=4, init_noise=reference["ddim_noise"][0],
                  return_float=True)  # fmt: skip
  images = np.clip(x / 2 + 0.5, 0.0, 1.0)
  # Measured: 4.4e-6 (x0 = (x - sqrt(1 - a) eps) / sqrt(a) magnifies eps' rounding 7x at t=750).
  np.testing.assert_allclose(images, reference["ddim_images"], rtol=0, atol=5e-5)
  uint8 = pipe.sample(2, sampler="ddim", num_steps=4, init_noise=reference["ddim_noise"][0])
  np.testing.assert_array_equal(uint8, np.round(images * 255).astype(np.uint8))


def test_old_attention_names_give_the_same_params(tmp_path, loaded, tensors):
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in tensors.items():
    for new_name, old_name in renames.items():
      key = key.replace(f".{new_name}.", f".{old_name}.")
    old[key] = value
  assert "mid_block.attentions.0.proj_attn.weight" in old
  assert "up_blocks.1.attentions.1.query.bias" in old
  _, params, _ = load_ddpm_unet(_write_folder(tmp_path / "unet", old))
  _assert_same_params(params, loaded[1])
  legacy = ddpm_unet_state_dict(params, loaded[0].config, naming="diffusers_legacy")
  assert sorted(legacy) == sorted(old)


def test_export_is_the_inverse_of_import(tmp_path, loaded, tensors):
  model, params, image_size = loaded
  save_ddpm_unet(str(tmp_path / "out"), model.config, params, image_size)
  written = read_safetensors(str(tmp_path / "out" / WEIGHTS))
  assert sorted(written) == sorted(tensors)
  for key, value in tensors.items():  # diffusers' own file, bit for bit
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  original = json.loads((UNET / "config.json").read_text())
  assert config == {k: original[k] for k in config}  # make_fixture.py --check-export: diffusers
  again = load_ddpm_unet(str(tmp_path / "out"), **REFERENCE_PATHS)
  assert again[0].config == model.config and again[2] == image_size
  _assert_same_params(again[1], params)


def test_the_unet_folder_and_options(loaded):
  model, params, _ = load_ddpm_unet(str(UNET), dtype="bfloat16", dropout=0.1, conv="xla")
  assert model.config == dataclasses.replace(
    loaded[0].config,
    dtype="bfloat16",
    dropout=0.1,
    conv="xla",
    fast=FastPaths(),
    subpixel_upsample=True,
  )
  _assert_same_params(params, loaded[1])
  with pytest.raises(TypeError, match="unexpected options"):
    load_ddpm_unet(str(UNET), channels=8)


def test_ddpm_cifar10_32_is_the_projects_cifar10_network():
  config, image_size = ddpm_unet_config_from_diffusers(DDPM_CIFAR10_32, dropout=0.1)
  project = cifar10.get_config()
  assert config == unet_config_from(project.model)
  assert image_size == project.data.image_size == 32
  rows = ddpm_unet_weight_map(config, image_size)  # shapes by jax.eval_shape: no arrays
  assert sum(int(np.prod(shape)) for _, _, shape in rows) == CIFAR10_NUM_PARAMS
  names = {name: shape for name, _, shape in rows}
  assert len(names) == len(rows)
  assert names["down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
  assert names["down_blocks.1.attentions.1.to_q.weight"] == (256, 256)
  assert names["up_blocks.2.attentions.2.to_out.0.weight"] == (256, 256)
  assert names["up_blocks.3.resnets.0.conv1.weight"] == (128, 384, 3, 3)
  assert "down_blocks.3.downsamplers.0.conv.weight" not in names
  assert names["time_embedding.linear_1.weight"] == (512, 128)


def test_ddpm_256_configs_place_attention_at_16():
  config, image_size = ddpm_unet_config_from_diffusers(
    {
      **DDPM_CIFAR10_32,
      "block_out_channels": [128, 128, 256, 256, 512, 512],
      "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
      "sample_size": 256,
    }
  )
  assert image_size == 256
  assert (config.channels, config.channel_mult, config.attn_resolutions) == (
    128,
    (1, 1, 2, 2, 4, 4),
    (16,),
  )


def _drop(t):
  return {k: v for k, v in t.items() if k != "mid_block.attentions.0.to_k.bias"}


def _extra(t):
  return {**t, "down_blocks.0.attentions.0.to_q.weight": np.zeros((4, 4), np.float32)}


def _reshape(t):
  return {**t, "down_blocks.1.resnets.0.conv_shortcut.weight": np.zeros((8, 4, 3, 3), np.float32)}


# (how to break the fixture folder, words the one-line message must hold)
BROKEN = {
  "missing tensor": (dict(tensors=_drop), ["missing tensor 'mid_block.attentions.0.to_k.bias'"]),
  "unexpected tensor": (
    dict(tensors=_extra),
    ["unexpected tensor 'down_blocks.0.attentions.0.to_q.weight'"],
  ),
  "wrong shape": (
    dict(tensors=_reshape),
    ["has shape (8, 4, 3, 3)", "implies (8, 4, 1, 1)", "config.json"],
  ),
  "block type": (
    dict(config={"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}),
    ["down_block_types[1]='CrossAttnDownBlock2D' is not supported"],
  ),
  "attention levels": (
    dict(config={"up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]}),
    ["up_block_types[2]='AttnUpBlock2D'", "down_block_types[0]='DownBlock2D'"],
  ),
  "class": (
    dict(config={"_class_name": "UNet2DConditionModel"}),
    ["_class_name='UNet2DConditionModel' is not supported"],
  ),
  "padding": (dict(config={"downsample_padding": 1}), ["downsample_padding=1 is not supported"]),
  "default": (
    dict(drop="flip_sin_to_cos"),
    ["flip_sin_to_cos=True (diffusers' default: the field is absent) is not supported"],
  ),
  "sample size": (dict(config={"sample_size": None}), ["sample_size=None is not supported"]),
  "heads": (dict(config={"attention_head_dim": 3}), ["attention_head_dim=3 is not supported"]),
  "no config": (dict(remove="config.json"), ["config.json: no such file"]),
  "no weights": (dict(remove=WEIGHTS), [f"{WEIGHTS}: no such file"]),
  "pickle only": (
    dict(rename=(WEIGHTS, "diffusion_pytorch_model.bin")),
    ["diffusion_pytorch_model.bin: a PyTorch pickle", "convert it to .safetensors"],
  ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_folder_that_does_not_fit_is_one_line_naming_it(tmp_path, tensors, case):
  how, words = BROKEN[case]
  folder = tmp_path / "unet"
  _write_folder(folder, how.get("tensors", dict)(tensors), how.get("config"))
  if "drop" in how:
    config = json.loads((folder / "config.json").read_text())
    del config[how["drop"]]
    (folder / "config.json").write_text(json.dumps(config))
  if "remove" in how:
    os.remove(folder / how["remove"])
  if "rename" in how:
    shutil.move(folder / how["rename"][0], folder / how["rename"][1])
  with pytest.raises(WeightsError) as info:
    load_ddpm_unet(str(folder))
  message = str(info.value)
  assert "\n" not in message and all(w in message for w in words), message


def test_a_missing_folder_is_named(tmp_path):
  with pytest.raises(WeightsError, match="no such folder"):
    load_ddpm_unet(str(tmp_path / "nowhere"))
