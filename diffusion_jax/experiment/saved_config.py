"""A run directory describes itself: WORKDIR/config.json is the config its checkpoints were made
with. Sampling and evaluation rebuild the network from it; a config that contradicts it is a
one-line error, not a checkpoint that fails to load.

`get_config(workdir)` makes this module a config file for `--config` (main.py uses it when
--config is omitted and the workdir has a config.json).
"""

import copy
import json
import os
from typing import Any

import ml_collections

from configs import default
from diffusion_jax.experiment import settings
from diffusion_jax.runtime.errors import ConfigError

# Fields that choose how the network computes, not what it is: a run may change them.
SPEED_FIELDS = (
  "model.conv",
  "model.attention",
  "model.remat",
  "model.microbatch",
  "model.dtype",
  "model.subpixel_upsample",
  "model.fast.",
)
# What must agree between a config and the run it resumes or samples.
IDENTITY_SECTIONS = ("model.", "diffusion.", "autoencoder.")
# Data fields that say where the data is on this machine, not what it is.
LOCAL_DATA_FIELDS = ("data_dir", "manual_dir", "read_threads", "prefetch")


def path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def _assign(config: ml_collections.ConfigDict, values: dict[str, Any], prefix: str = "") -> None:
  """Writes `values` (JSON, nested) into `config`, keeping its field types (lists -> tuples)."""
  for key, value in values.items():
    if key not in config:
      raise ConfigError(
        f"{prefix}{key} in the saved config.json is not a field of this version's config"
      )
    current = config[key]
    if isinstance(current, ml_collections.ConfigDict):
      _assign(current, value, f"{prefix}{key}.")
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def load(workdir: str) -> ml_collections.ConfigDict | None:
  """The config of the run in `workdir` (configs/default.py updated with its config.json), or
  None when the directory has no config.json."""
  try:
    with open(path(workdir)) as f:
      values = json.load(f)
  except (FileNotFoundError, NotADirectoryError):
    return None
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path(workdir)} is unreadable ({e}); pass --config=NAME") from None
  config = default.get_config()
  _assign(config, values)
  return config


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """For `--config=<this file>:WORKDIR`: the saved config of WORKDIR."""
  config = load(workdir)
  if config is None:
    raise ConfigError(f"{path(workdir)} does not exist; pass --config=NAME")
  return config


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value

  walk(config, "")
  return flat


def differences(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict) -> list[str]:
  """'field=given (the run: saved)' for every model or diffusion field that differs, speed
  fields aside."""
  given, theirs = _flat(config), _flat(saved)
  # A latent run's autoencoder section is its autoencoder run's, copied when it started.
  skip = ("autoencoder.",) if settings.is_latent(saved) else ()
  out = []
  for name in sorted(set(given) | set(theirs)):
    if not name.startswith(IDENTITY_SECTIONS) or name.startswith(SPEED_FIELDS + skip):
      continue
    if given.get(name) != theirs.get(name):
      out.append(f"{name}={given.get(name)!r} (the run: {theirs.get(name)!r})")
  return out


def reconcile(config: ml_collections.ConfigDict, workdir: str, mode: str):
  """The config a mode runs with, given the command line's `config` and the run in `workdir`.

  Training keeps `config` (train.* may change between the parts of a run). Sampling and
  evaluation take the run's saved config, with the command line's sample, eval and speed fields
  and its local data paths on top.

  Raises:
    ConfigError: `config` changes a model or diffusion field of the saved run (each named with
      both values).
  """
  saved = load(workdir)
  if saved is None:
    return config
  diffs = differences(config, saved)
  if diffs:
    raise ConfigError(
      f"--workdir={workdir} holds a run with another network or diffusion: {'; '.join(diffs)}. "
      "Use a new --workdir for a different model, or drop these overrides (with --workdir alone, "
      "the run's config.json is used)"
    )
  if mode == "train":
    if settings.is_latent(saved):  # The autoencoder and scale the run started with.
      config = copy.deepcopy(config)
      config.latent.autoencoder_workdir = saved.latent.autoencoder_workdir
      config.latent.scale_factor = config.latent.scale_factor or saved.latent.scale_factor
    return config
  result = saved
  with result.unlocked():
    result.sample = config.sample
    result.eval = config.eval
    for name in SPEED_FIELDS:
      if name.endswith("."):
        result.model.fast = config.model.fast
      else:
        result.model[name.split(".")[1]] = config.model[name.split(".")[1]]
    for name in LOCAL_DATA_FIELDS:
      result.data[name] = config.data[name]
    result.reuse_host_memory = config.reuse_host_memory
  return result
