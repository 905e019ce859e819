"""DDPM's published U-Nets (diffusers' `UNet2DModel`, e.g. google/ddpm-cifar10-32), as the
project's `models.UNet`, without torch.

diffusers' UNet2DModel with DDPM's settings is the same network as the project's U-Net, operation
for operation: the timestep embedding is sin then cos with frequencies 10000^(-i / (half - 1))
(flip_sin_to_cos=false, freq_shift=1), GroupNorm's epsilon is 1e-6 (norm_eps), a stride-2
downsampling convolution pads (0, 1) as TensorFlow's SAME does (downsample_padding=0), attention
is softmax(q k^T / sqrt(head_dim)) v with one head (attention_head_dim=null; a head width d
gives width / d heads, which must be the same number everywhere) after every ResBlock of an
`Attn*Block2D` level and in the middle, the up path concatenates [h, skip] and upsamples
nearest-neighbour then convolves. So a checkpoint is a renaming: diffusers' `down_blocks.{i}`,
`mid_block` and `up_blocks.{k}` are the project's `down_{i}_*`, `mid_*` and `up_{i}_*` with
k = levels - 1 - i; an attention level is an attention resolution (the feature-map height
`sample_size / 2^i`). Settings the project's U-Net lacks are refused with a one-line
`WeightsError` naming the field. Linear layers are [O, I] in torch; the ResBlock shortcut is a
1x1 convolution [O, I, 1, 1]; both are flax Dense kernels [I, O]. Older diffusers files name the
attention's layers `query`, `key`, `value`, `proj_attn`; both namings are read.

Dropout is not a parameter: the U-Net takes diffusers' `dropout` field when the file has one and
0.0 (diffusers' default, which older files imply) otherwise; sampling (train=False) never applies
it, and the `dropout` option sets it for fine-tuning (DDPM trained CIFAR-10 with 0.1).
"""

import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import safetensors.numpy
from flax.traverse_util import flatten_dict

from diffusion_jax.models.fast import FastPaths
from diffusion_jax.models.unet import UNet, UNetConfig, unet_config_from
from diffusion_jax.pretrained.files import WeightsError, read_config, read_safetensors
from diffusion_jax.pretrained.mapping import (
  Row,
  params_from_tensors,
  tensors_from_params,
  torch_shape,
)

UNET_NAMINGS = ("diffusers", "diffusers_legacy")

# Every parameterised block: (the project's module path, its diffusers name). {k} is the diffusers
# index of the up path's level {i}: levels - 1 - i.
_BLOCKS = (
  (r"(?P<layer>conv_in|conv_out)", "{layer}"),
  (r"norm_out", "conv_norm_out"),
  (r"temb_dense0", "time_embedding.linear_1"),
  (r"temb_dense1", "time_embedding.linear_2"),
  (r"down_(?P<i>\d+)_block_(?P<j>\d+)/(?P<layer>\w+)", "down_blocks.{i}.resnets.{j}.{layer}"),
  (r"down_(?P<i>\d+)_attn_(?P<j>\d+)/(?P<layer>\w+)", "down_blocks.{i}.attentions.{j}.{layer}"),
  (r"down_(?P<i>\d+)_downsample/conv", "down_blocks.{i}.downsamplers.0.conv"),
  (r"mid_block_1/(?P<layer>\w+)", "mid_block.resnets.0.{layer}"),
  (r"mid_attn_1/(?P<layer>\w+)", "mid_block.attentions.0.{layer}"),
  (r"mid_block_2/(?P<layer>\w+)", "mid_block.resnets.1.{layer}"),
  (r"up_(?P<i>\d+)_block_(?P<j>\d+)/(?P<layer>\w+)", "up_blocks.{k}.resnets.{j}.{layer}"),
  (r"up_(?P<i>\d+)_attn_(?P<j>\d+)/(?P<layer>\w+)", "up_blocks.{k}.attentions.{j}.{layer}"),
  (r"up_(?P<i>\d+)_upsample/conv", "up_blocks.{k}.upsamplers.0.conv"),
)
# Layers inside the blocks named differently: project name -> names in UNET_NAMINGS' order.
_LAYERS = {
  "temb_proj": ("time_emb_proj", "time_emb_proj"),
  "nin_shortcut": ("conv_shortcut", "conv_shortcut"),
  "norm": ("group_norm", "group_norm"),
  "q": ("to_q", "query"),
  "k": ("to_k", "key"),
  "v": ("to_v", "value"),
  "proj_out": ("to_out.0", "proj_attn"),
}
_LEGACY_SUFFIX = ".attentions.0.query.weight"

# Settings the project's U-Net has one way: field -> (diffusers' default, the values it can be).
_FIXED = {
  "center_input_sample": (False, (False,)),
  "time_embedding_type": ("positional", ("positional",)),
  "flip_sin_to_cos": (True, (False,)),
  "freq_shift": (0, (1,)),
  "mid_block_type": ("UNetMidBlock2D", ("UNetMidBlock2D",)),
  "mid_block_scale_factor": (1, (1,)),
  "downsample_padding": (1, (0,)),
  "downsample_type": ("conv", ("conv",)),
  "upsample_type": ("conv", ("conv",)),
  "act_fn": ("silu", ("silu", "swish")),
  "norm_eps": (1e-5, (1e-6,)),
  "resnet_time_scale_shift": ("default", ("default",)),
  "add_attention": (True, (True,)),
  "class_embed_type": (None, (None,)),
  "num_class_embeds": (None, (None,)),
}
# diffusers' UNet2DModel defaults, for fields a config.json leaves out.
_DIFFUSERS_DEFAULTS = {
  "sample_size": None,
  "in_channels": 3,
  "out_channels": 3,
  "time_embedding_dim": None,
  "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
  "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  "block_out_channels": (224, 448, 672, 896),
  "layers_per_block": 2,
  "dropout": 0.0,
  "attention_head_dim": 8,
  "norm_num_groups": 32,
  "attn_norm_num_groups": None,
  **{field: default for field, (default, _) in _FIXED.items()},
}
# (plain block, attention block) of each path.
_BLOCK_TYPES = {
  "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
  "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
}
# UNetConfig fields that leave the parameters alone, which the loaders pass through.
_OPTIONS = ("dtype", "conv", "subpixel_upsample", "attention", "remat", "fast", "dropout")
# Plain values of the fields that leave the parameters alone (and of num_heads), for tracing.
_PLAIN = dict(num_heads=1, dropout=0.0, dtype="float32", attention="plain", remat=False)


def _param_shapes(config: UNetConfig, image_size: int, in_channels: int) -> dict:
  """{flax path: shape} of `UNet(config)`'s parameters, traced once per architecture: the
  fields that leave the parameters alone take their plainest values."""
  plain = dataclasses.replace(
    config, **_PLAIN, conv="xla", subpixel_upsample=False, fast=FastPaths(group_norm="reference")
  )
  return _traced_shapes(plain, image_size, in_channels)


@functools.lru_cache(maxsize=8)
def _traced_shapes(config: UNetConfig, image_size: int, in_channels: int) -> dict:
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  tree = jax.eval_shape(UNet(config).init, jax.random.key(0), x, t)["params"]
  return {path: leaf.shape for path, leaf in flatten_dict(tree).items()}


def _source_name(module: str, naming: str, levels: int) -> str:
  for pattern, name in _BLOCKS:
    match = re.fullmatch(pattern, module)
    if match:
      groups = match.groupdict()
      if "layer" in groups:
        groups["layer"] = _LAYERS.get(groups["layer"], (groups["layer"],) * 2)[
          UNET_NAMINGS.index(naming)
        ]
      if "i" in groups:
        groups["k"] = levels - 1 - int(groups["i"])
      return name.format(**groups)
  raise ValueError(f"no weight-map entry for the UNet module {module!r}")


def _rows(shapes: dict, levels: int, naming: str) -> tuple[Row, ...]:
  if naming not in UNET_NAMINGS:
    raise ValueError(f"naming={naming!r} is not one of {UNET_NAMINGS}")
  rows = []
  for path, shape in shapes.items():
    module = "/".join(path[:-1])
    name = _source_name(module, naming, levels)
    shape = torch_shape(shape, linear=path[-2] != "nin_shortcut")
    rows.append((f"{name}.{'bias' if path[-1] == 'bias' else 'weight'}", path, shape))
  return tuple(rows)


def ddpm_unet_weight_map(
  config: UNetConfig, image_size: int, in_channels: int = 3, naming: str = "diffusers"
) -> tuple[Row, ...]:
  """The table between a UNet2DModel's tensors and `UNet(config)`'s parameters.

  Args:
    config: the U-Net (its attn_resolutions are heights of an `image_size` input).
    image_size: the input's height and width.
    in_channels: the input's channels.
    naming: one of UNET_NAMINGS: "diffusers", or "diffusers_legacy" (query/key/value/proj_attn).

  Returns:
    (tensor name, flax parameter path, torch shape) for every parameter; shapes come from
    `jax.eval_shape`, so no array is built.
  """
  shapes = _param_shapes(config, image_size, in_channels)
  return _rows(shapes, len(config.channel_mult), naming)


def _read(config: dict, source: str, options: dict) -> tuple[UNetConfig, int, int]:
  """(UNetConfig, image size, input channels) of a UNet2DModel config."""
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise TypeError(f"unexpected options {unknown}; the loaders take {_OPTIONS}")

  def get(field):
    return config.get(field, _DIFFUSERS_DEFAULTS.get(field))

  def refuse(field, why):
    absent = "" if field in config else " (diffusers' default: the field is absent)"
    raise WeightsError(f"{source}: {field}={get(field)!r}{absent} is not supported; {why}")

  name = config.get("_class_name", "UNet2DModel")
  if name != "UNet2DModel":
    raise WeightsError(f"{source}: _class_name={name!r} is not supported here; need 'UNet2DModel'")
  for field, (_, allowed) in _FIXED.items():
    if get(field) not in allowed:
      refuse(field, f"only {allowed}")
  widths = [int(w) for w in get("block_out_channels")]
  if not widths or min(widths) < 1 or any(w % widths[0] for w in widths):
    refuse("block_out_channels", "each width must be a multiple of the first")
  if get("time_embedding_dim") not in (None, 4 * widths[0]):
    refuse("time_embedding_dim", f"only null or 4 * block_out_channels[0] = {4 * widths[0]}")
  groups = get("norm_num_groups")
  if not isinstance(groups, int) or groups < 1:
    refuse("norm_num_groups", "need a positive integer")
  if get("attn_norm_num_groups") not in (None, groups):
    refuse("attn_norm_num_groups", f"only null or norm_num_groups={groups}")

  levels = len(widths)
  attends = {}
  for field, kinds in _BLOCK_TYPES.items():
    types = list(get(field))
    if len(types) != levels:
      refuse(field, f"need {levels} entries, one per block_out_channels")
    for n, kind in enumerate(types):
      if kind not in kinds:
        raise WeightsError(f"{source}: {field}[{n}]={kind!r} is not supported; need one of {kinds}")
    attends[field] = [kind == kinds[1] for kind in types]
  for i, down in enumerate(attends["down_block_types"]):
    k = levels - 1 - i
    if attends["up_block_types"][k] != down:
      raise WeightsError(
        f"{source}: up_block_types[{k}]={get('up_block_types')[k]!r} with "
        f"down_block_types[{i}]={get('down_block_types')[i]!r} is not supported: the project's "
        "U-Net has attention at the same levels of both paths"
      )
  attn_levels = [i for i, down in enumerate(attends["down_block_types"]) if down]

  size = get("sample_size")
  if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
    size = size[0]
  factor = 2 ** (levels - 1)
  if not isinstance(size, int) or size < 1 or size % factor:
    refuse(
      "sample_size",
      f"need a square size divisible by {factor}: attention sits at feature-map heights",
    )

  head_dim = get("attention_head_dim")
  heads = {widths[i] // head_dim if head_dim else 1 for i in (*attn_levels, levels - 1)}
  if head_dim and (len(heads) > 1 or any(widths[i] % head_dim for i in (*attn_levels, -1))):
    refuse("attention_head_dim", "need every attention's width to hold the same number of heads")

  dropout = options.pop("dropout", get("dropout"))
  try:
    unet_config = unet_config_from(
      UNetConfig(
        channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=int(get("layers_per_block")),
        attn_resolutions=tuple(size // 2**i for i in attn_levels),
        num_heads=heads.pop(),
        dropout=float(dropout),
        num_groups=groups,
        out_channels=int(get("out_channels")),
        **options,
      )
    )
  except ValueError as e:
    raise WeightsError(f"{source}: {e}") from None
  return unet_config, size, int(get("in_channels"))


def ddpm_unet_config_from_diffusers(
  config: dict, source: str = "config.json", **options
) -> tuple[UNetConfig, int]:
  """The project's `UNetConfig` and the image size of a diffusers UNet2DModel config.

  Args:
    config: the parsed `config.json`.
    source: the file's name, for error messages.
    **options: `dtype`, `conv`, `subpixel_upsample`, `attention`, `remat`, `fast` and `dropout`
      of the `UNetConfig` (dropout defaults to the file's, else 0.0).

  Returns:
    (config, image_size): the U-Net and the height and width (`sample_size`) it was trained at,
    which fix where its attention sits.

  Raises:
    WeightsError: an unsupported class, block type or setting, named with its value.
  """
  unet_config, size, _ = _read(config, source, dict(options))
  return unet_config, size


def diffusers_ddpm_unet_config(config: UNetConfig, image_size: int, in_channels: int = 3) -> dict:
  """diffusers' UNet2DModel `config.json` of `config`: `ddpm_unet_config_from_diffusers`'s inverse.

  Raises:
    ValueError: a setting UNet2DModel cannot express (patches, labels, cross-attention,
      resampling without convolutions, a head count that is not one head width).
  """
  for field, plain in (
    ("patch_size", 1),
    ("num_classes", 0),
    ("cross_attn_resolutions", ()),
    ("resamp_with_conv", True),
  ):
    if getattr(config, field) != plain:
      raise ValueError(f"model.{field}={getattr(config, field)!r}: export needs {plain!r}")
  levels = len(config.channel_mult)
  widths = [config.channels * m for m in config.channel_mult]
  attends = [image_size // 2**i in config.attn_resolutions for i in range(levels)]
  attended = {widths[i] for i in range(levels) if attends[i]} | {widths[-1]}
  head_dims = {w // config.num_heads for w in attended}
  if config.num_heads > 1 and len(head_dims) > 1:
    raise ValueError(
      f"model.num_heads={config.num_heads} gives head widths {sorted(head_dims)}; diffusers' "
      "attention_head_dim is one width"
    )
  down, up = _BLOCK_TYPES["down_block_types"], _BLOCK_TYPES["up_block_types"]
  return {
    "_class_name": "UNet2DModel",
    "sample_size": image_size,
    "in_channels": in_channels,
    "out_channels": config.out_channels,
    "down_block_types": [down[a] for a in attends],
    "up_block_types": [up[a] for a in reversed(attends)],
    "block_out_channels": widths,
    "layers_per_block": config.num_res_blocks,
    "dropout": config.dropout,
    "attention_head_dim": head_dims.pop() if config.num_heads > 1 else None,
    "norm_num_groups": config.num_groups,
    **{field: allowed[0] for field, (_, allowed) in _FIXED.items()},
  }


def load_ddpm_unet(folder: str, *, variant: str | None = None, **options):
  """A diffusers UNet2DModel folder (DDPM's published U-Nets) as the project's `UNet`.

  Args:
    folder: a folder with `config.json` and `diffusion_pytorch_model.safetensors`, or a
      pipeline folder (with `model_index.json`) whose `unet/` is one.
    variant: read `diffusion_pytorch_model.{variant}.safetensors` (e.g. "fp16").
    **options: `dtype`, `conv`, `subpixel_upsample`, `attention`, `remat`, `fast` and `dropout`
      of the `UNetConfig`; none changes the parameters.

  Returns:
    (model, params, image_size): `model.apply({"params": params}, x, t)` matches diffusers'
    `unet(x, t).sample` (NHWC here, NCHW there); params are float32 NumPy arrays; image_size is
    the config's sample_size.

  Raises:
    WeightsError: a missing file, an unsupported config, a missing or unexpected tensor or a
      wrong shape; one line naming it.
  """
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    folder = os.path.join(folder, "unet")
  if not os.path.isdir(folder):
    raise WeightsError(f"{folder}: no such folder (a diffusers UNet folder: config.json + weights)")
  config_path = os.path.join(folder, "config.json")
  config, image_size, in_channels = _read(read_config(config_path), config_path, dict(options))
  stem = os.path.join(folder, "diffusion_pytorch_model" + (f".{variant}" if variant else ""))
  weights = stem + ".safetensors"
  if not os.path.isfile(weights) and os.path.isfile(stem + ".bin"):
    weights = stem + ".bin"  # read_safetensors says to convert it
  tensors = read_safetensors(weights)
  legacy = any(name.endswith(_LEGACY_SUFFIX) for name in tensors)
  naming = "diffusers_legacy" if legacy else "diffusers"
  shapes = _param_shapes(config, image_size, in_channels)
  rows = _rows(shapes, len(config.channel_mult), naming)
  params = params_from_tensors(tensors, rows, shapes, weights, config_path)
  return UNet(config), params, image_size


def ddpm_unet_state_dict(params, config: UNetConfig, naming: str = "diffusers") -> dict:
  """The torch-layout state dict of `UNet(config)`'s params: the inverse of `load_ddpm_unet`.

  Returns:
    {tensor name: float32 NumPy array in torch's layout} in `naming` (one of UNET_NAMINGS).
  """
  shapes = {path: tuple(leaf.shape) for path, leaf in flatten_dict(params).items()}
  return tensors_from_params(params, _rows(shapes, len(config.channel_mult), naming))


def save_ddpm_unet(folder: str, config: UNetConfig, params, image_size: int) -> None:
  """Writes a diffusers UNet2DModel folder (`config.json`, safetensors weights) that
  `UNet2DModel.from_pretrained(folder)` and `load_ddpm_unet` read.

  Args:
    folder: created if missing.
    config: the U-Net's config.
    params: its parameters.
    image_size: the height and width it runs at (sample_size: where attention sits).

  Raises:
    ValueError: a setting UNet2DModel cannot express (`diffusers_ddpm_unet_config`).
  """
  in_channels = int(params["conv_in"]["kernel"].shape[2])
  diffusers_config = diffusers_ddpm_unet_config(config, image_size, in_channels)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(diffusers_config, f, indent=2)
    f.write("\n")
  weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  safetensors.numpy.save_file(ddpm_unet_state_dict(params, config), weights)
