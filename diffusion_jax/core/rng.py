"""Named random streams of a run, all derived from the one root key `jax.random.key(seed)`.

Keys are never stored: each is a pure function of (seed, stream, step, example index), so a
resumed run draws exactly the numbers the uninterrupted run would.
"""

import jax
import jax.numpy as jnp

# fold_in constants of the named streams; fixed forever, since changing one changes every run.
INIT = 0
TRAIN = 1
SAMPLE = 2
EVAL = 3  # evaluation figures (e.g. projection directions), shared by the seeds of a study
SDS = 4  # score distillation: cameras, timesteps, noise and ray samples of each step


def stream_key(seed: int, stream: int) -> jax.Array:
  """fold_in(key(seed), stream): the root key of one named stream."""
  return jax.random.fold_in(jax.random.key(seed), stream)


def example_keys(key: jax.Array, indices) -> jax.Array:
  """Keys [B] with keys[i] = fold_in(key, indices[i]): one key per example from its global index.

  The one way the project derives per-example keys (train step, samplers, evaluation), so an
  example's random numbers do not depend on the batch or the device it lands on.

  Args:
    key: a PRNG key.
    indices: [B] integer indices (uint32 or int32; the same bits give the same keys).
  """
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices))
