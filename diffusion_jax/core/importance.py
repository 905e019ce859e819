"""Importance sampling of the timestep t (improved DDPM, section 3.3), as a pure state.

L_vlb's terms differ by orders of magnitude across t (the first few dominate), so a uniform t
gives a noisy estimate of their sum. Drawing t with p_t ∝ √E[L_t²] and weighting the loss by
1 / (T p_t) keeps the estimate unbiased,

  E_{t~p}[L_t / (T p_t)] = Σ_t p_t L_t / (T p_t) = (1/T) Σ_t L_t = E_{t~U}[L_t],

and lowers its variance. E[L_t²] is estimated from the last `HISTORY` losses seen at each t;
until every t has that many, p is uniform. Use:

  state = importance.init(T)                      # in the train state (and its checkpoint)
  probs = importance.probabilities(state)         # [T], pass as t_probs to the loss
  loss, terms = losses.loss_per_example_keys(..., t_probs=probs)
  state = importance.update(state, terms["t"], terms["loss"])
"""

import flax.struct
import jax
import jax.numpy as jnp

HISTORY = 10  # losses remembered per timestep
UNIFORM_MIX = 0.001  # share of the uniform distribution mixed into p, so that no p_t is 0


@flax.struct.dataclass
class LossHistory:
  """The last HISTORY losses seen at each timestep (a ring buffer per t)."""

  losses: jax.Array  # [T, HISTORY] float32; slot (count % HISTORY) is written next
  counts: jax.Array  # [T] int32, losses seen at each t so far (wraps after 2**31: never)


def init(num_timesteps: int) -> LossHistory:
  """An empty history for T = num_timesteps timesteps."""
  return LossHistory(
    losses=jnp.zeros((num_timesteps, HISTORY), jnp.float32),
    counts=jnp.zeros((num_timesteps,), jnp.int32),
  )


def update(state: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
  """Appends each example's loss to the history of its timestep, in batch order.

  Equals appending the pairs (t[j], losses[j]) one at a time for j = 0..B-1 (an example whose t
  recurs more than HISTORY times later in the batch is pushed out, as it would be sequentially).

  Args:
    state: the history.
    t: [B] int timesteps in [0, T).
    losses: [B] the unweighted per-example losses at those timesteps.

  Returns:
    The new history.
  """
  num_timesteps = state.counts.shape[0]
  t = t.astype(jnp.int32)
  same = t[:, None] == t[None, :]  # [B, B]
  rank = jnp.sum(jnp.tril(same, -1), axis=1)  # earlier examples in the batch with the same t
  total = jnp.sum(same, axis=1)  # examples in the batch with the same t
  slot = (state.counts[t] + rank) % HISTORY
  # Only the last HISTORY examples of a timestep survive, and they land in distinct slots.
  row = jnp.where(rank >= total - HISTORY, t, num_timesteps)  # out of range: dropped
  history = state.losses.at[row, slot].set(losses.astype(jnp.float32), mode="drop")
  return LossHistory(losses=history, counts=state.counts.at[t].add(1))


def probabilities(state: LossHistory) -> jax.Array:
  """p_t = (1 - u) √E[L_t²] / Σ_s √E[L_s²] + u / T, u = UNIFORM_MIX; uniform until warmed up.

  Args:
    state: the history.

  Returns:
    [T] float32 probabilities summing to 1: uniform until every t has HISTORY losses (or if
    every remembered loss is 0).
  """
  num_timesteps = state.counts.shape[0]
  rms = jnp.sqrt(jnp.mean(jnp.square(state.losses), axis=1))
  total = jnp.sum(rms)
  ready = jnp.all(state.counts >= HISTORY) & (total > 0)
  p = (1.0 - UNIFORM_MIX) * rms / jnp.where(total > 0, total, 1.0) + UNIFORM_MIX / num_timesteps
  return jnp.where(ready, p, jnp.full_like(p, 1.0 / num_timesteps))


def loss_weights(probs: jax.Array, t: jax.Array) -> jax.Array:
  """w = 1 / (T p_t) per example: the weights that make E_{t~p}[w L_t] = E_{t~U}[L_t].

  Args:
    probs: [T] the probabilities t was drawn with.
    t: [B] int timesteps.

  Returns:
    [B] float32 weights.
  """
  return 1.0 / (probs.shape[0] * probs[t])
