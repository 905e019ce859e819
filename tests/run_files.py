"""Reading a run's files back in tests: its saved state and its metrics."""

import json
import os

import flax
import jax
import numpy as np

from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime import checkpoints


def load_state(config, workdir, step=None):
  """The TrainState saved in WORKDIR/checkpoints at `step` (default: the latest), on the host."""
  run = run_lib.make_run(config)
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"))
  try:
    assert store.latest_step() is not None, f"no checkpoint in {workdir}"
    if step is None:
      state = run_lib.restore_or_init(run, store)
    else:
      abstract = run.abstract_state()
      state_dict, _ = store.restore(step, flax.serialization.to_state_dict(abstract))
      state = flax.serialization.from_state_dict(abstract, state_dict)
  finally:
    store.close()
  return jax.device_get(state)


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def trees_equal(first, second):
  return all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True)
  )
