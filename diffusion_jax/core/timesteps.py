"""Time grids of the samplers: which noise levels a sampler visits, and the schedule between them.

Timestep t in [0, T) of a Schedule is the noise level of x_t = α_t x0 + σ_t ε with α_t = √ᾱ_t and
σ_t = √(1 - ᾱ_t). The samplers also measure it by the log signal-to-noise ratio
λ_t = log(α_t / σ_t) (DPM-Solver) and by the noise-to-signal ratio σ̃_t = σ_t / α_t = e^{-λ_t}
(EDM's σ, the noise level of the scaled variable x̃ = x / α_t = x0 + σ̃ ε).

Between integer timesteps, log σ̃ (equivalently λ) is interpolated linearly in t: that defines
ᾱ(t) for a float t, the timestep of any σ̃ in [σ̃_0, σ̃_{T-1}], and is the same convention as
DPM-Solver's for discrete-time models.
"""

import jax
import jax.numpy as jnp

from diffusion_jax.core.schedules import Schedule

# How a sampler with S < T steps spreads them over the T timesteps (see `spaced_timesteps`).
SKIPS = ("uniform", "quadratic", "logsnr")


def log_snr(schedule: Schedule) -> jax.Array:
  """λ_t = log(α_t / σ_t) = ½ log(ᾱ_t / (1 - ᾱ_t)); [T] float32, decreasing in t."""
  return jnp.log(schedule.sqrt_alphas_cumprod) - jnp.log(schedule.sqrt_one_minus_alphas_cumprod)


def noise_to_signal(schedule: Schedule) -> jax.Array:
  """σ̃_t = σ_t / α_t = √((1 - ᾱ_t) / ᾱ_t); [T] float32, increasing in t."""
  return schedule.sqrt_one_minus_alphas_cumprod / schedule.sqrt_alphas_cumprod


def spaced_timesteps(schedule: Schedule, num_steps: int, skip: str = "uniform") -> jax.Array:
  """The S = num_steps timesteps a sampler visits, in visiting order T-1 = t_0 > ... > t_{S-1} = 0.

  In ascending order the k-th kept timestep is round((T-1) τ_k), τ nondecreasing from τ_0 = 0 to
  τ_{S-1} = 1:

    uniform:   τ_k = k / (S-1): improved-diffusion's respacing (both ends included);
    quadratic: τ_k = (k / (S-1))², denser at low noise (DDIM's quadratic skip, over all of [0, T));
    logsnr:    (T-1) τ_k = t(λ*_k), λ*_k uniform from λ_0 to λ_{T-1}, t(λ) interpolated in the
               λ table (DPM-Solver's logSNR spacing).

  Where rounding makes timesteps coincide (many steps, or logsnr near t = 0, where λ changes
  fastest), the later ones move up one by one, never past T-1 - (S-1-k); so S ≤ T timesteps are
  always distinct and S = T keeps all of them. Both ends are always visited: every sampler starts
  from x_T at t = T-1 and makes its last model call at t = 0. S = 1 is the single timestep T-1.

  Args:
    schedule: the model's schedule (T = schedule.num_timesteps).
    num_steps: S in [1, T] (static).
    skip: one of SKIPS.

  Returns:
    [S] int32 timesteps, descending.
  """
  num_timesteps = schedule.num_timesteps
  if skip not in SKIPS:
    raise ValueError(f"sample.skip={skip!r} is unknown; valid: {', '.join(SKIPS)}")
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_timesteps}]")
  if num_steps == 1:
    return jnp.array([num_timesteps - 1], jnp.int32)
  k = jnp.arange(num_steps, dtype=jnp.int32)
  fraction = k / (num_steps - 1)
  if skip == "uniform":
    ideal = (num_timesteps - 1) * fraction
  elif skip == "quadratic":
    ideal = (num_timesteps - 1) * fraction**2
  else:
    lam = log_snr(schedule)
    target = lam[0] + fraction * (lam[-1] - lam[0])
    # jnp.interp needs increasing abscissae: -λ increases with t.
    ideal = jnp.interp(-target, -lam, jnp.arange(num_timesteps, dtype=jnp.float32))
  rounded = jnp.floor(ideal + 0.5).astype(jnp.int32).at[0].set(0).at[-1].set(num_timesteps - 1)
  distinct = k + jax.lax.cummax(rounded - k)
  ascending = jnp.minimum(distinct, num_timesteps - num_steps + k)
  return ascending[::-1]


def respace(schedule: Schedule, timesteps: jax.Array) -> Schedule:
  """The schedule of a subsequence of timesteps, as improved-diffusion respaces a model.

  With kept timesteps t'_0 < ... < t'_{S-1}: ᾱ'_k = ᾱ_{t'_k} and
  β'_k = 1 - ᾱ_{t'_k} / ᾱ_{t'_{k-1}} (ᾱ_{t'_{-1}} = 1), computed as -expm1(Σ_j log(1 - β_j)) over
  t'_{k-1} < j ≤ t'_k, which keeps float32 precision for small β'. The other fields follow from
  β' and ᾱ' as in `schedules.schedule_from_betas`. The model is still called with the original
  timesteps t'_k; index k of the result is its step k.

  Args:
    schedule: the model's schedule.
    timesteps: [S] int32 kept timesteps, ascending (S static).

  Returns:
    A Schedule with num_timesteps = S, float32 arrays of length S.
  """
  num_steps = timesteps.shape[0]
  segment = jnp.searchsorted(timesteps, jnp.arange(schedule.num_timesteps), side="left")
  log_alphas = jax.ops.segment_sum(jnp.log1p(-schedule.betas), segment, num_segments=num_steps + 1)[
    :num_steps
  ]
  betas = -jnp.expm1(log_alphas)
  alphas_cumprod = schedule.alphas_cumprod[timesteps]
  one_minus = jnp.square(schedule.sqrt_one_minus_alphas_cumprod[timesteps])
  alphas_cumprod_prev = jnp.concatenate([jnp.ones((1,)), alphas_cumprod[:-1]])
  one_minus_prev = jnp.concatenate([jnp.zeros((1,)), one_minus[:-1]])
  posterior_variance = betas * one_minus_prev / one_minus
  # β̃ at k=0 is 0: its log uses β̃ at k=1 (that step adds no noise), as schedule_from_betas does.
  clipped = jnp.concatenate([posterior_variance[1:2], posterior_variance[1:]])
  clipped = clipped if num_steps > 1 else betas
  return Schedule(
    betas=betas,
    alphas_cumprod=alphas_cumprod,
    alphas_cumprod_prev=alphas_cumprod_prev,
    sqrt_alphas_cumprod=schedule.sqrt_alphas_cumprod[timesteps],
    sqrt_one_minus_alphas_cumprod=schedule.sqrt_one_minus_alphas_cumprod[timesteps],
    posterior_variance=posterior_variance,
    posterior_log_variance_clipped=jnp.log(clipped),
    posterior_mean_coef1=betas * jnp.sqrt(alphas_cumprod_prev) / one_minus,
    posterior_mean_coef2=one_minus_prev * jnp.sqrt(1.0 - betas) / one_minus,
    num_timesteps=num_steps,
  )


def karras_sigmas(
  sigma_min: jax.Array, sigma_max: jax.Array, num_steps: int, rho: float = 7.0
) -> jax.Array:
  """EDM's noise levels σ̃_i = (σ_max^{1/ρ} + i/(N-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i < N.

  Args:
    sigma_min, sigma_max: [] float32, the ends of the grid (σ̃ of the first and last timestep).
    num_steps: N ≥ 1 (static); N = 1 gives [σ_max].
    rho: ρ > 0; larger ρ puts more steps at low noise (EDM: ρ = 7).

  Returns:
    [N] float32, decreasing from σ_max to σ_min (the final σ̃_N = 0 is not included).
  """
  fraction = jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
  inv_rho = 1.0 / rho
  return (sigma_max**inv_rho + fraction * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def timestep_from_sigma(schedule: Schedule, sigma: jax.Array) -> jax.Array:
  """The float timestep t with σ̃(t) = σ̃, log σ̃ interpolated linearly between timesteps.

  Args:
    schedule: the model's schedule.
    sigma: σ̃ > 0 of any shape; values outside [σ̃_0, σ̃_{T-1}] clamp to 0 or T-1.

  Returns:
    float32 t in [0, T-1], the shape of `sigma`.
  """
  grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  return jnp.interp(jnp.log(sigma), jnp.log(noise_to_signal(schedule)), grid)


def alphas_cumprod_at(schedule: Schedule, t: jax.Array) -> jax.Array:
  """ᾱ(t) = 1 / (1 + σ̃(t)²) at float timesteps, the inverse of `timestep_from_sigma`.

  Args:
    schedule: the model's schedule.
    t: float timesteps in [0, T-1], any shape (integer values give ᾱ_t up to rounding).

  Returns:
    float32 ᾱ(t), the shape of t.
  """
  grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  log_sigma = jnp.interp(jnp.asarray(t, jnp.float32), grid, jnp.log(noise_to_signal(schedule)))
  return jax.nn.sigmoid(-2.0 * log_sigma)
