"""transformers' CLIPTextModel read by `diffusion_jax.pretrained.clip`: the numbers of transformers
for a folder and both Stable Diffusion single-file formats, clip_skip, the way back, and one-line
errors for files that do not fit.

The fixture (tests/fixtures/clip_text, written by its make_fixture.py with torch, transformers,
diffusers and open_clip) holds tiny random encoders and transformers' outputs on fixed token ids;
no torch here.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.numpy
from flax.traverse_util import flatten_dict

from diffusion_jax.models.clip_text import ClipTextConfig
from diffusion_jax.pretrained.clip import (
  load_ldm_text_encoder,
  load_text_encoder,
  save_text_encoder,
  text_encoder_state_dict,
)
from diffusion_jax.pretrained.files import WeightsError, read_safetensors

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "clip_text"
WEIGHTS = "model.safetensors"
REF = dict(np.load(FIXTURE / "reference.npz"))
# Measured: relative L2 2.7e-7 (sd1) and 3.1e-7 (sd2) from transformers' float32 outputs, 2.3e-7
# and 2.4e-7 from its float64 ones; transformers' own float32 is 2.2e-7 / 2.6e-7 from its float64.
TOLERANCE = 1e-4


def _outputs(model, params, ids):
  """(states, pooled) and the clip_skip=1 states, run op by op: at these sizes faster than
  compiling."""
  states, pooled = model.apply({"params": params}, ids, pooled=True)
  skipped = model.apply({"params": params}, ids, clip_skip=1)
  return np.asarray(states), np.asarray(pooled), np.asarray(skipped)


def _rel(ours, theirs):
  return np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loaded(request):
  return request.param, *load_text_encoder(str(FIXTURE / request.param))


def _assert_same_params(a, b):
  a, b = flatten_dict(a), flatten_dict(b)
  assert sorted(a) == sorted(b)
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(path))


def test_outputs_match_transformers(loaded):
  name, model, params = loaded
  states, pooled, skipped = _outputs(model, params, REF[f"{name}_input_ids"])
  assert states.shape == (2, 77, 16) and pooled.shape == (2, 16)
  for key, ours in (("last_hidden_state", states), ("pooler_output", pooled)):
    assert _rel(ours, REF[f"{name}_{key}"]) < TOLERANCE, key
    assert _rel(ours, REF[f"{name}_{key}_f64"]) < TOLERANCE, key
  # diffusers' clip_skip=1: the penultimate layer through final_layer_norm.
  assert _rel(skipped, REF[f"{name}_clip_skip_1"]) < TOLERANCE
  assert _rel(skipped, states) > 1e-2


def test_configs_are_read(loaded):
  name, model, _ = loaded
  gelu = name == "sd2"
  assert model.config == ClipTextConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu" if gelu else "quick_gelu",
    eos_token_id=60 if gelu else 2,
  )


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_files_give_the_folder_models(name):
  folder_model, folder_params = load_text_encoder(str(FIXTURE / name))
  path = FIXTURE / f"{name}_single.safetensors"
  model, params = load_ldm_text_encoder(str(path), num_attention_heads=4)
  _assert_same_params(params, folder_params)
  # The published SD configs pool at the largest token id (eos_token_id=2).
  assert model.config == ClipTextConfig(**{**vars(folder_model.config), "eos_token_id": 2})
  ids = REF[f"{name}_input_ids"]
  states, pooled, _ = _outputs(model, params, ids)
  assert _rel(states, REF[f"{name}_last_hidden_state"]) < TOLERANCE
  reference = REF[f"{name}_last_hidden_state"][np.arange(2), ids.argmax(-1)]
  assert _rel(pooled, reference) < TOLERANCE


def test_clip_skip_and_length_are_checked(loaded):
  _, model, params = loaded
  with pytest.raises(ValueError, match="clip_skip=3"):
    model.apply({"params": params}, REF["sd1_input_ids"], clip_skip=3)
  with pytest.raises(ValueError, match="max_position_embeddings=77"):
    model.apply({"params": params}, np.zeros((1, 78), np.int32))


def test_export_is_the_inverse_of_import(tmp_path, loaded):
  name, model, params = loaded
  original = safetensors.numpy.load_file(FIXTURE / name / WEIGHTS)
  flat = text_encoder_state_dict(params, model.config, prefix="")
  assert sorted(flat) == sorted(original)
  for key, value in original.items():  # transformers' own file, bit for bit
    np.testing.assert_array_equal(flat[key], value, err_msg=key)
  save_text_encoder(str(tmp_path / "out"), model.config, params)
  written = read_safetensors(str(tmp_path / "out" / WEIGHTS))
  assert sorted(written) == sorted("text_model." + k for k in original)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  source = json.loads((FIXTURE / name / "config.json").read_text())
  assert config == {k: source[k] for k in config}
  again, again_params = load_text_encoder(str(tmp_path / "out"))
  assert again.config == model.config
  _assert_same_params(again_params, params)


def test_pipeline_folder_and_old_names(tmp_path, loaded):
  name, model, params = loaded
  pipeline = tmp_path / "pipeline"
  (pipeline / "text_encoder").mkdir(parents=True)
  (pipeline / "model_index.json").write_text("{}")
  shutil.copy(FIXTURE / name / "config.json", pipeline / "text_encoder")
  tensors = text_encoder_state_dict(params, model.config)
  tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  safetensors.numpy.save_file(tensors, pipeline / "text_encoder" / WEIGHTS)
  again, again_params = load_text_encoder(str(pipeline))
  assert again.config == model.config
  _assert_same_params(again_params, params)


def _folder(tmp_path, edit_tensors=None, edit_config=None) -> str:
  folder = tmp_path / "encoder"
  folder.mkdir()
  config = json.loads((FIXTURE / "sd1" / "config.json").read_text())
  config.update(edit_config or {})
  (folder / "config.json").write_text(json.dumps(config))
  tensors = safetensors.numpy.load_file(FIXTURE / "sd1" / WEIGHTS)
  (edit_tensors or (lambda t: None))(tensors)
  safetensors.numpy.save_file(tensors, folder / WEIGHTS)
  return str(folder)


def _one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(WeightsError, match=match) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value)


ERRORS = {
  "missing": (
    lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"),
    None,
    r"missing tensor 'encoder\.layers\.1\.mlp\.fc2\.bias' \(shape \(16,\)\)",
  ),
  "shape": (
    lambda t: t.update({"embeddings.token_embedding.weight": np.zeros((65, 16), np.float32)}),
    None,
    r"'embeddings\.token_embedding\.weight' has shape \(65, 16\), but .*config\.json implies "
    r"\(64, 16\)",
  ),
  "unexpected": (
    lambda t: t.update({"text_projection.weight": np.zeros((8, 16), np.float32)}),
    None,
    r"unexpected tensor 'text_projection\.weight'",
  ),
  "architecture": (
    None,
    {"architectures": ["CLIPTextModelWithProjection"]},
    r"architectures=\['CLIPTextModelWithProjection'\] is not supported",
  ),
  "activation": (None, {"hidden_act": "relu"}, r"hidden_act='relu' is not supported"),
  "heads": (None, {"num_attention_heads": 5}, r"num_attention_heads=5 does not divide"),
}


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_folder_errors_are_one_line(tmp_path, kind):
  edit_tensors, edit_config, match = ERRORS[kind]
  _one_line_error(match, load_text_encoder, _folder(tmp_path, edit_tensors, edit_config))


SD2 = "cond_stage_model.model."
SINGLE_ERRORS = {
  "missing": (
    lambda t: t.pop(SD2 + "transformer.resblocks.2.attn.in_proj_bias"),
    r"missing tensor 'cond_stage_model\.model\.transformer\.resblocks\.2\.attn\.in_proj_bias' "
    r"\(shape \(48,\)\)",
  ),
  "shape": (
    lambda t: t.update({SD2 + "transformer.resblocks.1.mlp.c_proj.weight": np.zeros((16, 36))}),
    r"'cond_stage_model\.model\.transformer\.resblocks\.1\.mlp\.c_proj\.weight' has shape "
    r"\(16, 36\), but the rest of the file implies \(16, 37\)",
  ),
  "unexpected": (
    lambda t: t.update({SD2 + "visual.proj": np.zeros((4, 4))}),
    r"unexpected tensor 'cond_stage_model\.model\.visual\.proj'",
  ),
  "no encoder": (
    lambda t: [t.pop(k) for k in list(t) if k.startswith(SD2)],
    r"no text encoder",
  ),
}


@pytest.mark.parametrize("kind", sorted(SINGLE_ERRORS))
def test_single_file_errors_are_one_line(tmp_path, kind):
  edit, match = SINGLE_ERRORS[kind]
  tensors = safetensors.numpy.load_file(FIXTURE / "sd2_single.safetensors")
  edit(tensors)
  path = tmp_path / "sd2.safetensors"
  safetensors.numpy.save_file(tensors, path)
  _one_line_error(match, load_ldm_text_encoder, str(path), num_attention_heads=4)


def test_sd1_single_file_missing_tensor(tmp_path):
  tensors = safetensors.numpy.load_file(FIXTURE / "sd1_single.safetensors")
  name = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
  tensors.pop(name)
  path = tmp_path / "sd1.safetensors"
  safetensors.numpy.save_file(tensors, path)
  _one_line_error(f"missing tensor '{name}'", load_ldm_text_encoder, str(path))
