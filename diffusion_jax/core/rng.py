"""Named random streams of a run, all derived from the one root key `jax.random.key(seed)`.

Keys are never stored: each is a pure function of (seed, stream, step, example index), so a
resumed run draws exactly the numbers the uninterrupted run would.
"""

import jax

# fold_in constants of the named streams; fixed forever, since changing one changes every run.
INIT = 0
TRAIN = 1
SAMPLE = 2
EVAL = 3  # evaluation figures (e.g. projection directions), shared by the seeds of a study


def stream_key(seed: int, stream: int) -> jax.Array:
  """fold_in(key(seed), stream): the root key of one named stream."""
  return jax.random.fold_in(jax.random.key(seed), stream)
