"""diffusers' AutoencoderKL read by `diffusion_jax.pretrained`: the numbers of diffusers, both
namings and LDM's single file, the way back, and one-line errors for folders that do not fit.

The fixture (tests/fixtures/diffusers_vae, written by its make_fixture.py with torch and diffusers)
is a tiny random AutoencoderKL and diffusers' outputs on fixed inputs; no torch here.
"""

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
import safetensors.numpy
from flax.traverse_util import flatten_dict

from diffusion_jax.models import Autoencoder, AutoencoderConfig
from diffusion_jax.pretrained import (
  WeightsError,
  load_ldm_vae,
  load_vae,
  read_safetensors,
  save_vae,
  vae_state_dict,
)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "diffusers_vae"
VAE = FIXTURE / "vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"

sys.path.insert(0, str(FIXTURE))
import ldm_names  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
  return load_vae(str(VAE))


@pytest.fixture(scope="module")
def tensors():
  return safetensors.numpy.load_file(VAE / WEIGHTS)


def _assert_same_params(a, b):
  a, b = flatten_dict(a), flatten_dict(b)
  assert sorted(a) == sorted(b)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(path))


def test_encode_and_decode_match_diffusers(loaded):
  model, params, scaling_factor = loaded
  ref = np.load(FIXTURE / "reference.npz")
  posterior = model.apply({"params": params}, ref["images"], method=Autoencoder.encode)
  decoded = model.apply({"params": params}, ref["latents"], method=Autoencoder.decode)
  for name, ours in (("mean", posterior.mean), ("logvar", posterior.logvar), ("decoded", decoded)):
    ours, theirs = np.asarray(ours), ref[name]
    assert ours.shape == theirs.shape, name
    # Measured: mean 6e-7, logvar 4e-7, decoded 3e-6 (|decoded| up to 5.7); diffusers' own
    # float32 output is 2.3e-6 from its float64 one.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * max(1.0, np.abs(theirs).max()))
    assert np.linalg.norm(ours - theirs) <= 1e-5 * np.linalg.norm(theirs), name
  assert scaling_factor == json.loads((VAE / "config.json").read_text())["scaling_factor"]
  assert model.config == AutoencoderConfig(
    channels=4,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    z_channels=4,
    num_groups=2,
  )


def _write_folder(folder: pathlib.Path, tensors: dict, config_edits=None, name=WEIGHTS):
  folder.mkdir(parents=True, exist_ok=True)
  config = json.loads((VAE / "config.json").read_text())
  config.update(config_edits or {})
  (folder / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, folder / name)
  return str(folder)


def test_old_attention_names_give_the_same_params(tmp_path, loaded, tensors):
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in tensors.items():
    for new_name, old_name in renames.items():
      key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
    old[key] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
  _, params, _ = load_vae(_write_folder(tmp_path / "vae", old))
  _assert_same_params(params, loaded[1])


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_ldm_single_file_gives_the_same_model(tmp_path, loaded, tensors, prefix):
  state = {prefix + k: v for k, v in ldm_names.to_ldm(tensors, 3).items()}
  if prefix:  # a whole Stable Diffusion checkpoint: the other models' tensors are ignored
    state["model.diffusion_model.conv_in.weight"] = np.zeros((8, 4, 3, 3), np.float32)
  path = tmp_path / "vae.safetensors"
  safetensors.numpy.save_file(state, path)
  model, params, scaling_factor = load_ldm_vae(str(path), num_groups=2)
  assert model.config == loaded[0].config and scaling_factor == 0.18215
  _assert_same_params(params, loaded[1])


def test_export_is_the_inverse_of_import(tmp_path, loaded, tensors):
  model, params, scaling_factor = loaded
  save_vae(str(tmp_path / "out"), model.config, params, scaling_factor)
  written = read_safetensors(str(tmp_path / "out" / WEIGHTS))
  assert sorted(written) == sorted(tensors)
  for key, value in tensors.items():  # diffusers' own file, bit for bit
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  original = json.loads((VAE / "config.json").read_text())
  assert config == {k: original[k] for k in config}
  _assert_same_params(load_vae(str(tmp_path / "out"))[1], params)
  # LDM's names, as diffusers' single-file converter reads them (make_fixture.py checks it).
  ldm = vae_state_dict(params, model.config, naming="ldm")
  expected = ldm_names.to_ldm(tensors, 3)
  assert sorted(ldm) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(ldm[key], value, err_msg=key)


def test_half_precision_files_load_as_float32(tmp_path, loaded, tensors):
  half = {k: v.astype(np.float16) for k, v in tensors.items()}
  folder = _write_folder(tmp_path / "vae", half, name="diffusion_pytorch_model.fp16.safetensors")
  _, params, _ = load_vae(folder, variant="fp16")
  ours = flatten_dict(params)
  for path, value in flatten_dict(loaded[1]).items():
    assert ours[path].dtype == np.float32
    np.testing.assert_array_equal(ours[path], value.astype(np.float16).astype(np.float32))


def test_bfloat16_files_are_read(tmp_path):
  values = np.array([[1.0, -2.5], [0.15625, 3.0]], np.float32)
  bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: 8 significant bits
  header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
  path = tmp_path / "w.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + bf16.tobytes())
  np.testing.assert_array_equal(read_safetensors(str(path))["w"].astype(np.float32), values)


def _drop(t):
  return {k: v for k, v in t.items() if k != "decoder.conv_in.bias"}


def _extra(t):
  return {**t, "encoder.down_blocks.0.attentions.0.to_q.weight": np.zeros((4, 4), np.float32)}


def _reshape(t):
  return {**t, "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}


# (how to break the fixture folder, words the one-line message must hold)
BROKEN = {
  "missing tensor": (dict(tensors=_drop), ["missing tensor 'decoder.conv_in.bias'"]),
  "unexpected tensor": (
    dict(tensors=_extra),
    ["unexpected tensor 'encoder.down_blocks.0.attentions.0.to_q.weight'"],
  ),
  "wrong shape": (
    dict(tensors=_reshape),
    ["'quant_conv.weight' has shape (8, 8, 3, 3)", "implies (8, 8, 1, 1)", "config.json"],
  ),
  "block type": (
    dict(
      config={
        "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
        + ["DownEncoderBlock2D"]
      }
    ),
    ["down_block_types[1]='AttnDownEncoderBlock2D' is not supported"],
  ),
  "class": (
    dict(config={"_class_name": "AutoencoderTiny"}),
    ["_class_name='AutoencoderTiny' is not supported"],
  ),
  "setting": (dict(config={"use_quant_conv": False}), ["use_quant_conv=False is not supported"]),
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
  folder = tmp_path / "vae"
  _write_folder(folder, how.get("tensors", dict)(tensors), how.get("config"))
  if "remove" in how:
    os.remove(folder / how["remove"])
  if "rename" in how:
    shutil.move(folder / how["rename"][0], folder / how["rename"][1])
  with pytest.raises(WeightsError) as info:
    load_vae(str(folder))
  message = str(info.value)
  assert "\n" not in message and all(w in message for w in words), message


def test_a_pipeline_folder_reads_its_vae(tmp_path, loaded):
  shutil.copytree(VAE, tmp_path / "vae")
  (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
  model, params, _ = load_vae(str(tmp_path))
  assert model.config == loaded[0].config
  _assert_same_params(params, loaded[1])


def test_a_missing_folder_or_file_is_named(tmp_path):
  with pytest.raises(WeightsError, match="no such folder"):
    load_vae(str(tmp_path / "nowhere"))
  with pytest.raises(WeightsError, match="no such file"):
    load_ldm_vae(str(tmp_path / "nothing.safetensors"))
