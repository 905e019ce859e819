"""Speed paths of the U-Net's layers, each next to the reference it must match.

A path is chosen by a config value. "auto" is resolved once per run, from the backend, by
`experiment.run.make_run` (with `resolve`), and the resolved value is what the run's config.json
records; model code never asks the backend. A network built directly from a config that still
says "auto" takes the reference path. `tests/test_fast_paths.py` compares each path with its
reference; measurements are in benchmarks/results/.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

GROUP_NORMS = ("fused", "reference")
# The fields of `FastPaths` that may be "auto", and what "auto" becomes on each backend (any
# backend not named takes "other"). Measured choices: benchmarks/results/train_step_gpu.md and
# benchmarks/backend_choices.py.
AUTO = {
  "recompute_dz": {"cpu": False, "other": True},
  "hold_branch_gradient": {"cpu": False, "other": True},
  "skips_in_parts": {"cpu": False, "other": True},
  "flash_attention": {"gpu": True, "other": False},
}
# model.conv: "auto" is Winograd for the larger float32 convolutions on a CPU, XLA's elsewhere.
CONV_AUTO = {"cpu": "winograd_large", "other": "xla"}


@dataclasses.dataclass(frozen=True)
class FastPaths:
  """Per-backend choices inside the U-Net's blocks (the config's `model.fast` section).

  Attributes:
    group_norm: "fused" (GroupNorm and swish as one operation with a hand-written gradient,
      `fast.groupnorm`) or "reference" (flax's nn.GroupNorm, then swish). The same parameters.
    recompute_dz: the fused GroupNorm's backward pass recomputes dz rather than keep it (less
      memory traffic; more arithmetic).
    hold_branch_gradient: residual blocks put an optimization barrier on their branch's
      gradient (`fast.skips.residual`), which keeps XLA from fusing the branch's bias gradient
      into a slow one-stage reduction on GPUs.
    skips_in_parts: the up path hands its ResBlocks (h, skip) rather than their concatenation
      (GroupNorm and the NIN projection read the parts; `fast.skips.SplitDense`).
    flash_attention: fused attention asks for cuDNN's flash attention (falling back to XLA's
      where cuDNN is absent or refuses the inputs).
  """

  group_norm: str = "fused"
  recompute_dz: bool = False
  hold_branch_gradient: bool = False
  skips_in_parts: bool = False
  flash_attention: bool = False


def _flag(name: str, value: Any) -> bool:
  """A config value "true" / "false" / "auto" (or a bool) as a bool; unresolved "auto" is False."""
  if isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ("true", "false", "auto"):
    return text == "true"
  raise ValueError(f"model.fast.{name}={value!r} must be true, false or auto")


def fast_paths_from(section: Any) -> FastPaths:
  """The `model.fast` section (mapping, attribute object or None) as a validated `FastPaths`."""
  if isinstance(section, FastPaths):
    return section
  if section is None:
    return FastPaths()
  get = section.get if isinstance(section, Mapping) else lambda k, d: getattr(section, k, d)
  defaults = FastPaths()
  group_norm = str(get("group_norm", defaults.group_norm))
  if group_norm not in GROUP_NORMS:
    raise ValueError(f"model.fast.group_norm={group_norm!r} is not one of {GROUP_NORMS}")
  flags = {name: _flag(name, get(name, getattr(defaults, name))) for name in AUTO}
  return FastPaths(group_norm=group_norm, **flags)


def resolve(name: str, value: Any, backend: str) -> Any:
  """`value` of `model.fast.<name>` (or "conv" for model.conv) with "auto" replaced for `backend`.

  Returns:
    For the fast flags, "true" or "false" (strings, as the config holds them); for conv, the
    algorithm name. Values other than "auto" come back as they are.
  """
  if str(value).strip().lower() != "auto":
    return value
  table = CONV_AUTO if name == "conv" else AUTO[name]
  choice = table.get(backend, table["other"])
  return choice if isinstance(choice, str) else ("true" if choice else "false")
