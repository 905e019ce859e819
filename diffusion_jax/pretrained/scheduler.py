"""diffusers' `scheduler/scheduler_config.json` as the project's noise schedule and sampling grid.

The schedulers read here (`CLASSES`) all define β the same way, from `num_train_timesteps`,
`beta_start`, `beta_end`, `beta_schedule` and `trained_betas`; they differ in how they sample, which
the project's own samplers replace. diffusers computes β and ᾱ in float32; here they are computed
in float64 and cast once (`core.schedules.schedule_from_betas`), so they agree with diffusers'
formulas to float64 rounding and with its float32 tensors to float32 rounding.
"""

import dataclasses
import os

import numpy as np

from diffusion_jax.core.schedules import (
  Schedule,
  cosine_betas,
  linear_betas,
  scaled_linear_betas,
  schedule_from_betas,
)
from diffusion_jax.pretrained.files import WeightsError, read_config

CONFIG_NAME = "scheduler_config.json"

# Each supported class and its defaults where they differ between classes: timestep_spacing, and
# whether it clips the predicted x0 (only DDPM and DDIM have clip_sample).
CLASSES = {
  "DDPMScheduler": ("leading", True),
  "DDIMScheduler": ("leading", True),
  "PNDMScheduler": ("leading", False),
  "EulerDiscreteScheduler": ("linspace", False),
  "DPMSolverMultistepScheduler": ("linspace", False),
  "LMSDiscreteScheduler": ("linspace", False),
  "EulerAncestralDiscreteScheduler": ("linspace", False),
}

# diffusers' prediction_type -> the project's prediction (core.diffusion.PREDICTIONS).
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """What the project takes from a diffusers scheduler config."""

  class_name: str  # diffusers' `_class_name`, one of CLASSES
  betas: np.ndarray = dataclasses.field(repr=False)  # [T] float64 β_t, index t = diffusers' t
  num_train_timesteps: int  # T
  prediction: str  # "eps", "v" or "x0": what the model outputs
  steps_offset: int  # added to every "leading" inference timestep
  timestep_spacing: str  # one of SPACINGS: how set_timesteps spreads the inference steps
  clip_sample: (
    bool  # whether the predicted x0 is clipped to [-clip_sample_range, clip_sample_range]
  )
  clip_sample_range: float
  set_alpha_to_one: bool  # DDIM's last step ends at ᾱ = 1 (True) or at ᾱ_0 (False)

  @property
  def final_alpha_cumprod(self) -> float:
    """ᾱ after timestep 0 in DDIM's last step: 1, or ᾱ_0 as Stable Diffusion's configs ask."""
    return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 - β_s); [T] float64."""
    return np.cumprod(1.0 - self.betas)


def _config_path(folder: str) -> str:
  """The scheduler config of a scheduler folder, a pipeline root, or the file itself."""
  if os.path.isfile(folder):
    return folder
  for path in (os.path.join(folder, CONFIG_NAME), os.path.join(folder, "scheduler", CONFIG_NAME)):
    if os.path.isfile(path):
      return path
  raise WeightsError(f"{folder}: no {CONFIG_NAME} there or in its scheduler/ folder")


def _field(config: dict, path: str, name: str, valid) -> str:
  value = config.get(name)
  if value not in valid:
    raise WeightsError(
      f"{path}: {name}={value!r} is not supported; supported: {', '.join(map(str, valid))}"
    )
  return value


def _betas(config: dict, path: str, num_train_timesteps: int) -> np.ndarray:
  """β from the config's trained_betas, or its beta_schedule, as diffusers defines them."""
  if config.get("trained_betas") is not None:
    betas = np.asarray(config["trained_betas"], dtype=np.float64)
    if betas.shape != (num_train_timesteps,):
      raise WeightsError(
        f"{path}: trained_betas has shape {betas.shape}, not ({num_train_timesteps},)"
      )
    return betas
  schedule = _field({"beta_schedule": "linear", **config}, path, "beta_schedule", BETA_SCHEDULES)
  if schedule == "squaredcos_cap_v2":
    # diffusers' betas_for_alpha_bar: β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), 0.999), s = 0.008.
    return cosine_betas(num_train_timesteps, s=0.008, max_beta=0.999)
  start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
  make = linear_betas if schedule == "linear" else scaled_linear_betas
  return make(num_train_timesteps, beta_start=start, beta_end=end)


def load_scheduler(folder: str) -> SchedulerConfig:
  """Reads a diffusers scheduler config.

  Args:
    folder: a diffusers `scheduler/` folder, a pipeline root holding one, or the
      `scheduler_config.json` file itself.

  Returns:
    The SchedulerConfig, with fields absent from the file at the class's diffusers defaults.

  Raises:
    WeightsError: a missing file, an unsupported class or value (one line naming the field).
  """
  path = _config_path(folder)
  config = read_config(path)
  class_name = _field(config, path, "_class_name", tuple(CLASSES))
  default_spacing, has_clip = CLASSES[class_name]
  if config.get("rescale_betas_zero_snr"):
    raise WeightsError(f"{path}: rescale_betas_zero_snr=true is not supported")
  if config.get("thresholding"):
    raise WeightsError(f"{path}: thresholding=true is not supported")
  num_train_timesteps = int(config.get("num_train_timesteps", 1000))
  betas = _betas(config, path, num_train_timesteps)
  if not np.all((betas > 0) & (betas < 1)):
    raise WeightsError(f"{path}: betas must lie in (0, 1)")
  prediction = _field(
    {"prediction_type": "epsilon", **config}, path, "prediction_type", PREDICTIONS
  )
  spacing = _field(
    {"timestep_spacing": default_spacing, **config}, path, "timestep_spacing", SPACINGS
  )
  return SchedulerConfig(
    class_name=class_name,
    betas=betas,
    num_train_timesteps=num_train_timesteps,
    prediction=PREDICTIONS[prediction],
    steps_offset=int(config.get("steps_offset", 0)),
    timestep_spacing=spacing,
    clip_sample=bool(config.get("clip_sample", True)) if has_clip else False,
    clip_sample_range=float(config.get("clip_sample_range", 1.0)),
    set_alpha_to_one=bool(config.get("set_alpha_to_one", class_name != "PNDMScheduler")),
  )


def schedule(config: SchedulerConfig) -> Schedule:
  """The project's Schedule of a diffusers scheduler: β in float64, every array cast to float32.

  Args:
    config: from `load_scheduler`.

  Returns:
    A Schedule with num_timesteps = T; index t is diffusers' timestep t.
  """
  return schedule_from_betas(config.betas)


def inference_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
  """The timesteps of diffusers' `DDIMScheduler.set_timesteps(num_steps)` for this config.

  With T = num_train_timesteps and S = num_steps:
    leading:  t_k = k ⌊T/S⌋ + steps_offset, k = S-1, ..., 0;
    trailing: round(T, T - T/S, ..., T/S) - 1 (ends at T-1; steps_offset unused);
    linspace: round(linspace(0, T-1, S)) reversed (both ends; steps_offset unused).
  The integer grid of DDPM, DDIM and PNDM (without its PRK warm-up) in diffusers; Euler, LMS and
  DPM-Solver place float noise levels between these timesteps instead.

  Args:
    config: from `load_scheduler`.
    num_steps: S in [1, T].

  Returns:
    [S] int64 timesteps in [0, T), descending.
  """
  total = config.num_train_timesteps
  if not 1 <= num_steps <= total:
    raise ValueError(f"num_steps={num_steps} must be in [1, {total}]")
  # The same float64 arithmetic as diffusers, so the rounding agrees too.
  if config.timestep_spacing == "linspace":
    return np.linspace(0, total - 1, num_steps).round()[::-1].astype(np.int64)
  if config.timestep_spacing == "leading":
    step_ratio = total // num_steps
    timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.int64)
    timesteps = timesteps + config.steps_offset
    if timesteps[0] >= total:  # diffusers would index past ᾱ_{T-1} here
      raise ValueError(
        f"num_steps={num_steps} with steps_offset={config.steps_offset} reaches timestep "
        f"{timesteps[0]} >= {total}"
      )
    return timesteps
  step_ratio = total / num_steps
  return np.round(np.arange(total, 0, -step_ratio)).astype(np.int64) - 1
