"""Data with exact scores, for verifying samplers: Gaussian mixtures with diagonal covariances.

For x0 ~ Σ_k w_k N(μ_k, diag(s_k²)), the noisy x_t = α x0 + σ ε (α = √ᾱ, σ = √(1 - ᾱ)) is the
mixture Σ_k w_k N(α μ_k, diag(v_k)) with v_k = α² s_k² + σ², and with the responsibilities
r_k(x_t) ∝ w_k N(x_t; α μ_k, diag(v_k)) (a softmax over log-densities):

    E[ε | x_t]  = -σ ∇ log p(x_t) = σ Σ_k r_k (x_t - α μ_k) / v_k,
    E[x0 | x_t] = Σ_k r_k (μ_k + α s_k² (x_t - α μ_k) / v_k).

These are the outputs of a perfectly trained network (`exact_denoise_fn`), so a sampler driven by
them has no error but its own: its discretisation. The functions measuring that error:
`ode_solution` (the exact probability-flow map x_T -> x0 that every deterministic sampler
approximates), `gaussian_kl` and `sliced_wasserstein` (distances between a set of samples and
the data distribution). Events have any shape: [d] vectors or [H, W, C] images.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core.diffusion import DenoiseFn
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.core.timesteps import alphas_cumprod_at, noise_to_signal


@flax.struct.dataclass
class GaussianMixture:
  """x0 ~ Σ_k w_k N(μ_k, diag(s_k²)) over events of one shape E (e.g. [d] or [H, W, C])."""

  log_weights: jax.Array  # [K] log w_k, normalised
  means: jax.Array  # [K, *E] μ_k
  stds: jax.Array  # [K, *E] s_k > 0


def mixture(weights, means, stds) -> GaussianMixture:
  """A mixture from weights [K] (normalised here), means [K, *E] and stds [K] or [K, *E]."""
  weights = np.asarray(weights, np.float64)
  means = np.asarray(means, np.float32)
  stds = np.asarray(stds, np.float32)
  if stds.ndim == 1:
    stds = stds.reshape(len(weights), *[1] * (means.ndim - 1))
  return GaussianMixture(
    log_weights=jnp.asarray(np.log(weights / weights.sum()), jnp.float32),
    means=jnp.asarray(means),
    stds=jnp.asarray(np.broadcast_to(stds, means.shape)),
  )


def gaussian(mean, std) -> GaussianMixture:
  """N(μ, diag(s²)): mean [*E], std [*E] (or a scalar)."""
  mean = np.asarray(mean, np.float32)
  return mixture([1.0], mean[None], np.broadcast_to(np.asarray(std, np.float32), mean.shape)[None])


def _component_terms(data: GaussianMixture, x_t: jax.Array, alpha_bar: jax.Array):
  """Per component: responsibilities r [B, K], x_t - α μ_k and v_k, each [B, K, D] flattened."""
  batch = x_t.shape[0]
  x = x_t.reshape(batch, 1, -1)
  alpha_bar = jnp.reshape(alpha_bar, (batch, 1, 1))
  alpha = jnp.sqrt(alpha_bar)
  means = data.means.reshape(1, data.means.shape[0], -1)
  variances = alpha_bar * jnp.square(data.stds.reshape(means.shape)) + (1.0 - alpha_bar)
  residual = x - alpha * means
  log_density = -0.5 * jnp.sum(jnp.square(residual) / variances + jnp.log(variances), axis=-1)
  responsibilities = jax.nn.softmax(data.log_weights + log_density, axis=-1)
  return responsibilities, residual, variances, alpha, alpha_bar


def responsibilities(data: GaussianMixture, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """r_k(x_t) = P(component k | x_t): [B, K] (ᾱ = 1 gives the components' posterior given x0)."""
  return _component_terms(data, x_t, alpha_bar)[0]


def exact_eps(data: GaussianMixture, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """E[ε | x_t] = σ Σ_k r_k (x_t - α μ_k) / v_k.

  Args:
    data: the data distribution.
    x_t: [B, *E] float32.
    alpha_bar: [B] float32 ᾱ in (0, 1).

  Returns:
    [B, *E] float32.
  """
  r, residual, variances, _, alpha_bar = _component_terms(data, x_t, alpha_bar)
  eps = jnp.sqrt(1.0 - alpha_bar[:, 0]) * jnp.sum(r[..., None] * residual / variances, axis=1)
  return eps.reshape(x_t.shape)


def exact_x0(data: GaussianMixture, x_t: jax.Array, alpha_bar: jax.Array) -> jax.Array:
  """E[x0 | x_t] = Σ_k r_k (μ_k + α s_k² (x_t - α μ_k) / v_k); shapes as in `exact_eps`."""
  r, residual, variances, alpha, _ = _component_terms(data, x_t, alpha_bar)
  means = data.means.reshape(1, data.means.shape[0], -1)
  stds = data.stds.reshape(means.shape)
  x0 = jnp.sum(r[..., None] * (means + alpha * jnp.square(stds) * residual / variances), axis=1)
  return x0.reshape(x_t.shape)


def exact_denoise_fn(
  data: GaussianMixture, schedule: Schedule, prediction: str = "eps"
) -> DenoiseFn:
  """The output of a perfectly trained model: (x_t [B, *E], t [B]) -> E[ε], E[x0] or E[v] | x_t.

  Integer t reads ᾱ_t from the schedule; float t uses ᾱ(t) of `timesteps.alphas_cumprod_at`,
  the same interpolation the heun sampler uses to turn its noise levels into timesteps.
  v = √ᾱ ε - √(1 - ᾱ) x0.
  """

  def denoise_fn(x_t, t):
    if jnp.issubdtype(t.dtype, jnp.integer):
      alpha_bar = schedule.alphas_cumprod[t]
    else:
      alpha_bar = alphas_cumprod_at(schedule, t)
    if prediction == "eps":
      return exact_eps(data, x_t, alpha_bar)
    if prediction == "x0":
      return exact_x0(data, x_t, alpha_bar)
    if prediction == "v":
      shape = (-1,) + (1,) * (x_t.ndim - 1)
      alpha, sigma = jnp.sqrt(alpha_bar).reshape(shape), jnp.sqrt(1 - alpha_bar).reshape(shape)
      return alpha * exact_eps(data, x_t, alpha_bar) - sigma * exact_x0(data, x_t, alpha_bar)
    raise ValueError(f"unknown prediction {prediction!r}; valid: eps, x0, v")

  return denoise_fn


def sample_data(data: GaussianMixture, key: jax.Array, num_samples: int) -> jax.Array:
  """num_samples exact draws of x0: [N, *E] float32."""
  component_key, noise_key = jax.random.split(key)
  k = jax.random.categorical(component_key, data.log_weights, shape=(num_samples,))
  noise = jax.random.normal(noise_key, (num_samples, *data.means.shape[1:]))
  return data.means[k] + data.stds[k] * noise


# ---------------------------------------------------------------- float64 references (NumPy)


def _x0_float64(data: GaussianMixture, x: np.ndarray, sigma: float) -> np.ndarray:
  """E[x0 | x̃] at x̃ = x0 + σ̃ n, in float64: x [B, D] -> [B, D]."""
  means = np.asarray(data.means, np.float64).reshape(1, data.means.shape[0], -1)
  var = np.square(np.asarray(data.stds, np.float64).reshape(means.shape))
  total = var + sigma**2
  residual = x[:, None, :] - means
  logits = np.asarray(data.log_weights, np.float64) - 0.5 * np.sum(
    residual**2 / total + np.log(total), axis=-1
  )
  r = np.exp(logits - logits.max(axis=1, keepdims=True))
  r /= r.sum(axis=1, keepdims=True)
  return np.sum(r[..., None] * (means + var / total * residual), axis=1)


def ode_solution(
  data: GaussianMixture, schedule: Schedule, x_T: jax.Array, num_steps: int = 2000
) -> np.ndarray:
  """The exact map of the deterministic samplers: x_T at t = T-1 -> x0, in float64.

  x̃ = x / α follows dx̃/dσ̃ = (x̃ - D(x̃; σ̃)) / σ̃, D = E[x0 | x̃], from x̃ = x_T / α_{T-1} at
  σ̃_{T-1} down to σ̃_0 (the schedule's first timestep); the result is D(x̃; σ̃_0), the model's x0
  there, which is where every sampler here ends. For one Gaussian the solution is closed-form,
  x̃(σ̃) - μ ∝ √(s² + σ̃²); for mixtures it is classical RK4 in log σ̃ with `num_steps` steps
  (the error falls as num_steps⁻⁴).

  Args:
    data: the data distribution.
    schedule: the schedule the samplers use (its float32 values, taken as exact).
    x_T: [B, *E] starting noise.
    num_steps: RK4 steps for mixtures.

  Returns:
    [B, *E] float64.
  """
  sigmas = np.asarray(noise_to_signal(schedule), np.float64)
  sigma_min, sigma_max = sigmas[0], sigmas[-1]
  x = np.asarray(x_T, np.float64).reshape(x_T.shape[0], -1)
  x = x / float(schedule.sqrt_alphas_cumprod[-1])
  if data.means.shape[0] == 1:
    mean = np.asarray(data.means, np.float64).reshape(1, -1)
    var = np.square(np.asarray(data.stds, np.float64)).reshape(1, -1)
    x = mean + (x - mean) * np.sqrt((var + sigma_min**2) / (var + sigma_max**2))
  else:
    field = lambda x, u: x - _x0_float64(data, x, np.exp(u))  # dx̃ / d log σ̃
    grid = np.linspace(np.log(sigma_max), np.log(sigma_min), num_steps + 1)
    for u, u_next in zip(grid[:-1], grid[1:], strict=True):
      h = u_next - u
      k1 = field(x, u)
      k2 = field(x + 0.5 * h * k1, u + 0.5 * h)
      k3 = field(x + 0.5 * h * k2, u + 0.5 * h)
      k4 = field(x + h * k3, u_next)
      x = x + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
  return _x0_float64(data, x, sigma_min).reshape(x_T.shape)


def rms(a, b) -> float:
  """Root mean square of a - b over all entries (float64)."""
  return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)))))


def gaussian_kl(samples, data: GaussianMixture) -> float:
  """KL(N(m̂, Ĉ) ‖ N(μ, diag(s²))) of the Gaussian fitted to samples, for one-component data.

  ½ [tr(S⁻¹ Ĉ) + (μ - m̂)ᵀ S⁻¹ (μ - m̂) - d + log det S - log det Ĉ]. With N exact samples in d
  dimensions it is about (d + d(d+1)/2) / (2N) on average (the sampling floor).

  Args:
    samples: [N, *E], N > d.
    data: a one-component GaussianMixture.

  Returns:
    The KL in nats.
  """
  x = np.asarray(samples, np.float64).reshape(len(samples), -1)
  mean = np.asarray(data.means[0], np.float64).ravel()
  var = np.square(np.asarray(data.stds[0], np.float64).ravel())
  fit_mean, fit_cov = x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))
  diff = mean - fit_mean
  _, logdet = np.linalg.slogdet(fit_cov)
  trace = np.sum(np.diag(fit_cov) / var)
  return 0.5 * float(trace + np.sum(diff**2 / var) - x.shape[1] + np.sum(np.log(var)) - logdet)


def sliced_wasserstein(a, b, key: jax.Array, num_projections: int = 256) -> float:
  """Sliced 2-Wasserstein distance between two equally large sample sets.

  SW₂² = mean over random unit directions u of W₂²(uᵀa, uᵀb), each 1-D W₂² from sorted
  projections.

  Args:
    a, b: [N, *E] samples.
    key: PRNG key of the directions.
    num_projections: directions.

  Returns:
    SW₂ (same units as the samples).
  """
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  if a.shape != b.shape:
    raise ValueError(f"sample sets differ in shape: {a.shape} and {b.shape}")
  u = np.asarray(jax.random.normal(key, (a.shape[1], num_projections)), np.float64)
  u /= np.linalg.norm(u, axis=0, keepdims=True)
  pa, pb = np.sort(a @ u, axis=0), np.sort(b @ u, axis=0)
  return float(np.sqrt(np.mean(np.square(pa - pb))))


def standard_problems() -> dict[str, GaussianMixture]:
  """The data sets of the sampler tests and benchmarks/samplers.py.

  gaussian_2d:  N((0.3, -0.2), diag(0.5², 0.2²)).
  mixture_2d:   3 components in 2-D, weights 0.5, 0.3, 0.2, stds 0.15, 0.2, 0.1 (separated
                modes, so the ODE's trajectories bend where the responsibilities switch).
  mixture_8x8:  4 components on 8x8x1 images in [-1, 1] (a horizontal ramp, a vertical
                ramp, a disc, a checkerboard), weights 0.4, 0.3, 0.2, 0.1, stds 0.1 to 0.25.
  """
  rows, cols = np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8), indexing="ij")
  images = np.stack(
    [
      0.8 * cols,
      -0.8 * rows,
      np.where(rows**2 + cols**2 < 0.5, 0.7, -0.7),
      0.5 * np.where((np.arange(8)[:, None] + np.arange(8)[None, :]) % 2 == 0, 1.0, -1.0),
    ]
  )[..., None]
  return {
    "gaussian_2d": gaussian([0.3, -0.2], [0.5, 0.2]),
    "mixture_2d": mixture(
      [0.5, 0.3, 0.2], [[-0.6, -0.2], [0.5, 0.5], [0.3, -0.7]], [0.15, 0.2, 0.1]
    ),
    "mixture_8x8": mixture([0.4, 0.3, 0.2, 0.1], images, [0.1, 0.2, 0.15, 0.25]),
  }
