"""Stable Diffusion's U-Net from published weights, as `models.LatentUNet`, without torch.

Two formats: a diffusers `UNet2DConditionModel` folder (`config.json` and
`diffusion_pytorch_model.safetensors`, `load_unet`) and the U-Net of an original single-file
checkpoint (`model.diffusion_model.` keys, `load_ldm_unet`), whose architecture is read from the
tensors' shapes where they tell it and otherwise taken from arguments (Stable Diffusion 1.x's
values by default).

The module names of `LatentUNet` are diffusers' with `_` for `.` before a list index
(`down_blocks_0/resnets_1` is `down_blocks.0.resnets.1`); the ResBlocks keep the project's
`temb_proj` and `nin_shortcut` (diffusers' `time_emb_proj`, `conv_shortcut`). LDM numbers the
same blocks as `input_blocks.{n}.{0|1}`, `middle_block.{0,1,2}`, `output_blocks.{n}.{0|1|2}`.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import safetensors.numpy
from flax.traverse_util import flatten_dict

from diffusion_jax.models.latent_unet import LatentUNet, LatentUNetConfig
from diffusion_jax.pretrained.files import WeightsError, read_config, read_safetensors
from diffusion_jax.pretrained.mapping import (
  Row,
  params_from_tensors,
  tensors_from_params,
  torch_shape,
)

_LISTS = {
  "down_blocks",
  "up_blocks",
  "resnets",
  "attentions",
  "downsamplers",
  "upsamplers",
  "transformer_blocks",
  "to_out",
  "net",
}
_RENAMES = {
  "temb_proj": "time_emb_proj",
  "nin_shortcut": "conv_shortcut",
  "kernel": "weight",
  "scale": "weight",
}
# Values of diffusers' UNet2DConditionModel config that need what LatentUNet does not have.
_SUPPORTED = {
  "act_fn": ("silu",),
  "center_input_sample": (False,),
  "mid_block_type": ("UNetMidBlock2DCrossAttn",),
  "only_cross_attention": (False,),
  "dual_cross_attention": (False,),
  "class_embed_type": (None,),
  "addition_embed_type": (None,),
  "num_class_embeds": (None,),
  "encoder_hid_dim": (None,),
  "time_embedding_type": ("positional",),
  "time_embedding_dim": (None,),
  "time_cond_proj_dim": (None,),
  "timestep_post_act": (None,),
  "resnet_time_scale_shift": ("default",),
  "resnet_skip_time_act": (False,),
  "resnet_out_scale_factor": (1, 1.0),
  "mid_block_scale_factor": (1, 1.0),
  "conv_in_kernel": (3,),
  "conv_out_kernel": (3,),
  "downsample_padding": (1,),
  "attention_type": ("default",),
  "cross_attention_norm": (None,),
  "class_embeddings_concat": (False,),
}
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# LatentUNetConfig fields that leave the parameters alone, which the loaders pass through.
_OPTIONS = ("dtype", "attention", "conv", "subpixel_upsample")
_LDM_PREFIX = "model.diffusion_model."
_LDM_RESNET = {
  "norm1": "in_layers.0",
  "conv1": "in_layers.2",
  "time_emb_proj": "emb_layers.1",
  "norm2": "out_layers.0",
  "conv2": "out_layers.3",
  "conv_shortcut": "skip_connection",
}


@functools.lru_cache(maxsize=8)
def _param_shapes(config: LatentUNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  f = 2 ** (len(config.block_channels) - 1)
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, config.context_dim), jnp.float32)
  tree = jax.eval_shape(LatentUNet(config).init, jax.random.key(0), x, t, context)["params"]
  return {path: leaf.shape for path, leaf in flatten_dict(tree).items()}


def _diffusers_name(path: tuple[str, ...]) -> str:
  parts = []
  for part in "/".join(path).split("/"):
    head, _, index = part.rpartition("_")
    parts.append(f"{head}.{index}" if head in _LISTS else _RENAMES.get(part, part))
  return ".".join(parts)


def _ldm_name(name: str, config: LatentUNetConfig) -> str:
  """The LDM name of a diffusers tensor name of `LatentUNet(config)`."""
  layers = config.layers_per_block
  fixed = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
  }
  for old, new in fixed.items():
    if name.startswith(old):
      return new + name[len(old) :]

  def resnet(rest):
    layer, _, leaf = rest.partition(".")
    return f"{_LDM_RESNET[layer]}.{leaf}"

  if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
    index = 1 + int(m[1]) * (layers + 1) + int(m[3])
    return f"input_blocks.{index}." + (f"0.{resnet(m[4])}" if m[2] == "resnets" else f"1.{m[4]}")
  if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
    return f"input_blocks.{1 + int(m[1]) * (layers + 1) + layers}.0.op.{m[2]}"
  if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.*)", name):
    return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
  if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", name):
    return f"middle_block.1.{m[1]}"
  if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
    index = int(m[1]) * (layers + 1) + int(m[3])
    return f"output_blocks.{index}." + (f"0.{resnet(m[4])}" if m[2] == "resnets" else f"1.{m[4]}")
  if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
    level = len(config.block_channels) - 1 - int(m[1])
    index = int(m[1]) * (layers + 1) + layers
    return f"output_blocks.{index}.{2 if config.cross_attention[level] else 1}.conv.{m[2]}"
  raise ValueError(f"no LDM name for the U-Net tensor {name!r}")


def weight_map(
  config: LatentUNetConfig, linear_projection: bool, naming: str = "diffusers"
) -> tuple[Row, ...]:
  """The table between a published U-Net's tensors and `LatentUNet(config)`'s parameters.

  Args:
    config: the U-Net.
    linear_projection: the spatial Transformers' proj_in/proj_out are linear layers [O, I]
      (Stable Diffusion 2.x) rather than 1x1 convolutions [O, I, 1, 1] (1.x).
    naming: "diffusers" or "ldm" (a single file's names after `model.diffusion_model.`).

  Returns:
    (tensor name, flax parameter path, torch shape) for every parameter.
  """
  if naming not in ("diffusers", "ldm"):
    raise ValueError(f"naming={naming!r} is not 'diffusers' or 'ldm'")
  rows = []
  for path, leaf in _param_shapes(config).items():
    name = _diffusers_name(path)
    conv = "/nin_shortcut" in "/".join(path) or (
      not linear_projection and re.search(r"\.proj_(in|out)\.", name)
    )
    shape = torch_shape(leaf, linear=not conv)
    rows.append((name if naming == "diffusers" else _ldm_name(name, config), path, shape))
  return tuple(rows)


def _listed(value, levels: int, field: str, source: str) -> tuple[int, ...]:
  values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
  if len(values) != levels or not all(isinstance(v, int) for v in values):
    raise WeightsError(f"{source}: {field}={value!r} is not an integer or one per level")
  return values


def _with_options(source: str, options: dict, **fields) -> LatentUNetConfig:
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise TypeError(f"unexpected options {unknown}; the loaders take {_OPTIONS}")
  try:
    return LatentUNetConfig(**fields, **options)
  except ValueError as e:
    raise WeightsError(f"{source}: {e}") from None


def unet_config_from_diffusers(config: dict, source: str = "config.json", **options):
  """The `LatentUNetConfig` of a diffusers UNet2DConditionModel config.

  Args:
    config: the parsed `config.json`.
    source: the file's name, for error messages.
    **options: `dtype`, `attention`, `conv`, `subpixel_upsample` of the `LatentUNetConfig`.

  Returns:
    (config, linear_projection, sample_size): `linear_projection` as `weight_map` takes it;
    `sample_size` is the latent size the model was trained at.

  Raises:
    WeightsError: an unsupported class, block type or setting, named with its value.
  """
  name = config.get("_class_name", "UNet2DConditionModel")
  if name != "UNet2DConditionModel":
    raise WeightsError(
      f"{source}: _class_name={name!r} is not supported here; need a "
      "'UNet2DConditionModel' (Stable Diffusion 1.x / 2.x)"
    )
  for field, allowed in _SUPPORTED.items():
    if config.get(field, allowed[0]) not in allowed:
      raise WeightsError(f"{source}: {field}={config[field]!r} is not supported (only {allowed})")
  widths = tuple(int(w) for w in config.get("block_out_channels", (320, 640, 1280, 1280)))
  levels = len(widths)
  down = list(config.get("down_block_types", ()))
  up = list(config.get("up_block_types", ()))
  for field, types, kinds in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
    if len(types) != levels or any(kind not in kinds for kind in types):
      raise WeightsError(
        f"{source}: {field}={types} is not supported: need one of {sorted(kinds)} per level of "
        f"block_out_channels={list(widths)}"
      )
  cross = tuple(_DOWN[kind] for kind in down)
  if tuple(_UP[kind] for kind in reversed(up)) != cross:
    raise WeightsError(f"{source}: up_block_types={up} do not mirror down_block_types={down}")
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  layers = config.get("layers_per_block", 2)
  if not isinstance(layers, int):
    raise WeightsError(f"{source}: layers_per_block={layers!r} per level is not supported")
  if config.get("reverse_transformer_layers_per_block") is not None:
    raise WeightsError(f"{source}: reverse_transformer_layers_per_block is not supported")
  context_dim = config.get("cross_attention_dim", 1280)
  if not isinstance(context_dim, int):
    raise WeightsError(f"{source}: cross_attention_dim={context_dim!r} per level is not supported")
  unet_config = _with_options(
    source,
    options,
    in_channels=int(config.get("in_channels", 4)),
    out_channels=int(config.get("out_channels", 4)),
    block_channels=widths,
    cross_attention=cross,
    layers_per_block=layers,
    num_heads=_listed(heads, levels, "attention_head_dim", source),
    transformer_layers=_listed(
      config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block", source
    ),
    context_dim=context_dim,
    num_groups=int(config.get("norm_num_groups", 32)),
    norm_eps=float(config.get("norm_eps", 1e-5)),
    flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
    freq_shift=float(config.get("freq_shift", 0)),
  )
  return unet_config, bool(config.get("use_linear_projection", False)), config.get("sample_size")


def diffusers_unet_config(
  config: LatentUNetConfig, linear_projection: bool, sample_size: int | None
) -> dict:
  """diffusers' UNet2DConditionModel `config.json` of `config`: the inverse of
  `unet_config_from_diffusers`."""
  return {
    "_class_name": "UNet2DConditionModel",
    "sample_size": sample_size,
    "in_channels": config.in_channels,
    "out_channels": config.out_channels,
    "flip_sin_to_cos": config.flip_sin_to_cos,
    "freq_shift": config.freq_shift,
    "down_block_types": [
      "CrossAttnDownBlock2D" if c else "DownBlock2D" for c in config.cross_attention
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": [
      "CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(config.cross_attention)
    ],
    "block_out_channels": list(config.block_channels),
    "layers_per_block": config.layers_per_block,
    "downsample_padding": 1,
    "act_fn": "silu",
    "norm_num_groups": config.num_groups,
    "norm_eps": config.norm_eps,
    "cross_attention_dim": config.context_dim,
    "transformer_layers_per_block": list(config.transformer_layers),
    "attention_head_dim": list(config.num_heads),
    "use_linear_projection": linear_projection,
  }


def _weights_file(folder: str, variant: str | None) -> str:
  stem = os.path.join(folder, "diffusion_pytorch_model" + (f".{variant}" if variant else ""))
  if not os.path.isfile(stem + ".safetensors") and os.path.isfile(stem + ".bin"):
    return stem + ".bin"  # read_safetensors says to convert it
  return stem + ".safetensors"


def load_unet(folder: str, *, variant: str | None = None, **options):
  """A diffusers UNet2DConditionModel folder as the project's `LatentUNet`.

  Args:
    folder: a folder with `config.json` and `diffusion_pytorch_model.safetensors`, or a
      pipeline folder (with `model_index.json`) whose `unet/` is one.
    variant: read `diffusion_pytorch_model.{variant}.safetensors` (e.g. "fp16").
    **options: `dtype`, `attention`, `conv`, `subpixel_upsample` of the `LatentUNetConfig`.

  Returns:
    (model, params, info): `model.apply({"params": params}, latents, t, context)` is diffusers'
    `unet(latents, t, context).sample` (NHWC here, NCHW there); params are float32 NumPy arrays;
    info is {"linear_projection": bool, "sample_size": int or None}.

  Raises:
    WeightsError: a missing file, an unsupported config, a missing or unexpected tensor or a
      wrong shape; one line naming it.
  """
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    folder = os.path.join(folder, "unet")
  if not os.path.isdir(folder):
    raise WeightsError(
      f"{folder}: no such folder (a diffusers U-Net folder: config.json + weights)"
    )
  config_path = os.path.join(folder, "config.json")
  config, linear, sample_size = unet_config_from_diffusers(
    read_config(config_path), config_path, **options
  )
  weights = _weights_file(folder, variant)
  tensors = read_safetensors(weights)
  rows = weight_map(config, linear)
  params = params_from_tensors(tensors, rows, _param_shapes(config), weights, config_path)
  return LatentUNet(config), params, {"linear_projection": linear, "sample_size": sample_size}


def ldm_unet_config(
  tensors: dict, source: str, *, num_heads=8, head_dim=None, num_groups: int = 32, **options
):
  """The LatentUNetConfig that LDM-named U-Net tensors imply, with what shapes cannot tell from
  the arguments: `num_heads` (an int or one per level; Stable Diffusion 1.x: 8) or `head_dim`
  (2.x: 64, the heads then follow from the widths)."""

  def shape(name):
    if name not in tensors:
      raise WeightsError(f"{source}: missing tensor {_LDM_PREFIX}{name!r}")
    return tensors[name].shape

  in_channels = shape("input_blocks.0.0.weight")[1]
  widths, cross, layers, n = [], [], 0, 1
  while f"input_blocks.{n}.0.in_layers.2.weight" in tensors:
    level_start = n
    while f"input_blocks.{n}.0.in_layers.2.weight" in tensors:
      n += 1
    layers = n - level_start
    widths.append(shape(f"input_blocks.{level_start}.0.in_layers.2.weight")[0])
    cross.append(f"input_blocks.{level_start}.1.norm.weight" in tensors)
    if f"input_blocks.{n}.0.op.weight" not in tensors:
      break
    n += 1
  if not widths:
    raise WeightsError(f"{source}: no U-Net ResBlocks under {_LDM_PREFIX}input_blocks")
  depth = lambda prefix: len(
    {k[len(prefix) :].split(".")[0] for k in tensors if k.startswith(prefix)}
  )
  transformer_layers = tuple(
    depth(f"input_blocks.{1 + i * (layers + 1)}.1.transformer_blocks.") if c else 1
    for i, c in enumerate(cross)
  )
  if head_dim:
    heads = tuple(w // head_dim for w in widths)
  else:
    heads = _listed(num_heads, len(widths), "num_heads", source)
  return _with_options(
    source,
    options,
    in_channels=in_channels,
    out_channels=shape("out.2.weight")[0],
    block_channels=tuple(widths),
    cross_attention=tuple(cross),
    layers_per_block=layers,
    num_heads=heads,
    transformer_layers=transformer_layers,
    context_dim=shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
    num_groups=num_groups,
  )


def load_ldm_unet(path: str, *, num_heads=8, head_dim=None, num_groups: int = 32, **options):
  """The U-Net of an original Stable Diffusion single file as the project's `LatentUNet`.

  Args:
    path: a .safetensors file with the U-Net under `model.diffusion_model.` (other tensors are
      ignored), or the U-Net's tensors alone.
    num_heads: attention heads, an int or one per level (Stable Diffusion 1.x: 8).
    head_dim: instead of num_heads, the width of each head (2.x: 64).
    num_groups: GroupNorm groups (32 in every published Stable Diffusion).
    **options: `dtype`, `attention`, `conv`, `subpixel_upsample`.

  Returns:
    (model, params, info), as `load_unet`.

  Raises:
    WeightsError: as `load_unet`.
  """
  tensors = read_safetensors(path)
  if any(name.startswith(_LDM_PREFIX) for name in tensors):
    tensors = {k[len(_LDM_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_LDM_PREFIX)}
  config = ldm_unet_config(
    tensors, path, num_heads=num_heads, head_dim=head_dim, num_groups=num_groups, **options
  )
  linear = tensors["middle_block.1.proj_in.weight"].ndim == 2
  rows = weight_map(config, linear, "ldm")
  params = params_from_tensors(tensors, rows, _param_shapes(config), path, "the rest of the file")
  return LatentUNet(config), params, {"linear_projection": linear, "sample_size": None}


def unet_state_dict(params, config: LatentUNetConfig, linear_projection: bool) -> dict:
  """{diffusers tensor name: float32 array in torch's layout}: the inverse of the loaders."""
  return tensors_from_params(params, weight_map(config, linear_projection))


def save_unet(
  folder: str, config: LatentUNetConfig, params, linear_projection: bool, sample_size=None
) -> None:
  """Writes a diffusers UNet2DConditionModel folder that diffusers and `load_unet` read."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(diffusers_unet_config(config, linear_projection, sample_size), f, indent=2)
    f.write("\n")
  weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  safetensors.numpy.save_file(unet_state_dict(params, config, linear_projection), weights)
