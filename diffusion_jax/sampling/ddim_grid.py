"""Deterministic DDIM on a given timestep grid from a given x_t: the step of diffusers'
`DDIMScheduler`, for published schedules, image-to-image (a grid that starts part-way) and
inpainting by latent blending.

Each step goes from grid timestep t to t' = t - T // S (S: the steps of the full grid), as
diffusers does whatever the spacing, with ᾱ_{t'} = `final_alpha_cumprod` below 0:

    x_{t'} = √ᾱ_{t'} x̂0 + √(1 - ᾱ_{t'}) ε̂.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core.diffusion import DenoiseFn, threshold_x0, x0_threshold
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.sampling.solvers import model_predictions

# (x_{t'} [B, ...], t' [] int32 (-1 after the last step)) -> x_{t'} with known parts restored.
BlendFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_grid_sample(
  denoise_fn: DenoiseFn,
  schedule: Schedule,
  x: jax.Array,
  timesteps,
  step_size: int,
  *,
  final_alpha_cumprod: float = 1.0,
  prediction: str = "eps",
  clip_x0: bool = False,
  threshold: str | None = None,
  threshold_percentile: float = 0.995,
  blend_fn: BlendFn | None = None,
) -> jax.Array:
  """Runs DDIM (η = 0) from x at timesteps[0] through every timestep of the grid.

  Args:
    denoise_fn: (x_t [B, ...], t [B] int32) -> the model's output (ε, x0 or v).
    schedule: the noise schedule the model was trained with.
    x: [B, ...] float32, the state at timesteps[0].
    timesteps: [S'] descending int timesteps (a NumPy array or list; static).
    step_size: t - t' of every step (diffusers: num_train_timesteps // num_inference_steps).
    final_alpha_cumprod: ᾱ of a timestep below 0: 1 (the step gives x̂0) or ᾱ_0.
    prediction: what denoise_fn predicts, "eps", "x0" or "v".
    clip_x0: clip x̂0 to [-1, 1] in every step, keeping ε̂ as predicted (diffusers' DDIM).
    threshold: None (follow `clip_x0`) or one of diffusion.THRESHOLDS, which takes precedence;
      ε̂ is kept as predicted whichever it is (diffusers' `thresholding` too).
    threshold_percentile: p of "dynamic" thresholding, in (0, 1].
    blend_fn: applied to every new state (inpainting); None leaves it.

  Returns:
    [B, ...] float32: the state after the last step.
  """
  threshold = x0_threshold(clip_x0, threshold)
  timesteps = np.asarray(timesteps, np.int64)
  prev = timesteps - step_size
  alphas_cumprod = np.asarray(schedule.alphas_cumprod, np.float64)
  alpha_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final_alpha_cumprod)
  inputs = (
    jnp.asarray(timesteps, jnp.int32),
    schedule.sqrt_alphas_cumprod[timesteps],
    schedule.sqrt_one_minus_alphas_cumprod[timesteps],
    jnp.asarray(np.sqrt(alpha_prev), jnp.float32),
    jnp.asarray(np.sqrt(1.0 - alpha_prev), jnp.float32),
    jnp.asarray(np.maximum(prev, -1), jnp.int32),
  )

  def step(x_t, args):
    t, alpha, sigma, alpha_next, sigma_next, t_next = args
    x0, eps = model_predictions(
      denoise_fn, x_t, t, alpha, sigma, prediction=prediction, clip_x0=False
    )
    # diffusers thresholds x̂0 and keeps ε̂ (improved-diffusion would recompute ε̂)
    x0 = threshold_x0(x0, threshold, threshold_percentile)
    x_next = alpha_next * x0 + sigma_next * eps
    return (x_next if blend_fn is None else blend_fn(x_next, t_next)), None

  x, _ = jax.lax.scan(step, jnp.asarray(x, jnp.float32), inputs)
  return x


def img2img_timesteps(timesteps, strength: float) -> np.ndarray:
  """The part of an inference grid that image-to-image runs, as diffusers cuts it.

  Args:
    timesteps: [S] descending grid.
    strength: in (0, 1]: the fraction of the S steps run, from the noisiest kept one.

  Returns:
    The last min(int(S * strength), S) timesteps (at least one).
  """
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength} must be in (0, 1]")
  timesteps = np.asarray(timesteps)
  kept = min(int(len(timesteps) * strength), len(timesteps))
  if kept < 1:
    raise ValueError(
      f"strength={strength} of {len(timesteps)} steps runs no step; raise strength or num_steps"
    )
  return timesteps[len(timesteps) - kept :]
