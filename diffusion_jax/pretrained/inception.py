"""pytorch-fid's FID Inception-v3 weights as `models.FIDInceptionV3`, read without torch.

pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is a torch.save'd state dict; torch writes
two formats, both read here by `read_torch_state_dict`:
  - the zip format (torch >= 1.6): `<name>/data.pkl`, a pickle whose tensors refer to raw storages
    `<name>/data/<key>` by persistent ids ('storage', storage type, key, location, numel);
  - the legacy format: pickles of a magic number, the protocol version and system info, then the
    state dict (persistent ids with a sixth field), the list of storage keys, and per key an
    int64 element count followed by the storage's bytes.
The pickle is read by an unpickler that knows only what a state dict needs: OrderedDict, the torch
storage types (as NumPy dtypes) and `_rebuild_tensor_v2`; any other class it asks for is refused
with a WeightsError naming it, so a weights file can run no code. A `.safetensors` or `.npz` file
with the same tensor names is read as well.

`weight_map` is the table between the state dict's names and the flax parameters, used both ways
(`load_fid_inception`, `fid_inception_state_dict`): `X.conv.weight` -> `X/conv/kernel` ([O, I, kH,
kW] -> [kH, kW, I, O]), `X.bn.{weight, bias, running_mean, running_var}` -> `X/bn/{scale, bias,
mean, var}`, `fc.weight` -> `fc/kernel` ([O, I] -> [I, O]), `fc.bias` -> `fc/bias`, with X the
module path (`Mixed_5b.branch5x5_1` -> `Mixed_5b/branch5x5_1`). Batch norm's `num_batches_tracked`
counters are ignored.
"""

import collections
import functools
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from diffusion_jax.models.inception import INPUT_SIZE, FIDInceptionV3
from diffusion_jax.pretrained.files import WeightsError, read_safetensors
from diffusion_jax.pretrained.mapping import (
  Row,
  params_from_tensors,
  tensors_from_params,
  torch_shape,
)

URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
  "pt_inception-2015-12-05-6726825d.pth"
)
# Flax leaf name -> torch's, under a `conv`, `bn` or `fc` module.
_LEAVES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
_COUNTER = "num_batches_tracked"
# torch's storage types and the element types of their raw bytes.
_STORAGES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": jnp.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@functools.cache
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  init = functools.partial(FIDInceptionV3().init, logits=True)
  tree = jax.eval_shape(init, jax.random.key(0), images)["params"]
  return {path: leaf.shape for path, leaf in flatten_dict(tree).items()}


def weight_map() -> tuple[Row, ...]:
  """The table between pytorch-fid's state dict and `FIDInceptionV3`'s parameters.

  Returns:
    (tensor name, flax parameter path, torch shape) for every parameter, fc included.
  """
  return tuple(
    (".".join((*path[:-1], _LEAVES[path[-1]])), path, torch_shape(shape))
    for path, shape in _param_shapes().items()
  )


def fid_inception_state_dict(params: dict) -> dict[str, np.ndarray]:
  """{pytorch-fid's tensor name: float32 array in torch's layout}: the inverse of the loader's
  mapping (no `num_batches_tracked` counters)."""
  return tensors_from_params(params, weight_map())


def load_fid_inception(
  path: str | os.PathLike,
  *,
  dtype=jnp.float32,
  precision: jax.lax.PrecisionLike = None,
  conv: str = "auto",
) -> tuple[FIDInceptionV3, dict]:
  """pytorch-fid's FID Inception-v3 and its weights.

  Args:
    path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (from `URL`), or a .safetensors
      or .npz file of the same state dict.
    dtype: compute dtype of the network.
    precision: precision of its convolutions (see `FIDInceptionV3`).
    conv: its 3x3 convolutions (`FIDInceptionV3.conv`); "auto" is Winograd's algorithm where it
      is faster on a CPU backend ("winograd_large": about 1.3x faster, features within 5e-7
      relative L2) and XLA's convolution on other backends.

  Returns:
    (model, params): `model.apply({"params": params}, images)` is the [B, 2048] float32 pool
    features of [B, H, W, 3] images in [0, 1], and with `logits=True` also the [B, 1008] logits.
    params are float32 NumPy arrays; keep them out of any optimizer.

  Raises:
    WeightsError: a missing or unreadable file, a pickle asking for a class a state dict does not
      need, a missing or unexpected tensor or a wrong shape; one line naming it.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file; get pytorch-fid's FID Inception weights from {URL}")
  extension = os.path.splitext(path)[1]
  if extension == ".safetensors":
    tensors = read_safetensors(path)
  elif extension == ".npz":
    tensors = _read_npz(path)
  else:
    tensors = read_torch_state_dict(path)
  tensors = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] != _COUNTER}
  params = params_from_tensors(
    tensors, weight_map(), _param_shapes(), path, "pytorch-fid's FID Inception-v3"
  )
  if conv == "auto":
    conv = "winograd_large" if jax.default_backend() == "cpu" else "xla"
  return FIDInceptionV3(dtype=dtype, precision=precision, conv=conv), params


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile) as e:
    raise WeightsError(f"{path}: not a readable .npz file ({' '.join(str(e).split())})") from None


class _Storage:
  """A storage named by a persistent id; `array` is its flat data once read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, np.dtype(dtype), int(numel)
    self.array: np.ndarray | None = None


class _TensorRef:
  """What `_rebuild_tensor_v2` makes: a strided view of a storage, materialised later (a legacy
  file's storages follow the pickle)."""

  def __init__(self, storage, offset, size, stride, *unused):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _parameter(tensor, *unused):
  return tensor  # torch._utils._rebuild_parameter: a Parameter is its tensor here


_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _TensorRef,
  ("torch._utils", "_rebuild_parameter"): _parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
  """An unpickler of torch state dicts that refuses every other class."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self.source = source
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _GLOBALS:
      return _GLOBALS[module, name]
    if module == "torch" and name in _STORAGES:
      return np.dtype(_STORAGES[name])
    raise WeightsError(
      f"{self.source}: the pickle asks for {module}.{name}, which a state dict of tensors does "
      "not need; not loaded"
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise WeightsError(f"{self.source}: unknown persistent id {str(pid)[:80]!r} in the pickle")
    _, dtype, key, _, numel = pid[:5]
    if not isinstance(dtype, np.dtype):
      raise WeightsError(f"{self.source}: storage {key!r} has no torch storage type")
    return self.storages.setdefault(str(key), _Storage(str(key), dtype, numel))


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a torch.save'd state dict (zip or legacy format) as NumPy arrays, no torch.

  Args:
    path: the file.

  Returns:
    {name: array} with torch's shapes and dtypes (bfloat16 as ml_dtypes' bfloat16).

  Raises:
    WeightsError: not a torch file, a damaged one, a pickle asking for any class besides the
      storages, tensors and OrderedDict of a state dict, or not a flat {name: tensor} mapping.
  """
  try:
    state = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
  except WeightsError:
    raise
  except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise WeightsError(f"{path}: not a readable torch file ({reason})") from None
  except pickle.UnpicklingError as e:
    raise WeightsError(f"{path}: not a readable torch file (pickle: {e})") from None
  if not isinstance(state, dict):
    raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
  tensors = {}
  for name, value in state.items():
    if not isinstance(value, _TensorRef):
      raise WeightsError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor")
    tensors[name] = _materialise(value, path, name)
  return tensors


def _read_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise WeightsError(f"{path}: a zip file without one data.pkl, not a torch file")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in archive.namelist():
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    with archive.open(pickles[0]) as f:
      unpickler = _StateDictUnpickler(f, path)
      state = unpickler.load()
    for storage in unpickler.storages.values():
      data = archive.read(f"{prefix}data/{storage.key}")
      storage.array = _storage_array(data, storage, byteorder, path)
  return state


def _read_legacy(path: str):
  with open(path, "rb") as f:
    header = [_StateDictUnpickler(f, path).load() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC:
      raise WeightsError(f"{path}: neither a zip nor a legacy torch file")
    unpickler = _StateDictUnpickler(f, path)
    state = unpickler.load()
    keys = _StateDictUnpickler(f, path).load()
    for key in keys:
      storage = unpickler.storages[str(key)]
      numel = int.from_bytes(f.read(8), "little")
      storage.array = _storage_array(
        f.read(numel * storage.dtype.itemsize), storage, "little", path
      )
  return state


def _storage_array(data: bytes, storage: _Storage, byteorder: str, path: str) -> np.ndarray:
  dtype = storage.dtype if byteorder == "little" else storage.dtype.newbyteorder(">")
  if len(data) != storage.numel * dtype.itemsize:
    raise WeightsError(
      f"{path}: storage {storage.key!r} has {len(data)} bytes, expected "
      f"{storage.numel * dtype.itemsize}"
    )
  return np.frombuffer(data, dtype).astype(storage.dtype)


def _materialise(ref: _TensorRef, path: str, name: str) -> np.ndarray:
  """The tensor as a contiguous array: torch's strided view of its storage, bounds checked."""
  storage = ref.storage
  if storage.array is None:
    raise WeightsError(f"{path}: the data of tensor {name!r} is missing")
  if len(ref.size) != len(ref.stride) or min(ref.stride, default=0) < 0:
    raise WeightsError(f"{path}: tensor {name!r} has an invalid layout")
  if 0 in ref.size:
    return np.zeros(ref.size, storage.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
  if ref.offset < 0 or last >= storage.numel:
    raise WeightsError(f"{path}: tensor {name!r} reaches past the end of its storage")
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage.array[ref.offset :], ref.size, tuple(s * itemsize for s in ref.stride), writeable=False
  )
  return np.array(view, order="C")
