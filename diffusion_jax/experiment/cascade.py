"""A cascade (Imagen): a base model and super-resolution stages, each its own run, run in turn.

The `cascade` section of a config lists the stages, base first: each a run directory and the
config that trains it. `--mode=train` trains (or resumes) each stage in its own directory;
`--mode=sample` draws sample.num_samples images per prompt from the base run's latest
checkpoint and enlarges them with each super-resolution stage in turn, each stage with its own
sampler, step count, guidance and augmentation level.

Stage k's input is stage k-1's output as written (uint8, so a cascade equals its stages run one
after the other on saved images). Stage 0 draws with --mode=sample's key for (seed,
sample.seed), stage k > 0 with that key folded with k; every stage draws image i from its key
folded with i, so image i of the final output depends only on (seed, sample.seed, i).
"""

import dataclasses
import importlib
import importlib.util
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import data
from diffusion_jax.core import rng
from diffusion_jax.experiment import generate, sample_mode, saved_config, train
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime.errors import ConfigError

# Per-stage settings of the `cascade` section: comma-separated, one item per stage; an empty
# item keeps the stage run's own value.
_PER_STAGE = {
  "samplers": ("sample", "sampler", str),
  "num_steps": ("sample", "num_steps", int),
  "guidance_scales": ("sample", "guidance_scale", float),
  "aug_levels": ("sr", "aug_level", float),
  "batch_sizes": ("sample", "batch_size", int),
}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its position, run directory and config (the run's saved one when it has one)."""

  index: int
  workdir: str
  config: ml_collections.ConfigDict


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` describes a cascade (cascade.configs or cascade.workdirs set)."""
  section = config.get("cascade")
  return bool(section and (section.configs or section.workdirs))


def _items(value: str, field: str, count: int) -> list[str]:
  items = [item.strip() for item in str(value).split(",")] if str(value).strip() else []
  if items and len(items) != count:
    raise ConfigError(
      f"cascade.{field}={value!r} has {len(items)} items for a cascade of {count} stages"
    )
  return items or [""] * count


def _stage_config(name: str, stage_workdir: str, index: int) -> ml_collections.ConfigDict:
  """The stage run's saved config, else configs/<name>.py (or the .py file `name` names)."""
  saved = saved_config.load(stage_workdir)
  if saved is not None:
    return saved
  if not name:
    raise ConfigError(
      f"cascade stage {index}: {stage_workdir} holds no run and cascade.configs names no config "
      "to train it with"
    )
  try:
    if name.endswith(".py"):
      spec = importlib.util.spec_from_file_location("cascade_stage", name)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
    else:
      module = importlib.import_module(f"configs.{name}")
  except (ImportError, FileNotFoundError) as e:
    raise ConfigError(f"cascade.configs: stage {index}'s config {name!r} not found: {e}") from None
  return module.get_config()


def stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
  """The stages of the cascade in `workdir`, with the per-stage settings applied.

  Stage k runs in the k-th of cascade.workdirs, or WORKDIR/<its config name> when that list is
  empty.

  Raises:
    ConfigError: lists of different lengths, a stage with neither a run nor a config, a base
      stage that enlarges or a later one that does not enlarge the stage before it.
  """
  section = config.cascade
  names = [n.strip() for n in section.configs.split(",")] if section.configs.strip() else []
  dirs = [d.strip() for d in section.workdirs.split(",")] if section.workdirs.strip() else []
  if names and dirs and len(names) != len(dirs):
    raise ConfigError(
      f"cascade.configs names {len(names)} stages and cascade.workdirs {len(dirs)}; give one "
      "item per stage"
    )
  count = len(names) or len(dirs)
  names = names or [""] * count
  dirs = dirs or [os.path.join(workdir, os.path.splitext(os.path.basename(n))[0]) for n in names]
  settings_per_stage = {f: _items(section[f], f, count) for f in _PER_STAGE}
  result = []
  for k, (name, stage_workdir) in enumerate(zip(names, dirs, strict=True)):
    stage_config = _stage_config(name, stage_workdir, k)
    for field, (part, key, kind) in _PER_STAGE.items():
      value = settings_per_stage[field][k]
      if value:
        try:
          stage_config[part][key] = kind(value)
        except ValueError:
          raise ConfigError(f"cascade.{field}: {value!r} is not a valid {kind.__name__}") from None
    stage_config.train.progress = config.train.progress
    result.append(Stage(k, stage_workdir, stage_config))
  _check_sizes(result)
  return result


def _check_sizes(result: list[Stage]) -> None:
  previous = None
  for stage in result:
    low = int(stage.config.model.low_res_size)
    size = int(stage.config.data.image_size)
    if stage.index == 0 and low:
      raise ConfigError(
        f"cascade stage 0 ({stage.workdir}) is a super-resolution model; the first stage must "
        "draw images from noise"
      )
    if stage.index > 0 and low != previous:
      what = f"takes {low}x{low} inputs" if low else "is no super-resolution model"
      raise ConfigError(
        f"cascade stage {stage.index} ({stage.workdir}) {what}, but stage {stage.index - 1} "
        f"draws {previous}x{previous} images"
      )
    previous = size


def train_stages(config: ml_collections.ConfigDict, workdir: str) -> None:
  """--mode=train: trains (or resumes) each stage in its own directory, base first."""
  for stage in stages(config, workdir):
    logging.info("cascade stage %d: training in %s", stage.index, stage.workdir)
    train.train_and_evaluate(stage.config, stage.workdir)


def sample(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, str, np.ndarray]]:
  """--mode=sample: sample.num_samples images per prompt through every stage.

  Writes WORKDIR/samples/cascade_seed<seed>_stage<k>.{png,npz} per stage (a super-resolution
  stage's grid shows each input left of its output, and its npz keeps the inputs as
  "low_res"); the last stage's files are the cascade's output.

  Returns:
    [(png path, npz path, uint8 images [N, H, W, C])] per stage.

  Raises:
    ConfigError: a stage without a checkpoint (see also `stages`).
  """
  all_stages = stages(config, workdir)
  base_run = run_lib.make_run(all_stages[0].config)
  prompt_list = sample_mode.prompts(base_run, config)
  per_prompt = config.sample.num_samples
  key = jax.random.fold_in(rng.stream_key(config.seed, rng.SAMPLE), config.sample.seed + 1)
  written, previous = [], None
  for stage in all_stages:
    run = base_run if stage.index == 0 else run_lib.make_run(stage.config)
    try:
      state = sample_mode.restore(run, stage.workdir)
    except ConfigError as e:
      raise ConfigError(f"cascade stage {stage.index}: {e}") from None
    # A text-conditional stage after an unconditional base gets the empty prompt.
    listed = prompt_list or [""]
    count, condition = per_prompt * len(listed), None
    if run.cond_kind != "none":
      condition = run.prompt_condition(listed)
      condition = {k: np.repeat(v, per_prompt, axis=0) for k, v in condition.items()}
    extra = {"guidance_scale": np.float32(run.sample.guidance_scale)}
    if previous is not None:
      condition = {**(condition or {}), "low_res": data.normalize_images(previous)}
      extra["low_res"] = condition["low_res"]
    stage_key = key if stage.index == 0 else jax.random.fold_in(key, stage.index)
    sample_fn = run.sample_fn(progress=generate.SampleProgress(show=config.train.progress))
    logging.info(
      "cascade stage %d (%s, step %d): %d images at %dx%d",
      stage.index,
      stage.workdir,
      int(state.step),
      count,
      *run.image_shape[:2],
    )
    images = generate.generate(
      sample_fn, state.ema_params, stage_key, count, run.sample.batch_size, condition
    )
    name = f"cascade_seed{config.sample.seed}_stage{stage.index}"
    png, npz = generate.write_samples(workdir, name, images, prompts=prompt_list, **extra)
    written.append((png, npz, images))
    previous = images
  return written
