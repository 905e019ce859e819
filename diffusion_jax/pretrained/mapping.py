"""Published tensors to flax parameters and back, through a weight map.

A weight map is data: rows (tensor name, flax parameter path, torch shape), one per parameter,
built by each model's reader (`vae.weight_map`). Torch stores a convolution as [O, I, kH, kW] and
a linear layer as [O, I]; flax's kernels are [kH, kW, I, O] and [I, O]; a Dense kernel [I, O] also
stands for a torch 1x1 convolution [O, I, 1, 1]. Biases and norm parameters are the same vectors.
"""

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from diffusion_jax.pretrained.files import WeightsError

Row = tuple[str, tuple[str, ...], tuple[int, ...]]


def torch_shape(flax_shape: tuple[int, ...], linear: bool = True) -> tuple[int, ...]:
  """The torch shape of a flax parameter: a Dense kernel is a linear layer's or, with
  linear=False, a 1x1 convolution's."""
  if len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if len(flax_shape) == 2:
    i, o = flax_shape
    return (o, i) if linear else (o, i, 1, 1)
  return tuple(flax_shape)


def to_flax(tensor: np.ndarray, flax_ndim: int) -> np.ndarray:
  """A torch-layout tensor as a float32 flax parameter of rank `flax_ndim`."""
  x = np.asarray(tensor).astype(np.float32)
  if flax_ndim == 4:
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  if flax_ndim == 2:
    return np.ascontiguousarray(x.reshape(x.shape[:2]).T)
  return x


def to_torch(param, shape: tuple[int, ...]) -> np.ndarray:
  """A flax parameter as a float32 tensor of torch shape `shape`: the inverse of `to_flax`."""
  x = np.asarray(param, np.float32)
  if x.ndim == 4:
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  if x.ndim == 2:
    return np.ascontiguousarray(x.T.reshape(shape))
  return x


def check_tensor(
  tensors: dict, name: str, shape: tuple[int, ...], source: str, implied_by: str, shown: str = ""
) -> None:
  """Raises a one-line WeightsError unless tensors[name] exists with `shape`.

  Args:
    shown: the name as the file spells it, when it differs from `name` (a stripped prefix).
  """
  shown = shown or name
  if name not in tensors:
    raise WeightsError(f"{source}: missing tensor {shown!r} (shape {shape})")
  if tuple(tensors[name].shape) != shape:
    raise WeightsError(
      f"{source}: tensor {shown!r} has shape {tuple(tensors[name].shape)}, but {implied_by} "
      f"implies {shape}"
    )


def params_from_tensors(
  tensors: dict[str, np.ndarray],
  rows: tuple[Row, ...],
  flax_shapes: dict[tuple[str, ...], tuple[int, ...]],
  source: str,
  implied_by: str,
) -> dict:
  """The nested flax parameters of `tensors`, checked against the weight map.

  Args:
    tensors: {tensor name: array in torch's layout, any float dtype}.
    rows: the weight map.
    flax_shapes: {flax path: shape} of every parameter.
    source: the file, for messages.
    implied_by: what fixed the expected shapes (e.g. the config.json), for messages.

  Returns:
    The parameter tree, float32 NumPy arrays.

  Raises:
    WeightsError: a missing tensor, a wrong shape or an unexpected tensor; one line naming it.
  """
  for name, _, shape in rows:
    check_tensor(tensors, name, shape, source, implied_by)
  known = {name for name, _, _ in rows}
  for name, tensor in tensors.items():
    if name not in known:
      raise WeightsError(
        f"{source}: unexpected tensor {name!r} (shape {tuple(tensor.shape)}), not a parameter "
        f"of the model {implied_by} describes"
      )
  flat = {path: to_flax(tensors[name], len(flax_shapes[path])) for name, path, _ in rows}
  return unflatten_dict(flat)


def tensors_from_params(params: dict, rows: tuple[Row, ...]) -> dict[str, np.ndarray]:
  """{tensor name: float32 array in torch's layout}: the inverse of `params_from_tensors`."""
  flat = flatten_dict(params)
  return {name: to_torch(flat[path], shape) for name, path, shape in rows}
