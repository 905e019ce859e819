"""Writes the LPIPS weights file that `diffusion_jax.models.lpips.load_lpips` reads (run once).

LPIPS on VGG16, version 0.1 (Zhang et al. 2018), as LDM's autoencoder training uses it, needs two
PyTorch files, which this script merges into one .npz of the lpips package's `LPIPS(net='vgg')`
state dict (keys `net.slice{s}.{i}.weight|bias` and `lin{l}.model.1.weight`, torch layouts):

  vgg16-397923af.pth  torchvision's ImageNet VGG16, from
                      https://download.pytorch.org/models/vgg16-397923af.pth (torchvision caches
                      it in ~/.cache/torch/hub/checkpoints/ once `models.vgg16(weights=...)` ran);
                      only its `features` convolutions up to relu5_3 are kept.
  vgg.pth             the calibrated linear layers, shipped in the lpips pip package as
                      lpips/weights/v0.1/vgg.pth (`pip install lpips`, then look in its
                      site-packages folder; or `pip download lpips` and unzip the wheel).

Needs torch and numpy (torch stays out of the project's requirements; the package never imports
this script). Run from the repository root:

  python benchmarks/convert_lpips.py --vgg16=vgg16-397923af.pth --lin=vgg.pth --out=lpips_vgg.npz

When diffusion_jax is importable too, the written file is loaded back with `load_lpips` as a check.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# lpips' slices of torchvision's VGG16 `features`: slice s holds the modules [start, stop).
_SLICES = ((1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30))
_LIN_KEYS = tuple(f"lin{layer}.model.1.weight" for layer in range(5))


def _read(path: str) -> dict[str, np.ndarray]:
  """A torch state dict file as {key: float32 numpy array}."""
  if not os.path.isfile(path):
    raise SystemExit(
      f"{path}: no such file; see `python {sys.argv[0]} --help` for where to get it."
    )
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()}


def _slice_of(index: int) -> int | None:
  for s, start, stop in _SLICES:
    if start <= index < stop:
      return s
  return None


def lpips_state_dict(vgg16: dict, lin: dict) -> dict[str, np.ndarray]:
  """lpips' `LPIPS(net='vgg')` state dict from torchvision's VGG16 one and lpips' vgg.pth.

  Args:
    vgg16: torchvision's VGG16 state dict (`features.{i}.weight|bias`, `classifier.*`).
    lin: lpips' v0.1 vgg.pth state dict (`lin{l}.model.1.weight`, l = 0..4).

  Returns:
    {`net.slice{s}.{i}.weight|bias` and `lin{l}.model.1.weight`: array in torch's layout}, without
    the scaling layer's buffers (constants of version 0.1).
  """
  state = {}
  for key, value in vgg16.items():
    parts = key.split(".")
    if parts[0] != "features":
      continue  # the classifier
    s = _slice_of(int(parts[1]))
    if s is None:
      raise SystemExit(f"VGG16 file: unexpected key {key!r} beyond relu5_3.")
    state[f"net.slice{s}.{parts[1]}.{parts[2]}"] = value
  if len(state) != 26:
    raise SystemExit(f"VGG16 file: {len(state)} `features` tensors, expected VGG16's 26.")
  for key in _LIN_KEYS:
    if key not in lin:
      raise SystemExit(f"lin file: missing key {key!r}; is it lpips/weights/v0.1/vgg.pth?")
  extra = sorted(set(lin) - set(_LIN_KEYS))
  if extra:
    raise SystemExit(f"lin file: unexpected key {extra[0]!r}; is it lpips/weights/v0.1/vgg.pth?")
  return {**state, **{key: lin[key] for key in _LIN_KEYS}}


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--vgg16", required=True, help="torchvision's vgg16-397923af.pth")
  parser.add_argument("--lin", required=True, help="lpips' weights/v0.1/vgg.pth")
  parser.add_argument("--out", default="lpips_vgg.npz", help="the .npz file to write")
  args = parser.parse_args()
  state = lpips_state_dict(_read(args.vgg16), _read(args.lin))
  tmp = args.out + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **state)
  os.replace(tmp, args.out)
  num = sum(v.size for v in state.values())
  print(f"wrote {args.out}: {len(state)} tensors, {num:,} parameters")
  try:
    from diffusion_jax.models import lpips
  except ImportError:
    print("diffusion_jax (jax, flax) is not importable here: the file was not loaded back.")
    return
  lpips.load_lpips(args.out)
  print("load_lpips reads it.")


if __name__ == "__main__":
  main()
