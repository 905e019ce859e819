"""Stable Diffusion pipelines read by `load_pretrained`: every part and whole DDIM runs give
diffusers' numbers, from a pipeline folder and from an original single file.

The fixture (tests/fixtures/sd_pipelines, written by its make_fixture.py with torch, diffusers and
transformers) holds two tiny random pipelines, `sd1` (1.x style: 1x1-convolution projections,
quick-GELU, epsilon) and `sd2` (2.x style: linear projections, a head count per level, GELU,
v-prediction, pad "!"), and diffusers' outputs on fixed inputs; no torch here.
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest
import safetensors.numpy
from flax.traverse_util import flatten_dict

import diffusion_jax as dj
from diffusion_jax.pretrained import StableDiffusion, WeightsError, load_pretrained

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_pipelines"
PROMPTS = ["a red circle", "A photo of a CAT, on a mat!"]
NEGATIVE = ["blurry", ""]
RUN = dict(negative_prompts=NEGATIVE, num_steps=10, guidance_scale=7.5)
# Single files do not tell the head counts and GroupNorm groups of these tiny models.
SINGLE_FILE_OPTIONS = {
  "sd1": dict(num_heads=2, num_groups=4, text_heads=4),
  "sd2": dict(head_dim=4, num_groups=4, text_heads=4),
}

sys.path.insert(0, str(FIXTURE))
import single_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compile")


def _rel(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def style(request):
  return request.param


@pytest.fixture(scope="module")
def pipes():
  return {name: load_pretrained(str(FIXTURE / name)) for name in ("sd1", "sd2")}


@pytest.fixture(scope="module")
def reference():
  return {name: dict(np.load(FIXTURE / f"{name}_reference.npz")) for name in ("sd1", "sd2")}


def test_load_pretrained_gives_stable_diffusion_from_the_package_root(pipes):
  assert dj.load_pretrained is load_pretrained
  assert all(isinstance(pipe, StableDiffusion) for pipe in pipes.values())
  assert pipes["sd1"].scheduler.prediction == "eps"
  assert pipes["sd2"].scheduler.prediction == "v"
  assert pipes["sd2"].info["linear_projection"] and not pipes["sd1"].info["linear_projection"]


def test_prompts_encode_as_diffusers_encodes_them(pipes, reference, style):
  pipe, ref = pipes[style], reference[style]
  np.testing.assert_array_equal(pipe.tokenizer(PROMPTS), ref["ids"])
  context = pipe.encode_prompt(PROMPTS)
  assert context.shape == ref["context"].shape
  # Measured: 2.3e-7 (sd1), 3.1e-7 (sd2); diffusers' float32 is as far from its float64.
  assert _rel(context, ref["context_f64"]) < 1e-5
  assert _rel(context, ref["context"]) < 1e-5


def test_unet_output_matches_diffusers(pipes, reference, style):
  ref = reference[style]
  out = pipes[style].unet(ref["latents"], ref["t"], ref["context"])
  # Measured: 7.3e-7 (sd1), 7.5e-7 (sd2).
  assert _rel(out, ref["unet"]) < 1e-5
  assert _rel(out, ref["unet_f64"]) < 1e-5


def test_vae_encode_and_decode_match_diffusers(pipes, reference):
  pipe, ref = pipes["sd1"], reference["sd1"]
  latents = pipe.vae_encode(ref["images"])
  assert _rel(np.asarray(latents) / pipe.scaling_factor, ref["mean"]) < 1e-5
  decoded = pipe.vae_decode(ref["latents"] * pipe.scaling_factor)
  assert _rel(decoded, ref["decoded"]) < 1e-5


def test_ddim_run_with_guidance_matches_diffusers(pipes, reference, style):
  pipe, ref = pipes[style], reference[style]
  latents = pipe.sample(PROMPTS, init_latents=ref["init_noise"], return_latents=True, **RUN)
  # Measured: 1.7e-6 (sd1, epsilon), 2.1e-6 (sd2, v-prediction) after 10 guided steps.
  assert _rel(latents, ref["sample_latents"]) < 1e-4
  if style == "sd1":  # the same compiled run, decoded to uint8 as diffusers' pipeline does
    images = pipe.sample(PROMPTS, init_latents=ref["init_noise"], **RUN)
    assert images.dtype == np.uint8 and images.shape == ref["sample_images"].shape
    assert np.abs(images.astype(int) - ref["sample_images"]).max() <= 1


def test_image_to_image_matches_diffusers(pipes, reference):
  pipe, ref = pipes["sd1"], reference["sd1"]
  latents = pipe.sample(
    PROMPTS,
    init_image=ref["images"],
    strength=0.6,
    init_latents=ref["img2img_noise"],
    return_latents=True,
    **RUN,
  )
  # Measured: 1.6e-6.
  assert _rel(latents, ref["img2img_latents"]) < 1e-4


def _single_file(tmp_path, name: str) -> pathlib.Path:
  folder = FIXTURE / name
  state = {
    "unet": safetensors.numpy.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
    "vae": safetensors.numpy.load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
    "text": safetensors.numpy.load_file(folder / "text_encoder" / "model.safetensors"),
  }
  config = lambda part: json.loads((folder / part / "config.json").read_text())
  tensors = single_file.to_ldm(state, config("unet"), config("vae"), name == "sd2")
  path = tmp_path / f"{name}.safetensors"
  safetensors.numpy.save_file(tensors, path)
  return path


def test_a_single_file_loads_the_same_pipeline(tmp_path, pipes, style):
  path = _single_file(tmp_path, style)
  pipe = load_pretrained(str(path), components=str(FIXTURE / style), **SINGLE_FILE_OPTIONS[style])
  folder = pipes[style]
  assert pipe.unet_model.config == folder.unet_model.config
  assert pipe.vae_model.config == folder.vae_model.config
  assert pipe.text_model.config.num_hidden_layers == folder.text_model.config.num_hidden_layers
  a, b = flatten_dict(pipe.params), flatten_dict(folder.params)
  assert sorted(a) == sorted(b)
  for key in a:  # the same parameters: the same numbers as the folder in every check above
    np.testing.assert_array_equal(a[key], b[key], err_msg="/".join(key))


def test_wrong_paths_are_one_line_errors(tmp_path):
  with pytest.raises(WeightsError, match="no such file or folder"):
    load_pretrained(str(tmp_path / "absent"))
  with pytest.raises(WeightsError, match="no model_index.json"):
    load_pretrained(str(tmp_path))
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
  with pytest.raises(WeightsError, match="'KandinskyPipeline' is not supported"):
    load_pretrained(str(tmp_path))
  single = tmp_path / "model.safetensors"
  safetensors.numpy.save_file({"x": np.zeros(1, np.float32)}, single)
  with pytest.raises(WeightsError, match="components=FOLDER"):
    load_pretrained(str(single))
  (tmp_path / "model.ckpt").write_bytes(b"")
  with pytest.raises(WeightsError, match="not a .safetensors file"):
    load_pretrained(str(tmp_path / "model.ckpt"))


def test_a_pipeline_folder_missing_a_part_names_it(tmp_path):
  folder = tmp_path / "sd1"
  shutil.copytree(FIXTURE / "sd1", folder)
  shutil.rmtree(folder / "text_encoder")
  with pytest.raises(WeightsError, match="text_encoder"):
    load_pretrained(str(folder))


def test_bad_sampling_arguments_are_one_line_errors(pipes):
  pipe = pipes["sd1"]
  with pytest.raises(ValueError, match="multiples of 8"):
    pipe.sample(PROMPTS, height=20, width=16)
  with pytest.raises(ValueError, match="negative prompts"):
    pipe.sample(PROMPTS, negative_prompts=["x"])
  with pytest.raises(ValueError, match="init_latents has shape"):
    pipe.sample(PROMPTS, init_latents=np.zeros((2, 4, 4, 4)))
  with pytest.raises(ValueError, match="strength"):
    pipe.sample(PROMPTS, init_image=np.zeros((2, 16, 16, 3), np.uint8), strength=1.5)


def test_bfloat16_runs_every_network_near_float32(reference):
  pipe = load_pretrained(str(FIXTURE / "sd2"), dtype="bfloat16")
  ref = reference["sd2"]
  assert pipe.unet_model.config.dtype == "bfloat16"
  # Measured: 6.6e-3 (text encoder), 1.5e-2 (U-Net) from diffusers' float32 outputs.
  assert _rel(pipe.encode_prompt(PROMPTS), ref["context"]) < 3e-2
  out = pipe.unet(ref["latents"], ref["t"], ref["context"])
  assert out.dtype == np.float32
  assert 1e-4 < _rel(out, ref["unet"]) < 5e-2  # bfloat16's rounding, and only that
