"""LPIPS (Zhang et al. 2018) on VGG16, version 0.1: the perceptual loss of LDM's autoencoder.

d(x0, x1) = sum_l mean_{h,w} w_l . (n_l(x0) - n_l(x1))^2, where n_l is VGG16's relu{1_2, 2_2, 3_3,
4_3, 5_3} activation of the scaled image (x - shift) / scale, unit-normalised over channels, and
w_l >= 0 are the learned 1x1 "lin" layers: the `lpips` package's
`LPIPS(net='vgg', version='0.1', lpips=True, spatial=False)` with normalize=False.

Weights come from one local .npz file holding the `lpips` module's PyTorch state dict (torch
layouts), written once by `benchmarks/convert_lpips.py`. Parameter paths are its keys with each
block's dotted index path joined by "_": `net.slice1.0.weight` -> `net/slice1_0/kernel`,
`lin0.model.1.weight` -> `lin0_model_1/kernel`. `WEIGHT_MAP` is the table, used both ways.
"""

import os
import zipfile

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The scaling layer of version 0.1: ImageNet's mean and std, mapped to [-1, 1] images.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# lpips' normalize_tensor epsilon, added to the norm.
_EPS = 1e-10

# VGG16's convolutions up to relu5_3 as (slice, torchvision `features` index, output channels);
# slices 2 to 5 start with a 2x2 max-pool, every conv is 3x3 with padding 1 and then a ReLU.
VGG16_CONVS = (
  (1, 0, 64),
  (1, 2, 64),
  (2, 5, 128),
  (2, 7, 128),
  (3, 10, 256),
  (3, 12, 256),
  (3, 14, 256),
  (4, 17, 512),
  (4, 19, 512),
  (4, 21, 512),
  (5, 24, 512),
  (5, 26, 512),
  (5, 28, 512),
)
# Channels of the five compared activations (the inputs of lin0..lin4).
CHANNELS = (64, 128, 256, 512, 512)


def _weight_map() -> tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...]:
  """(torch key, flax parameter path, torch shape) of every tensor of the state dict."""
  rows, in_channels = [], 3
  for s, i, out in VGG16_CONVS:
    rows.append(
      (f"net.slice{s}.{i}.weight", ("net", f"slice{s}_{i}", "kernel"), (out, in_channels, 3, 3))
    )
    rows.append((f"net.slice{s}.{i}.bias", ("net", f"slice{s}_{i}", "bias"), (out,)))
    in_channels = out
  for layer, c in enumerate(CHANNELS):
    rows.append((f"lin{layer}.model.1.weight", (f"lin{layer}_model_1", "kernel"), (1, c, 1, 1)))
  return tuple(rows)


# Torch conv weights are [O, I, H, W], flax's kernels [H, W, I, O]; biases are the same.
WEIGHT_MAP = _weight_map()

_MAKE_FILE = (
  "make it once from torchvision's vgg16-397923af.pth and the lpips package's "
  "weights/v0.1/vgg.pth with `python benchmarks/convert_lpips.py` (needs torch)"
)


def unit_normalize(x: jax.Array) -> jax.Array:
  """x / (||x|| + 1e-10) with the norm over channels, as lpips' normalize_tensor.

  The gradient is finite where a feature vector is all zeros (sqrt's is not at 0).

  Args:
    x: [B, H, W, C] activations.

  Returns:
    [B, H, W, C] float32, each pixel's channel vector of norm 1 (or 0 where x is 0).
  """
  x = x.astype(jnp.float32)
  sumsq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = sumsq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sumsq, 1.0)), 0.0)
  return x / (norm + _EPS)


class VGG16Features(nn.Module):
  """torchvision's VGG16 `features` up to relu5_3, returning the five activations lpips uses.

  Attributes:
    dtype: compute dtype; parameters are float32.
  """

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Applies the network.

    Args:
      x: [B, H, W, 3] image, already scaled (ImageNet-normalised).

    Returns:
      relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: [B, H / 2**k, W / 2**k, CHANNELS[k]] in
      `dtype` for k = 0..4 (sizes rounded down, as torch's max-pool).
    """
    outs, h = [], x.astype(self.dtype)
    for s, i, out in VGG16_CONVS:
      if len(outs) < s - 1:
        outs.append(h)
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
      conv = nn.Conv(
        out,
        (3, 3),
        padding=((1, 1), (1, 1)),
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=f"slice{s}_{i}",
      )
      h = nn.relu(conv(h))
    return (*outs, h)


class LPIPS(nn.Module):
  """The LPIPS distance on VGG16, version 0.1 (lpips' `LPIPS(net='vgg')`).

  Attributes:
    dtype: compute dtype of VGG16; the normalisation and the distance are float32.
  """

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    """The perceptual distance between two batches of images.

    Args:
      x0: [B, H, W, 3] float images in [-1, 1].
      x1: [B, H, W, 3] float images in [-1, 1].

    Returns:
      [B] float32 distances d(x0[b], x1[b]) >= 0 (with the official non-negative lin weights);
      d(x, x) = 0 and d is symmetric.
    """
    chex.assert_rank(x0, 4)
    chex.assert_equal_shape((x0, x1))
    chex.assert_axis_dimension(x0, 3, 3)
    batch = x0.shape[0]
    x = jnp.concatenate([x0, x1], axis=0).astype(jnp.float32)
    x = (x - jnp.asarray(_SHIFT, jnp.float32)) / jnp.asarray(_SCALE, jnp.float32)
    feats = VGG16Features(self.dtype, name="net")(x)
    total = jnp.zeros((batch,), jnp.float32)
    for layer, f in enumerate(feats):
      f = unit_normalize(f)
      diff = jnp.square(f[:batch] - f[batch:])
      lin = nn.Conv(1, (1, 1), use_bias=False, param_dtype=jnp.float32, name=f"lin{layer}_model_1")
      total = total + jnp.mean(lin(diff), axis=(1, 2, 3))
    return total


def state_dict_to_params(state_dict, source: str = "the state dict") -> dict:
  """Flax parameters of `LPIPS` from the lpips module's PyTorch state dict.

  Args:
    state_dict: mapping of every `WEIGHT_MAP` torch key to an array in torch's layout.
    source: what the mapping was read from, for the error messages (e.g. the file name).

  Returns:
    The nested float32 numpy parameters for `LPIPS().apply({"params": params}, x0, x1)`.

  Raises:
    ValueError: one line naming the first missing key, unexpected key or wrongly shaped array.
  """
  expected = {key: shape for key, _, shape in WEIGHT_MAP}
  for key in expected:
    if key not in state_dict:
      raise ValueError(f"{source}: missing key {key!r}; {_MAKE_FILE}.")
  for key in state_dict:
    if key not in expected:
      raise ValueError(f"{source}: unexpected key {key!r}; {_MAKE_FILE}.")
  params = {}
  for key, path, shape in WEIGHT_MAP:
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != shape:
      raise ValueError(
        f"{source}: {key!r} has shape {value.shape}, expected {shape} (torch layout)."
      )
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  return params


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  """The inverse of `state_dict_to_params`: {torch key: float32 array in torch's layout}."""
  state_dict = {}
  for key, path, _ in WEIGHT_MAP:
    value = params
    for name in path:
      value = value[name]
    value = np.asarray(value, np.float32)
    state_dict[key] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
  return state_dict


def load_lpips(path: str | os.PathLike, dtype=jnp.float32) -> tuple[LPIPS, dict]:
  """The LPIPS module and its parameters from one .npz file of the lpips state dict.

  Args:
    path: the .npz file written by `benchmarks/convert_lpips.py` (keys: the lpips `LPIPS`
      module's state-dict names, arrays in torch's layout).
    dtype: compute dtype of VGG16.

  Returns:
    (module, params): `module.apply({"params": params}, x0, x1)` is the [B] float32 distance.
    Keep the parameters out of any optimizer (`jax.lax.stop_gradient` or a mask).

  Raises:
    FileNotFoundError: no file at `path`; the message says how to make it.
    ValueError: a missing, unexpected or wrongly shaped key (one line naming it and the file),
      or a file that is not an .npz archive.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LPIPS weights file {path!r} not found; {_MAKE_FILE}.")
  return LPIPS(dtype=dtype), state_dict_to_params(_read_npz(path), source=path)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an .npz file; a damaged or foreign file is a one-line ValueError."""
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError("a single array, not an .npz archive")
    with data:
      return {key: data[key] for key in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    reason = " ".join(str(e).split()) or type(e).__name__
    raise ValueError(f"{path}: not a readable .npz weights file ({reason}); {_MAKE_FILE}.") from e
