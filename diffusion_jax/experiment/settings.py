"""The config's checks and its sections as frozen settings (`configs/default.py` holds every
default; nothing here supplies another)."""

import dataclasses
import math
from typing import Any, TypeVar

import ml_collections

from diffusion_jax.core import diffusion, losses
from diffusion_jax.experiment import studies
from diffusion_jax.models import check_model_config
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.sampling import samplers

# Sizes and counts: (field, least valid value).
_MINIMA = (
  ("train.batch_size", 1),
  ("train.num_steps", 0),
  ("train.log_every", 1),
  ("train.checkpoint_every", 1),
  ("train.sample_every", 0),
  ("train.num_grid_samples", 0),
  ("train.eval_every", 0),
  ("train.eval_samples", 2),
  ("train.keep_checkpoints", 1),
  ("train.keep_every", 0),
  ("sample.batch_size", 1),
  ("sample.num_samples", 1),
  ("eval.batch_size", 1),
  ("eval.num_examples", 0),
  ("eval.num_samples", 1),
  ("eval.num_reference", 2),
  ("eval.kid_subset_size", 2),
  ("data.image_size", 1),
)


def _check_sizes(config: ml_collections.ConfigDict) -> None:
  for name, least in _MINIMA:
    section, field = name.split(".")
    value = config[section][field]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      kind = "a positive integer" if least == 1 else "an integer >= 0"
      raise ConfigError(f"{name}={value!r} must be {kind}: set --config.{name}")


# model.name of a run that trains the `autoencoder` section's network.
AUTOENCODER = "autoencoder"
# model.name of a run that fine-tunes the U-Net of config.pretrained (`finetune.py`).
STABLE_DIFFUSION = "stable_diffusion"


def is_latent(config: ml_collections.ConfigDict) -> bool:
  """Whether the diffusion model works on an autoencoder's latents (`experiment/latent.py`)."""
  section = config.get("latent")
  return bool(section and (section.autoencoder_workdir or section.autoencoder_config))


def network_image_size(config: ml_collections.ConfigDict) -> int:
  """The side of what the diffusion model sees: data.image_size, or for a latent run the
  latents' data.image_size / f.

  Raises:
    ConfigError: f does not divide data.image_size.
  """
  size = int(config.data.image_size)
  if not is_latent(config):
    return size
  f = 2 ** (len(config.autoencoder.channel_mult) - 1)
  if size % f:
    raise ConfigError(
      f"data.image_size={size} is not a multiple of the autoencoder's downsampling factor {f}"
    )
  return size // f


def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Validates the config before anything is compiled; raises ConfigError (one line)."""
  _check_sizes(config)
  try:
    # An autoencoder is checked by `autoencoder.py`, a published U-Net by its loader.
    if config.model.name not in (AUTOENCODER, STABLE_DIFFUSION):
      check_model_config(config.model, network_image_size(config))
    parallel.check_batch_size(config.train.batch_size, mesh)
    parallel.check_batch_size(config.sample.batch_size, mesh, field="sample.batch_size")
    samplers.check_sampler(
      config.sample.sampler,
      config.sample.num_steps,
      config.diffusion.num_timesteps,
      skip=config.sample.skip,
      eta=config.sample.eta,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if config.train.grid_sampler:
    try:
      samplers.check_sampler(
        config.train.grid_sampler,
        grid_num_steps(config.train.grid_num_steps, config.diffusion.num_timesteps),
        config.diffusion.num_timesteps,
      )
    except ValueError as e:
      raise ConfigError(f"train.grid_sampler / train.grid_num_steps: {e}") from e
  study_seeds(config)
  sample_seeds(config)
  seed_batching(config)
  check_super_res(config)
  if config.diffusion.variance not in diffusion.VARIANCES:
    raise ConfigError(
      f"diffusion.variance={config.diffusion.variance!r} is unknown; "
      f"valid: {', '.join(diffusion.VARIANCES)}"
    )
  loss_type = config.diffusion.loss
  if loss_type not in losses.LOSS_TYPES:
    raise ConfigError(
      f"diffusion.loss={loss_type!r} is unknown; valid: {', '.join(losses.LOSS_TYPES)}"
    )
  try:
    losses.check_loss(loss_type, config.diffusion.variance)
  except ValueError as e:
    raise ConfigError(f"diffusion.loss={loss_type!r}: {e}") from e
  data_channels = config.autoencoder.z_channels if is_latent(config) else 3
  channels = diffusion.output_channels(data_channels, config.diffusion.variance)
  if config.model.name != AUTOENCODER and config.model.out_channels != channels:
    what = f" and {data_channels} latent channels" if is_latent(config) else ""
    raise ConfigError(
      f"model.out_channels={config.model.out_channels} does not fit "
      f"diffusion.variance={config.diffusion.variance!r}{what}; set it to {channels}"
    )
  if config.diffusion.t_sampling not in T_SAMPLING:
    raise ConfigError(
      f"diffusion.t_sampling={config.diffusion.t_sampling!r} is unknown; "
      f"valid: {', '.join(T_SAMPLING)}"
    )
  drop_prob = config.train.cond_drop_prob
  if not 0.0 <= drop_prob <= 1.0:
    raise ConfigError(f"train.cond_drop_prob={drop_prob} must be a probability in [0, 1]")
  scale = config.sample.guidance_scale
  if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
    raise ConfigError(f"sample.guidance_scale={scale!r} must be a finite number (e.g. 3)")
  _check_threshold(config.diffusion)
  if config.diffusion.prediction not in diffusion.PREDICTIONS:
    raise ConfigError(
      f"diffusion.prediction={config.diffusion.prediction!r} is unknown; "
      f"valid: {', '.join(diffusion.PREDICTIONS)}"
    )
  chunk = config.model.microbatch
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ConfigError(
      f"model.microbatch={chunk!r} must be an integer >= 0 (examples per network call on each "
      "device; 0: the whole batch)"
    )
  k = config.train.steps_per_call
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"train.steps_per_call={k!r} must be a positive integer (1: one step)")
  if k > 1 and study_seeds(config) is not None:
    raise ConfigError(
      f"train.steps_per_call={k} cannot be combined with a seed study (seeds="
      f"{config.seeds!r}); set train.steps_per_call=1"
    )


def _check_threshold(section: ml_collections.ConfigDict) -> None:
  try:
    diffusion.check_threshold(section.threshold, section.threshold_percentile, prefix="diffusion.")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if not section.clip_x0 and section.threshold == "dynamic":
    raise ConfigError(
      "diffusion.threshold='dynamic' needs diffusion.clip_x0=True (False turns thresholding off)"
    )


def grid_num_steps(num_steps: int, num_timesteps: int) -> int:
  """The preview sampler's steps: train.grid_num_steps, at most T."""
  return min(int(num_steps), int(num_timesteps))


def grid_sampler(sampler: str, num_steps: int, num_timesteps: int) -> tuple[dict, str]:
  """(sampler options, file-name suffix) of the training-time preview grids; ({}, "") for the
  sample section's sampler (train.grid_sampler="")."""
  if not sampler:
    return {}, ""
  steps = grid_num_steps(num_steps, num_timesteps)
  return {"sampler": sampler, "num_steps": steps, "skip": ""}, f"_{sampler}_{steps}steps"


def study_seeds(config: ml_collections.ConfigDict) -> list[int] | None:
  """The seeds of a training seed study (`config.seeds`), or None for a single run."""
  try:
    return studies.parse_seeds(config.seeds) or None
  except ValueError as e:
    raise ConfigError(str(e)) from e


SEED_BATCHING = ("auto", "vmap", "unroll")
# What "auto" becomes, by backend (a run resolves it in `run.resolve_auto`).
SEED_BATCHING_AUTO = {"cpu": "unroll", "other": "vmap"}
T_SAMPLING = ("uniform", "importance")


def seed_batching(config: ml_collections.ConfigDict) -> str:
  """How the seeds of a study share the program: "vmap" or "unroll" (configs/default.py); the
  config's value, which `run.resolve_auto` has made concrete in a run."""
  mode = config.train.seed_batching
  if mode not in SEED_BATCHING:
    raise ConfigError(f"train.seed_batching={mode!r} is unknown; valid: {', '.join(SEED_BATCHING)}")
  return mode


def sample_seeds(config: ml_collections.ConfigDict) -> list[int] | None:
  """The sample seeds of a sampling seed study (`config.sample.seeds`), or None."""
  try:
    return studies.parse_seeds(config.sample.seeds, field="sample.seeds") or None
  except ValueError as e:
    raise ConfigError(str(e)) from e


# ---------------------------------------------------------------- frozen settings


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The `train` section (meanings in configs/default.py)."""

  batch_size: int
  num_steps: int
  learning_rate: float
  warmup_steps: int
  cooldown_steps: int
  adam_b1: float
  adam_b2: float
  adam_eps: float
  grad_clip: float
  ema_decay: float
  log_every: int
  checkpoint_every: int
  sample_every: int
  num_grid_samples: int
  eval_every: int
  eval_samples: int
  grid_sampler: str
  grid_num_steps: int
  keep_checkpoints: int
  keep_every: int
  steps_per_call: int
  progress: bool
  seed_batching: str
  cond_drop_prob: float


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  """The `diffusion` section (meanings in configs/default.py)."""

  schedule: str
  num_timesteps: int
  beta_start: float
  beta_end: float
  cosine_s: float
  variance: str
  clip_x0: bool
  threshold: str
  threshold_percentile: float
  prediction: str
  loss: str
  vlb_weight: float
  t_sampling: str


def x0_threshold(diffusion_settings: DiffusionSettings) -> str:
  """The samplers' treatment of x̂0: diffusion.threshold, or "none" when clip_x0 is off."""
  return diffusion_settings.threshold if diffusion_settings.clip_x0 else "none"


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """The `sample` section (meanings in configs/default.py)."""

  sampler: str
  num_steps: int | None
  eta: float
  skip: str
  num_samples: int
  save_images: bool
  batch_size: int
  seed: int
  seeds: str
  prompt: str | None
  prompts_file: str
  guidance_scale: float


@dataclasses.dataclass(frozen=True)
class SuperResSettings:
  """The `sr` section: a super-resolution model's noise augmentation (meanings in
  configs/default.py)."""

  aug_level: float
  max_train_aug_level: float


def check_super_res(config: ml_collections.ConfigDict) -> None:
  """Checks the `sr` section and where model.low_res_size can be used; raises ConfigError."""
  for name in ("aug_level", "max_train_aug_level"):
    if "sr" not in config or name not in config.sr:
      raise ConfigError(f"the config has no field sr.{name}; build configs on configs/default.py")
    value = config.sr[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
      raise ConfigError(f"sr.{name}={value!r} must be a number in [0, 1]")
  if not config.model.get("low_res_size", 0):
    return
  if is_latent(config) or config.model.name != "unet":
    raise ConfigError(
      f"model.low_res_size={config.model.low_res_size}: super-resolution works on pixels with "
      "model.name='unet' (not a latent or autoencoder run); set model.low_res_size=0"
    )


S = TypeVar("S")


def from_section(cls: type[S], section: Any, name: str) -> S:
  """`cls` with each field read from the config section `name`; a missing field is a ConfigError
  (a config must start from configs/default.py, which has them all)."""
  values = {}
  for field in dataclasses.fields(cls):
    if field.name not in section:
      raise ConfigError(
        f"the config has no field {name}.{field.name}; build configs on configs/default.py"
      )
    values[field.name] = section[field.name]
  return cls(**values)
