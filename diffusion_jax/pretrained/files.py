"""Reading published weights from disk: safetensors files and diffusers' `config.json`, no torch.

Every problem with the files (one missing, unreadable, of a format read only through torch) is a
`WeightsError` with a one-line message naming the file and what to do.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

# The floating-point dtypes of published weights, by their safetensors names.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}


class WeightsError(ValueError):
  """Published weights that do not fit: a missing file, tensor or config field, an unexpected
  tensor, a wrong shape, an unsupported class. The message is one line naming it."""


def read_config(path: str) -> dict:
  """The JSON object in `path` (a diffusers `config.json`).

  Raises:
    WeightsError: the file is missing or not a JSON object.
  """
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WeightsError(f"{path}: not readable as JSON ({e})") from None
  if not isinstance(config, dict):
    raise WeightsError(f"{path}: holds a JSON {type(config).__name__}, not an object")
  return config


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file as a NumPy array (bfloat16 ones as ml_dtypes' bfloat16).

  Raises:
    WeightsError: the file is missing or not a safetensors file; for a PyTorch pickle
      (.bin, .ckpt, .pt, .pth) the message says to convert it.
  """
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file")
  if os.path.splitext(path)[1] in (".bin", ".ckpt", ".pt", ".pth"):
    raise WeightsError(
      f"{path}: a PyTorch pickle, which only torch reads; convert it to .safetensors once "
      "(diffusers: save_pretrained(..., safe_serialization=True), or safetensors.torch.save_file)"
    )
  try:
    return safetensors.numpy.load_file(path)
  except KeyError:  # a dtype safetensors' NumPy API lacks (bfloat16)
    return _read_by_layout(path)
  except Exception as e:  # noqa: BLE001 - the Rust reader raises its own error types
    raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def _read_by_layout(path: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file read by its layout: an 8-byte little-endian header size, a
  JSON header {name: {dtype, shape, data_offsets}}, then the data."""
  with open(path, "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    data = f.read()
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise WeightsError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not supported")
    start, end = info["data_offsets"]
    array = np.frombuffer(data[start:end], _DTYPES[info["dtype"]])
    tensors[name] = array.reshape(info["shape"])
  return tensors
