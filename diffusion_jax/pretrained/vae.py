"""Stable Diffusion's VAE from published weights, as `models.Autoencoder`, without torch.

Two formats: a diffusers `AutoencoderKL` folder (`config.json` and
`diffusion_pytorch_model.safetensors`, `load_vae`) and an original latent-diffusion single file
(LDM's key names, alone or under `first_stage_model.` in a whole Stable Diffusion checkpoint,
`load_ldm_vae`).

The project's parameter paths are LDM's keys (`models/autoencoder.py`), so LDM's names are a
respelling of the path. diffusers renames the blocks (`down.{i}.block.{j}` ->
`down_blocks.{i}.resnets.{j}`, `mid.attn_1` -> `mid_block.attentions.0`), numbers the decoder's
levels from the bottom (`up_blocks.{k}` is LDM's `up.{levels - 1 - k}`) and keeps the attention's
projections as linear layers ([O, I]; LDM has 1x1 convolutions [O, I, 1, 1]); its older files
name them `query`, `key`, `value`, `proj_attn`. `weight_map` is the one table of all three
namings, used both ways: the loaders read through it, `vae_state_dict` and `save_vae` write
through it. Torch convolutions are [O, I, kH, kW], flax's kernels [kH, kW, I, O]; a 1x1
convolution or linear layer is a flax Dense kernel [I, O].
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import safetensors.numpy
from flax.traverse_util import flatten_dict

from diffusion_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from diffusion_jax.pretrained.files import WeightsError, read_config, read_safetensors
from diffusion_jax.pretrained.mapping import (
  Row,
  params_from_tensors,
  tensors_from_params,
  torch_shape,
)

NAMINGS = ("diffusers", "diffusers_legacy", "ldm")

# Every parameterised block: (the project's module path, its diffusers name, its LDM name).
# {k} is the diffusers index of the decoder's level {i}: levels - 1 - i.
_BLOCKS = (
  (r"(?P<part>encoder|decoder)/(?P<layer>conv_in|conv_out)", "{part}.{layer}", "{part}.{layer}"),
  (r"(?P<part>encoder|decoder)/norm_out", "{part}.conv_norm_out", "{part}.norm_out"),
  (
    r"encoder/down_(?P<i>\d+)_block_(?P<j>\d+)/(?P<layer>\w+)",
    "encoder.down_blocks.{i}.resnets.{j}.{layer}",
    "encoder.down.{i}.block.{j}.{layer}",
  ),
  (
    r"encoder/down_(?P<i>\d+)_downsample/conv",
    "encoder.down_blocks.{i}.downsamplers.0.conv",
    "encoder.down.{i}.downsample.conv",
  ),
  (
    r"(?P<part>encoder|decoder)/mid_block_1/(?P<layer>\w+)",
    "{part}.mid_block.resnets.0.{layer}",
    "{part}.mid.block_1.{layer}",
  ),
  (
    r"(?P<part>encoder|decoder)/mid_block_2/(?P<layer>\w+)",
    "{part}.mid_block.resnets.1.{layer}",
    "{part}.mid.block_2.{layer}",
  ),
  (
    r"(?P<part>encoder|decoder)/mid_attn_1/(?P<layer>\w+)",
    "{part}.mid_block.attentions.0.{layer}",
    "{part}.mid.attn_1.{layer}",
  ),
  (
    r"decoder/up_(?P<i>\d+)_block_(?P<j>\d+)/(?P<layer>\w+)",
    "decoder.up_blocks.{k}.resnets.{j}.{layer}",
    "decoder.up.{i}.block.{j}.{layer}",
  ),
  (
    r"decoder/up_(?P<i>\d+)_upsample/conv",
    "decoder.up_blocks.{k}.upsamplers.0.conv",
    "decoder.up.{i}.upsample.conv",
  ),
  (r"(?P<layer>quant_conv|post_quant_conv)", "{layer}", "{layer}"),
)
# Layers inside the blocks named differently: project name -> names in NAMINGS' order. The
# attention's q, k, v, proj_out are linear layers in both diffusers namings.
_LAYERS = {
  "nin_shortcut": ("conv_shortcut", "conv_shortcut", "nin_shortcut"),
  "norm": ("group_norm", "group_norm", "norm"),
  "q": ("to_q", "query", "q"),
  "k": ("to_k", "key", "k"),
  "v": ("to_v", "value", "v"),
  "proj_out": ("to_out.0", "proj_attn", "proj_out"),
}
_LEGACY_PROBE = "encoder.mid_block.attentions.0.query.weight"
_LDM_PREFIXES = ("first_stage_model.", "vae.")

# diffusers' AutoencoderKL defaults for fields a config.json may leave out.
_DIFFUSERS_DEFAULTS = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ("DownEncoderBlock2D",),
  "up_block_types": ("UpDecoderBlock2D",),
  "block_out_channels": (64,),
  "layers_per_block": 1,
  "latent_channels": 4,
  "norm_num_groups": 32,
  "scaling_factor": 0.18215,
}
# Fields whose other values need what the project's Autoencoder does not have: field -> allowed.
_SUPPORTED = {
  "act_fn": ("silu",),
  "use_quant_conv": (True,),
  "use_post_quant_conv": (True,),
  "mid_block_add_attention": (True,),
  "shift_factor": (None, 0.0),
  "latents_mean": (None,),
  "latents_std": (None,),
}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# AutoencoderConfig fields that leave the parameters alone, which the loaders pass through.
_OPTIONS = ("dtype", "conv", "subpixel_upsample")

# The LDM single-file checkpoints of Stable Diffusion 1.x and 2.x hold no scaling factor.
SD_SCALING_FACTOR = 0.18215


@functools.lru_cache(maxsize=8)
def _param_shapes(config: AutoencoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  f = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  tree = jax.eval_shape(Autoencoder(config).init, jax.random.key(0), x)["params"]
  return {path: leaf.shape for path, leaf in flatten_dict(tree).items()}


def _params(tensors: dict, config: AutoencoderConfig, naming: str, source: str, implied_by: str):
  rows = weight_map(config, naming)
  return params_from_tensors(tensors, rows, _param_shapes(config), source, implied_by)


def _source_name(module: str, naming: str, levels: int) -> str:
  column = NAMINGS.index(naming)
  for pattern, *names in _BLOCKS:
    match = re.fullmatch(pattern, module)
    if match:
      groups = match.groupdict()
      if "layer" in groups:
        groups["layer"] = _LAYERS.get(groups["layer"], (groups["layer"],) * 3)[column]
      if "i" in groups:
        groups["k"] = levels - 1 - int(groups["i"])
      return names[column == 2].format(**groups)
  raise ValueError(f"no weight-map entry for the Autoencoder module {module!r}")


def weight_map(config: AutoencoderConfig, naming: str = "diffusers") -> tuple[Row, ...]:
  """The table between a published VAE's tensors and `Autoencoder(config)`'s parameters.

  Args:
    config: the autoencoder (attention-free levels: `attn_resolutions` must be empty).
    naming: one of NAMINGS: "diffusers", "diffusers_legacy" (query/key/value/proj_attn) or "ldm".

  Returns:
    (tensor name, flax parameter path, torch shape) for every parameter.
  """
  if naming not in NAMINGS:
    raise ValueError(f"naming={naming!r} is not one of {NAMINGS}")
  rows = []
  for path, leaf in _param_shapes(config).items():
    module = "/".join(path[:-1])
    name = _source_name(module, naming, len(config.channel_mult))
    linear = "/mid_attn_1/" in module and naming != "ldm"
    shape = torch_shape(leaf, linear)
    rows.append((f"{name}.{'bias' if path[-1] == 'bias' else 'weight'}", path, shape))
  return tuple(rows)


def _with_options(source: str, options: dict, **fields) -> AutoencoderConfig:
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise TypeError(f"unexpected options {unknown}; the loaders take {_OPTIONS}")
  try:
    return AutoencoderConfig(**fields, **options)
  except ValueError as e:
    raise WeightsError(f"{source}: {e}") from None


def vae_config_from_diffusers(
  config: dict, source: str = "config.json", **options
) -> tuple[AutoencoderConfig, float]:
  """The project's `AutoencoderConfig` and the scaling factor of a diffusers AutoencoderKL config.

  Args:
    config: the parsed `config.json`.
    source: the file's name, for error messages.
    **options: `dtype`, `conv`, `subpixel_upsample` of the `AutoencoderConfig`.

  Returns:
    (config, scaling_factor): latents for a diffusion model are `scaling_factor * z`.

  Raises:
    WeightsError: an unsupported class, block type or setting, named with its value.
  """
  get = lambda field: config.get(field, _DIFFUSERS_DEFAULTS.get(field))
  name = config.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise WeightsError(
      f"{source}: _class_name={name!r} is not supported here; need 'AutoencoderKL'"
    )
  for field, allowed in _SUPPORTED.items():
    if config.get(field, allowed[0]) not in allowed:
      raise WeightsError(f"{source}: {field}={config[field]!r} is not supported (only {allowed})")
  widths = [int(w) for w in get("block_out_channels")]
  for field, block in _BLOCK_TYPES.items():
    types = list(get(field))
    for n, kind in enumerate(types):
      if kind != block:
        raise WeightsError(f"{source}: {field}[{n}]={kind!r} is not supported; need {block!r}")
    if len(types) != len(widths):
      raise WeightsError(
        f"{source}: {field} has {len(types)} entries but block_out_channels={widths} has "
        f"{len(widths)}"
      )
  if not widths or any(w % widths[0] for w in widths):
    raise WeightsError(
      f"{source}: block_out_channels={widths} is not supported: each must be a multiple of "
      "the first"
    )
  ae_config = _with_options(
    source,
    options,
    channels=widths[0],
    channel_mult=tuple(w // widths[0] for w in widths),
    num_res_blocks=int(get("layers_per_block")),
    z_channels=int(get("latent_channels")),
    num_groups=int(get("norm_num_groups")),
    in_channels=int(get("in_channels")),
    out_channels=int(get("out_channels")),
  )
  return ae_config, float(get("scaling_factor"))


def diffusers_vae_config(config: AutoencoderConfig, scaling_factor: float) -> dict:
  """diffusers' AutoencoderKL `config.json` of `config`: `vae_config_from_diffusers`'s inverse."""
  if config.attn_resolutions:
    raise ValueError(
      f"attn_resolutions={config.attn_resolutions}: diffusers' AutoencoderKL has attention "
      "only in the middle; export needs attn_resolutions=()"
    )
  levels = len(config.channel_mult)
  return {
    "_class_name": "AutoencoderKL",
    "in_channels": config.in_channels,
    "out_channels": config.out_channels,
    "down_block_types": [_BLOCK_TYPES["down_block_types"]] * levels,
    "up_block_types": [_BLOCK_TYPES["up_block_types"]] * levels,
    "block_out_channels": [config.channels * m for m in config.channel_mult],
    "layers_per_block": config.num_res_blocks,
    "act_fn": "silu",
    "latent_channels": config.z_channels,
    "norm_num_groups": config.num_groups,
    "scaling_factor": scaling_factor,
  }


def load_vae(folder: str, *, variant: str | None = None, **options):
  """A diffusers AutoencoderKL folder as the project's `Autoencoder`.

  Args:
    folder: a folder with `config.json` and `diffusion_pytorch_model.safetensors`, or a
      pipeline folder (with `model_index.json`) whose `vae/` is one.
    variant: read `diffusion_pytorch_model.{variant}.safetensors` (e.g. "fp16").
    **options: `dtype`, `conv`, `subpixel_upsample` of the `AutoencoderConfig`.

  Returns:
    (model, params, scaling_factor): `model.apply({"params": params}, x, method=Autoencoder.encode)`
    and `method=Autoencoder.decode` match diffusers' `encode(x).latent_dist` and `decode(z).sample`
    (NHWC here, NCHW there); params are float32 NumPy arrays; a diffusion model's latents are
    `scaling_factor * z`.

  Raises:
    WeightsError: a missing file, an unsupported config, a missing or unexpected tensor or a
      wrong shape; one line naming it.
  """
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    folder = os.path.join(folder, "vae")
  if not os.path.isdir(folder):
    raise WeightsError(f"{folder}: no such folder (a diffusers VAE folder: config.json + weights)")
  config_path = os.path.join(folder, "config.json")
  config, scaling_factor = vae_config_from_diffusers(
    read_config(config_path), config_path, **options
  )
  stem = os.path.join(folder, "diffusion_pytorch_model" + (f".{variant}" if variant else ""))
  weights = stem + ".safetensors"
  if not os.path.isfile(weights) and os.path.isfile(stem + ".bin"):
    weights = stem + ".bin"  # read_safetensors says to convert it
  tensors = read_safetensors(weights)
  naming = "diffusers_legacy" if _LEGACY_PROBE in tensors else "diffusers"
  return Autoencoder(config), _params(tensors, config, naming, weights, config_path), scaling_factor


def _ldm_config(tensors: dict, num_groups: int, source: str, options: dict) -> AutoencoderConfig:
  """The AutoencoderConfig that LDM-named tensors imply (LDM's ddconfig, from the shapes)."""

  def out_in(name):
    if name not in tensors:
      raise WeightsError(f"{source}: missing tensor {name!r}")
    return tuple(tensors[name].shape[:2])

  channels, in_channels = out_in("encoder.conv_in.weight")
  levels = {m[1] for k in tensors if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
  blocks = {m[1] for k in tensors if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
  widths = [out_in(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(max(len(levels), 1))]
  if any(w % channels for w in widths):
    raise WeightsError(f"{source}: level widths {widths} are not multiples of conv_in's {channels}")
  return _with_options(
    source,
    options,
    channels=channels,
    channel_mult=tuple(w // channels for w in widths),
    num_res_blocks=len(blocks),
    z_channels=out_in("post_quant_conv.weight")[0],
    num_groups=num_groups,
    in_channels=in_channels,
    out_channels=out_in("decoder.conv_out.weight")[0],
  )


def load_ldm_vae(
  path: str, *, num_groups: int = 32, scaling_factor: float = SD_SCALING_FACTOR, **options
):
  """An original LDM / Stable Diffusion single-file VAE as the project's `Autoencoder`.

  The architecture is read from the tensors' shapes (widths, levels, blocks, latent channels);
  what they cannot tell is an argument.

  Args:
    path: a .safetensors file of LDM's AutoencoderKL keys (`encoder.down.0.block.0.conv1.weight`),
      alone or under `first_stage_model.` (or `vae.`) in a whole checkpoint, whose other tensors
      are ignored.
    num_groups: GroupNorm groups (32 in every published Stable Diffusion VAE).
    scaling_factor: returned as is; 0.18215 for Stable Diffusion 1.x and 2.x, 0.13025 for SDXL.
    **options: `dtype`, `conv`, `subpixel_upsample` of the `AutoencoderConfig`.

  Returns:
    (model, params, scaling_factor), as `load_vae`.

  Raises:
    WeightsError: as `load_vae`.
  """
  tensors = read_safetensors(path)
  for prefix in _LDM_PREFIXES:
    if any(name.startswith(prefix) for name in tensors):
      tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
      break
  config = _ldm_config(tensors, num_groups, path, options)
  return (
    Autoencoder(config),
    _params(tensors, config, "ldm", path, "the rest of the file"),
    scaling_factor,
  )


def vae_state_dict(params, config: AutoencoderConfig, naming: str = "diffusers") -> dict:
  """The torch-layout state dict of `Autoencoder(config)`'s params: the inverse of the loaders.

  Returns:
    {tensor name: float32 NumPy array in torch's layout} in `naming` (one of NAMINGS).
  """
  return tensors_from_params(params, weight_map(config, naming))


def save_vae(folder: str, config: AutoencoderConfig, params, scaling_factor: float) -> None:
  """Writes a diffusers AutoencoderKL folder (`config.json`, safetensors weights) that
  `AutoencoderKL.from_pretrained(folder)` and `load_vae` read."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(diffusers_vae_config(config, scaling_factor), f, indent=2)
    f.write("\n")
  weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  safetensors.numpy.save_file(vae_state_dict(params, config), weights)
