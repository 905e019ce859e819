"""Noise schedules: β_t and every quantity derived from it, as one immutable pytree.

All values are computed once in float64 NumPy and cast to float32, so that ᾱ_t (a product of up
to thousands of factors) keeps its precision whether or not JAX's x64 mode is on.
"""

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  """A discrete-time variance schedule with T steps; every array is [T] float32.

  Index t in [0, T) is the paper's step t+1: `betas[0]` is β_1 and `alphas_cumprod[t]` is ᾱ_{t+1}.
  """

  betas: jax.Array  # β_t
  alphas_cumprod: jax.Array  # ᾱ_t = ∏_{s≤t} (1 - β_s)
  alphas_cumprod_prev: jax.Array  # ᾱ_{t-1}, with ᾱ_0 = 1
  sqrt_alphas_cumprod: jax.Array  # √ᾱ_t
  sqrt_one_minus_alphas_cumprod: jax.Array  # √(1 - ᾱ_t)
  posterior_variance: jax.Array  # β̃_t = (1 - ᾱ_{t-1}) β_t / (1 - ᾱ_t); β̃ at t=0 is 0
  posterior_log_variance_clipped: jax.Array  # log β̃_t with β̃ at t=0 replaced by β̃ at t=1
  posterior_mean_coef1: jax.Array  # √ᾱ_{t-1} β_t / (1 - ᾱ_t), the x0 coefficient of μ̃_t
  posterior_mean_coef2: jax.Array  # √α_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t), the x_t coefficient of μ̃_t
  num_timesteps: int = flax.struct.field(pytree_node=False)


def linear_betas(
  num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
  """β_t evenly spaced from `beta_start` to `beta_end` (DDPM); [T] float64."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """β_t of the cosine schedule (improved DDPM); [T] float64.

  ᾱ(t) = f(t)/f(0) with f(t) = cos²(((t/T + s)/(1 + s)) · π/2),
  β_t = min(1 - ᾱ(t+1)/ᾱ(t), max_beta).
  """
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  alphas_cumprod = f / f[0]
  return np.minimum(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)


def scaled_linear_betas(
  num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
  """β_t = (√β_start + t/(T-1) (√β_end - √β_start))², latent diffusion's schedule; [T] float64."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


_BETAS: dict[str, Callable[..., np.ndarray]] = {"linear": linear_betas, "cosine": cosine_betas}


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Derives every schedule quantity from β in float64 and casts once to float32.

  Args:
    betas: [T] values in (0, 1).

  Returns:
    The Schedule with num_timesteps = T.
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError("betas must be a 1-D array of values in (0, 1)")
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # β̃ at t=0 is 0; its log would be -inf, so use β̃ at t=1 there (the t=0 step adds no noise).
  clipped = np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else betas
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  # Concrete arrays also when built inside a traced function (jnp.asarray would stage them as
  # tracers there), so that a Schedule can be cached and reused across traces.
  with jax.ensure_compile_time_eval():
    return Schedule(
      betas=f32(betas),
      alphas_cumprod=f32(alphas_cumprod),
      alphas_cumprod_prev=f32(alphas_cumprod_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
      posterior_variance=f32(posterior_variance),
      posterior_log_variance_clipped=f32(np.log(clipped)),
      posterior_mean_coef1=f32(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)),
      posterior_mean_coef2=f32(
        (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
      ),
      num_timesteps=len(betas),
    )


def make_schedule(name: str, num_timesteps: int, **kwargs) -> Schedule:
  """Builds a named schedule.

  Args:
    name: "linear" (kwargs beta_start=1e-4, beta_end=0.02) or "cosine" (kwargs s=0.008,
      max_beta=0.999).
    num_timesteps: T, the number of diffusion steps (>= 2).
    **kwargs: the named schedule's parameters.

  Returns:
    The Schedule.
  """
  if name not in _BETAS:
    raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(sorted(_BETAS))}")
  if int(num_timesteps) < 2:
    raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
  return schedule_from_betas(_BETAS[name](int(num_timesteps), **kwargs))


def extract(coef: jax.Array, t: jax.Array, ndim: int = 4) -> jax.Array:
  """Gathers per-example coefficients: coef[t] shaped [B, 1, ..., 1] to broadcast against x.

  Args:
    coef: [T] per-timestep values.
    t: [B] int timesteps in [0, T).
    ndim: rank of the array the result multiplies.

  Returns:
    [B] + [1] * (ndim - 1) float32.
  """
  return coef[t].reshape(t.shape + (1,) * (ndim - t.ndim))
