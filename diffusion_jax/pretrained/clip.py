"""Stable Diffusion's CLIP text encoder from published weights, as `models.ClipTextModel`, no torch.

Three formats:
- a transformers `CLIPTextModel` folder (`config.json`, `model.safetensors`), alone or as the
  `text_encoder/` of a diffusers pipeline folder (`load_text_encoder`). Tensor names are
  `text_model.embeddings.token_embedding.weight`, ...; transformers >= 5.6 writes them without the
  `text_model.` prefix; both are read. The `position_ids` buffer of older files is ignored.
- an SD 1.x single-file checkpoint: the same names under `cond_stage_model.transformer.`
  (`load_ldm_text_encoder`).
- an SD 2.x single-file checkpoint: open_clip's text tower under `cond_stage_model.model.`
  (`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.{i}.ln_1`,
  `.attn.in_proj_weight` (q, k, v stacked, [3D, D]), `.attn.out_proj`, `.ln_2`, `.mlp.c_fc`,
  `.mlp.c_proj`, `ln_final`, `text_projection`, `logit_scale`). As diffusers' converter
  (`convert_open_clip_checkpoint`) and SD 2.x's text encoder config have it, the last resblock is
  dropped (Stable Diffusion 2 conditions on the penultimate layer, through `ln_final`): 24
  resblocks make a 23-layer gelu encoder; the projection and logit scale are not used.

`weight_map` is the table between transformers' names and the flax parameters, used both ways:
the loaders read through it, `text_encoder_state_dict` and `save_text_encoder` write through it.
Torch's linear weights are [O, I], flax's Dense kernels [I, O]; embedding tables are [rows, D] in
both.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax.traverse_util import flatten_dict

from diffusion_jax.models.clip_text import ACTIVATIONS, ClipTextConfig, ClipTextModel
from diffusion_jax.pretrained.files import WeightsError, read_config, read_safetensors
from diffusion_jax.pretrained.mapping import (
  Row,
  check_tensor,
  params_from_tensors,
  tensors_from_params,
)

PREFIX = "text_model."
_BUFFERS = ("embeddings.position_ids",)
_SD1_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
_SD2_PREFIX = "cond_stage_model.model."
# open_clip's tensors of the CLIP model that the text encoder does not use.
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")
# transformers' CLIPTextConfig defaults, for fields a config.json may leave out.
_DEFAULTS = {
  "vocab_size": 49408,
  "hidden_size": 512,
  "intermediate_size": 2048,
  "num_hidden_layers": 12,
  "num_attention_heads": 8,
  "max_position_embeddings": 77,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-5,
  "eos_token_id": 49407,
}
_OPTIONS = ("dtype",)
# Every published Stable Diffusion text encoder has 64-wide attention heads.
HEAD_DIM = 64
# transformers' layer names -> open_clip's, inside encoder.layers.{i} / transformer.resblocks.{i}.
_OPEN_CLIP_LAYERS = {
  "layer_norm1": "ln_1",
  "layer_norm2": "ln_2",
  "self_attn.out_proj": "attn.out_proj",
  "mlp.fc1": "mlp.c_fc",
  "mlp.fc2": "mlp.c_proj",
}


@functools.lru_cache(maxsize=8)
def _param_shapes(config: ClipTextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  tree = jax.eval_shape(ClipTextModel(config).init, jax.random.key(0), ids)["params"]
  return {path: leaf.shape for path, leaf in flatten_dict(tree).items()}


def _torch_name(path: tuple[str, ...]) -> str:
  module, leaf = path[:-1], path[-1]
  if module[0] in ("token_embedding", "position_embedding"):
    return f"embeddings.{module[0]}.weight"
  if module[0].startswith("layers_"):
    inside = ".".join("mlp." + m if m in ("fc1", "fc2") else m for m in module[1:])
    module = (f"encoder.layers.{module[0][len('layers_') :]}.{inside}",)
  return f"{'.'.join(module)}.{'bias' if leaf == 'bias' else 'weight'}"


def weight_map(config: ClipTextConfig, prefix: str = PREFIX) -> tuple[Row, ...]:
  """The table between a transformers CLIPTextModel's tensors and `ClipTextModel(config)`'s
  parameters: (tensor name, flax parameter path, torch shape) for every parameter.

  Args:
    config: the encoder.
    prefix: "text_model." (published files, transformers < 5.6) or "" (transformers >= 5.6).

  Returns:
    One row per parameter; embedding tables have the same [rows, D] shape in both layouts.
  """
  rows = []
  for path, shape in _param_shapes(config).items():
    torch_shape = shape if path[-1] == "embedding" else tuple(reversed(shape))
    rows.append((prefix + _torch_name(path), path, torch_shape))
  return tuple(rows)


def _params(tensors: dict, config: ClipTextConfig, prefix: str, source: str, implied_by: str):
  """The parameters of transformers-named tensors. An embedding table is [rows, D] in both
  layouts, so it goes through the map as its transpose, with its shape checked first."""
  rows = weight_map(config, prefix)
  tables = {name: shape for name, path, shape in rows if path[-1] == "embedding"}
  tensors = dict(tensors)
  for name, shape in tables.items():
    check_tensor(tensors, name, shape, source, implied_by)
    tensors[name] = tensors[name].T
  rows = tuple((n, p, s[::-1] if n in tables else s) for n, p, s in rows)
  return params_from_tensors(tensors, rows, _param_shapes(config), source, implied_by)


def _make_config(source: str, options: dict, **fields) -> ClipTextConfig:
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise TypeError(f"unexpected options {unknown}; the loaders take {_OPTIONS}")
  try:
    return ClipTextConfig(**fields, **options)
  except ValueError as e:
    raise WeightsError(f"{source}: {e}") from None


def text_config_from_transformers(
  config: dict, source: str = "config.json", **options
) -> ClipTextConfig:
  """The `ClipTextConfig` of a transformers CLIPTextModel `config.json`.

  Args:
    config: the parsed `config.json`.
    source: the file's name, for error messages.
    **options: `dtype` of the `ClipTextConfig`.

  Raises:
    WeightsError: another architecture, an unsupported activation or an invalid field.
  """
  architectures = config.get("architectures") or ["CLIPTextModel"]
  if list(architectures) != ["CLIPTextModel"]:
    raise WeightsError(
      f"{source}: architectures={architectures!r} is not supported here; need ['CLIPTextModel']"
    )
  if config.get("model_type", "clip_text_model") != "clip_text_model":
    raise WeightsError(
      f"{source}: model_type={config['model_type']!r} is not supported; need 'clip_text_model'"
    )
  fields = {name: config.get(name, default) for name, default in _DEFAULTS.items()}
  if fields["hidden_act"] not in ACTIVATIONS:
    raise WeightsError(
      f"{source}: hidden_act={fields['hidden_act']!r} is not supported (only {ACTIVATIONS})"
    )
  return _make_config(source, options, **fields)


def transformers_text_config(config: ClipTextConfig) -> dict:
  """transformers' CLIPTextModel `config.json` of `config`: the inverse of
  `text_config_from_transformers`."""
  fields = {name: getattr(config, name) for name in _DEFAULTS}
  return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **fields}


def load_text_encoder(folder: str, *, variant: str | None = None, **options):
  """A transformers CLIPTextModel folder as the project's `ClipTextModel`.

  Args:
    folder: a folder with `config.json` and `model.safetensors`, or a diffusers pipeline folder
      (with `model_index.json`) whose `text_encoder/` is one.
    variant: read `model.{variant}.safetensors` (e.g. "fp16").
    **options: `dtype` of the `ClipTextConfig`.

  Returns:
    (model, params): `model.apply({"params": params}, input_ids)` is transformers'
    `last_hidden_state` (Stable Diffusion's context); params are float32 NumPy arrays.

  Raises:
    WeightsError: a missing file, an unsupported config, a missing or unexpected tensor or a
      wrong shape; one line naming it.
  """
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    folder = os.path.join(folder, "text_encoder")
  if not os.path.isdir(folder):
    raise WeightsError(f"{folder}: no such folder (a CLIPTextModel folder: config.json + weights)")
  config_path = os.path.join(folder, "config.json")
  config = text_config_from_transformers(read_config(config_path), config_path, **options)
  stem = os.path.join(folder, "model" + (f".{variant}" if variant else ""))
  weights = stem + ".safetensors"
  if not os.path.isfile(weights) and os.path.isfile(stem + ".bin"):
    weights = stem + ".bin"  # read_safetensors says to convert it
  tensors = read_safetensors(weights)
  prefix = PREFIX if any(name.startswith(PREFIX) for name in tensors) else ""
  tensors = {k: v for k, v in tensors.items() if k not in {prefix + b for b in _BUFFERS}}
  return ClipTextModel(config), _params(tensors, config, prefix, weights, config_path)


def _shape(tensors: dict, name: str, source: str) -> tuple[int, ...]:
  if name not in tensors:
    raise WeightsError(f"{source}: missing tensor {name!r}")
  return tuple(tensors[name].shape)


def _layers(tensors: dict, pattern: str) -> int:
  return len({m[1] for k in tensors if (m := re.match(pattern, k))})


def _sd1(tensors: dict, prefix: str, source: str, heads: int | None, options: dict):
  """The encoder of transformers-named tensors under `prefix` (SD 1.x), the config read from
  their shapes."""
  tensors = {k: v for k, v in tensors.items() if k not in {prefix + b for b in _BUFFERS}}
  vocab, width = _shape(tensors, prefix + "embeddings.token_embedding.weight", source)
  positions = _shape(tensors, prefix + "embeddings.position_embedding.weight", source)[0]
  config = _make_config(
    source,
    options,
    vocab_size=vocab,
    hidden_size=width,
    intermediate_size=_shape(tensors, prefix + "encoder.layers.0.mlp.fc1.weight", source)[0],
    num_hidden_layers=_layers(tensors, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
    num_attention_heads=heads or max(width // HEAD_DIM, 1),
    max_position_embeddings=positions,
    hidden_act="quick_gelu",
  )
  return config, _params(tensors, config, prefix, source, "the rest of the file")


def _from_open_clip(tensors: dict, config: ClipTextConfig, resblocks: int, source: str) -> dict:
  """open_clip-named tensors (checked: none missing, unexpected or of a wrong shape) renamed to
  transformers' names; in_proj is split into q, k, v and the last `resblocks - layers` dropped."""
  width, inner = config.hidden_size, config.intermediate_size
  expected = {
    "token_embedding.weight": (config.vocab_size, width),
    "positional_embedding": (config.max_position_embeddings, width),
    "ln_final.weight": (width,),
    "ln_final.bias": (width,),
  }
  layer_shapes = {
    "ln_1": (width,),
    "attn.in_proj": (3 * width, width),
    "attn.out_proj": (width, width),
    "ln_2": (width,),
    "mlp.c_fc": (inner, width),
    "mlp.c_proj": (width, inner),
  }
  for i in range(resblocks):
    for layer, shape in layer_shapes.items():
      sep = "_" if layer == "attn.in_proj" else "."
      expected[f"transformer.resblocks.{i}.{layer}{sep}weight"] = shape
      expected[f"transformer.resblocks.{i}.{layer}{sep}bias"] = shape[:1]
  for name, shape in expected.items():
    check_tensor(tensors, name, shape, source, "the rest of the file", _SD2_PREFIX + name)
  for name, tensor in tensors.items():
    if name not in expected and name not in _OPEN_CLIP_UNUSED:
      raise WeightsError(
        f"{source}: unexpected tensor {_SD2_PREFIX + name!r} (shape {tuple(tensor.shape)}), not "
        "part of an open_clip text encoder"
      )
  out = {
    "embeddings.token_embedding.weight": tensors["token_embedding.weight"],
    "embeddings.position_embedding.weight": tensors["positional_embedding"],
    "final_layer_norm.weight": tensors["ln_final.weight"],
    "final_layer_norm.bias": tensors["ln_final.bias"],
  }
  for i in range(config.num_hidden_layers):
    ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for kind in ("weight", "bias"):
      for name, layer in _OPEN_CLIP_LAYERS.items():
        out[f"{ours}{name}.{kind}"] = tensors[f"{theirs}{layer}.{kind}"]
      fused = tensors[f"{theirs}attn.in_proj_{kind}"]
      for n, part in enumerate("qkv"):
        out[f"{ours}self_attn.{part}_proj.{kind}"] = fused[n * width : (n + 1) * width]
  return {PREFIX + k: v for k, v in out.items()}


def _sd2(tensors: dict, source: str, heads: int | None, options: dict):
  """The encoder of open_clip-named tensors (SD 2.x), the config read from their shapes."""
  vocab, width = _shape(tensors, "token_embedding.weight", source)
  resblocks = _layers(tensors, r"transformer\.resblocks\.(\d+)\.")
  if resblocks < 2:
    raise WeightsError(
      f"{source}: {resblocks} open_clip resblocks; Stable Diffusion 2 uses all but the last"
    )
  config = _make_config(
    source,
    options,
    vocab_size=vocab,
    hidden_size=width,
    intermediate_size=_shape(tensors, "transformer.resblocks.0.mlp.c_fc.weight", source)[0],
    num_hidden_layers=resblocks - 1,
    num_attention_heads=heads or max(width // HEAD_DIM, 1),
    max_position_embeddings=_shape(tensors, "positional_embedding", source)[0],
    hidden_act="gelu",
  )
  renamed = _from_open_clip(tensors, config, resblocks, source)
  return config, _params(renamed, config, PREFIX, source, "the rest of the file")


def load_ldm_text_encoder(path: str, *, num_attention_heads: int | None = None, **options):
  """The text encoder of a Stable Diffusion 1.x or 2.x single-file checkpoint.

  The architecture is read from the tensors' shapes; the other models' tensors are ignored.
  SD 1.x (`cond_stage_model.transformer.text_model.*`): quick_gelu, every layer. SD 2.x
  (`cond_stage_model.model.*`, open_clip's naming): gelu, the last resblock dropped, as diffusers
  converts it. Both pool at the largest token id (eos_token_id=2), as their published configs.

  Args:
    path: a .safetensors file.
    num_attention_heads: attention heads, which the shapes cannot tell; by default
      hidden_size // 64, as in every published Stable Diffusion encoder (12 for 1.x, 16 for 2.x).
    **options: `dtype` of the `ClipTextConfig`.

  Returns:
    (model, params), as `load_text_encoder`.

  Raises:
    WeightsError: no text encoder in the file, a missing or unexpected tensor, a wrong shape.
  """
  tensors = read_safetensors(path)
  for prefix in _SD1_PREFIXES:
    if any(name.startswith(prefix + PREFIX) for name in tensors):
      part = {k: v for k, v in tensors.items() if k.startswith(prefix)}
      config, params = _sd1(part, prefix + PREFIX, path, num_attention_heads, options)
      return ClipTextModel(config), params
  if any(name.startswith(_SD2_PREFIX) for name in tensors):
    part = {k[len(_SD2_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_SD2_PREFIX)}
    config, params = _sd2(part, path, num_attention_heads, options)
    return ClipTextModel(config), params
  raise WeightsError(
    f"{path}: no text encoder (no tensor under {_SD1_PREFIXES[0] + PREFIX!r} or {_SD2_PREFIX!r})"
  )


def text_encoder_state_dict(params, config: ClipTextConfig, prefix: str = PREFIX) -> dict:
  """The torch-layout state dict of `ClipTextModel(config)`'s params: the loaders' inverse.

  Args:
    params: the parameter tree.
    config: the encoder.
    prefix: "text_model." (published files, read by every transformers version) or "" (the names
      transformers >= 5.6 writes).

  Returns:
    {tensor name: float32 NumPy array in torch's layout}.
  """
  rows = weight_map(config, prefix)
  tables = {name for name, path, _ in rows if path[-1] == "embedding"}
  rows = tuple((n, p, s[::-1] if n in tables else s) for n, p, s in rows)
  tensors = tensors_from_params(params, rows)
  return {k: np.ascontiguousarray(v.T) if k in tables else v for k, v in tensors.items()}


def save_text_encoder(folder: str, config: ClipTextConfig, params) -> None:
  """Writes a transformers CLIPTextModel folder (`config.json`, `model.safetensors`) that
  `CLIPTextModel.from_pretrained(folder)` and `load_text_encoder` read."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(transformers_text_config(config), f, indent=2)
    f.write("\n")
  tensors = text_encoder_state_dict(params, config)
  safetensors.numpy.save_file(tensors, os.path.join(folder, "model.safetensors"))
