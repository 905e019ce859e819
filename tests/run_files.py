"""A run's files in tests: its saved state and metrics read back, and runs written without
training."""

import json
import os

import flax
import jax
import jax.numpy as jnp
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


def random_params(run, scale=0.2):
  """Random parameters of the run's network (its output layer starts at zero otherwise, which
  makes every output the same)."""
  example = run.prompt_condition([""]) if run.cond_kind != "none" else {}
  if run.low_res_size:
    example["low_res"] = jnp.zeros((1, run.low_res_size, run.low_res_size, 3))
    example["aug_level"] = jnp.zeros(1)
  x, t = jnp.zeros((1, *run.image_shape)), jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(run.model.init, jax.random.key(0), x, t, **example)["params"]
  rng = np.random.default_rng(len(jax.tree.leaves(shapes)))
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), shapes)


def write_run(config, workdir):
  """A run directory as training leaves it: config.json and a step-5 checkpoint of random
  weights, without compiling a train step (for code that only reads runs)."""
  run = run_lib.make_run(config)
  if run.is_autoencoder:  # its own initialisation: nothing starts at zero
    params = jax.jit(lambda key: run.init_state(key).params)(jax.random.key(0))
  else:
    params = random_params(run)
  state = jax.eval_shape(run.init_state, jax.random.key(0))
  state = state.replace(
    step=jnp.asarray(5, jnp.int32),
    params=params,
    ema_params=params,
    opt_state=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state.opt_state),
  )
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(run.config.to_dict(), f, default=list)
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"))
  store.save(5, flax.serialization.to_state_dict(state), {"step": 5})
  store.close()
