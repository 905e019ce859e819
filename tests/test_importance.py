"""Tests for diffusion_jax.importance: the loss history, p_t and the unbiased weights."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import importance

H = importance.HISTORY


def _sequential(num_timesteps, pairs):
  """Reference: the last H losses of each t, appended one pair at a time, and the counts."""
  history = [[] for _ in range(num_timesteps)]
  for t, loss in pairs:
    history[t] = (history[t] + [loss])[-H:]
  return history


def test_batch_update_equals_one_pair_at_a_time():
  num_timesteps = 5
  rng = np.random.default_rng(0)
  update = jax.jit(importance.update)
  batched = importance.init(num_timesteps)
  single = importance.init(num_timesteps)
  pairs = []
  # Batches with repeated timesteps, one with a timestep repeated more than H times.
  batches = [rng.integers(0, num_timesteps, 8) for _ in range(6)] + [np.full(2 * H + 3, 2)]
  for t in batches:
    losses = rng.uniform(0.0, 10.0, len(t)).astype(np.float32)
    batched = update(batched, jnp.asarray(t, jnp.int32), jnp.asarray(losses))
    for tj, lj in zip(t, losses, strict=True):
      single = update(single, jnp.asarray([tj], jnp.int32), jnp.asarray([lj]))
      pairs.append((int(tj), float(lj)))
  np.testing.assert_array_equal(np.asarray(batched.losses), np.asarray(single.losses))
  np.testing.assert_array_equal(np.asarray(batched.counts), np.asarray(single.counts))
  reference = _sequential(num_timesteps, pairs)
  counts = np.bincount([t for t, _ in pairs], minlength=num_timesteps)
  np.testing.assert_array_equal(np.asarray(batched.counts), counts)
  for t in range(num_timesteps):
    kept = np.asarray(batched.losses[t])[: min(counts[t], H)]
    np.testing.assert_allclose(np.sort(kept), np.sort(reference[t]), rtol=0)


def test_probabilities_are_uniform_until_every_t_has_a_full_history():
  num_timesteps = 4
  state = importance.init(num_timesteps)
  t = jnp.asarray([0, 1, 2, 3] * (H - 1) + [0, 1, 2], jnp.int32)
  state = importance.update(state, t, jnp.arange(len(t), dtype=jnp.float32) + 1.0)
  np.testing.assert_array_equal(np.asarray(importance.probabilities(state)), 0.25)
  state = importance.update(state, jnp.asarray([3], jnp.int32), jnp.asarray([1.0]))
  p = np.asarray(importance.probabilities(state))
  assert not np.allclose(p, 0.25)
  assert abs(p.sum() - 1.0) < 1e-6


def test_probabilities_are_the_rms_of_the_history_mixed_with_uniform():
  num_timesteps = 6
  rng = np.random.default_rng(1)
  losses = rng.uniform(0.0, 5.0, (num_timesteps, H)) * np.arange(1, num_timesteps + 1)[:, None]
  state = importance.init(num_timesteps)
  state = importance.update(
    state,
    jnp.asarray(np.repeat(np.arange(num_timesteps), H), jnp.int32),
    jnp.asarray(losses.ravel(), jnp.float32),
  )
  p = np.asarray(jax.jit(importance.probabilities)(state), np.float64)
  rms = np.sqrt(np.mean(losses**2, axis=1))
  u = importance.UNIFORM_MIX
  expected = (1.0 - u) * rms / rms.sum() + u / num_timesteps
  np.testing.assert_allclose(p, expected, rtol=1e-5)
  assert abs(p.sum() - 1.0) < 1e-6
  assert np.all(p >= u / num_timesteps)
  # Larger losses, more often.
  assert np.all(np.diff(p) > 0)


def test_weighted_estimate_is_unbiased():
  """E_{t~p}[L_t / (T p_t)] = Σ_t p_t L_t / (T p_t) = mean_t L_t, exactly, for any p.

  Checked in closed form for a warmed-up p, and by drawing t from p: the weighted sample mean is
  within 5 standard errors of mean_t L_t.
  """
  num_timesteps = 20
  rng = np.random.default_rng(2)
  per_t_loss = rng.uniform(0.0, 1.0, num_timesteps) ** 3 * 100.0
  state = importance.update(
    importance.init(num_timesteps),
    jnp.asarray(np.repeat(np.arange(num_timesteps), H), jnp.int32),
    jnp.asarray(np.repeat(per_t_loss, H) * rng.uniform(0.5, 1.5, num_timesteps * H), jnp.float32),
  )
  p = importance.probabilities(state)
  all_t = jnp.arange(num_timesteps, dtype=jnp.int32)
  w = np.asarray(importance.loss_weights(p, all_t), np.float64)
  p64 = np.asarray(p, np.float64)
  np.testing.assert_allclose(np.sum(p64 * w * per_t_loss), per_t_loss.mean(), rtol=1e-6)
  t = np.asarray(jax.random.categorical(jax.random.key(3), jnp.log(p), shape=(20_000,)))
  samples = np.asarray(importance.loss_weights(p, jnp.asarray(t)), np.float64) * per_t_loss[t]
  error = samples.std(ddof=1) / np.sqrt(len(samples))
  assert abs(samples.mean() - per_t_loss.mean()) < 5.0 * error
  # ... with a smaller spread than uniform sampling (the point of importance sampling).
  assert samples.std() < per_t_loss.std()
