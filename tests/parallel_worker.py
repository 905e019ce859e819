"""One process of a simulated device topology, for tests/test_parallel.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu \
    python tests/parallel_worker.py COMMAND --overrides=JSON --out=OUT.npz [--samples=...]

XLA reads the number of simulated CPU devices when JAX starts, so each topology is its own
process. A process of a multi-process run finds the others through JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, as `main.py` does. The config is the shapes config with
`--overrides` (a JSON object of dotted fields). Commands:

  train   the training loop's steps for train.num_steps steps from the initial state: writes
          "loss" [S] and "indices" [S, b] (the "index" rows this process loaded for each step),
          "initial_params<path>", and "params<path>" and "ema_params<path>" after the last
          step, and the topology: "process_index", "process_count", "device_count",
          "local_device_count".
  sample  for each NUM:BATCH of --samples, NUM images drawn BATCH per call from perturbed initial
          params: "samples_NUM_BATCH", float32 [NUM, H, W, C] (x0 before conversion to pixels).
  hlo     the compiled train step: "hlo" (its HLO text) and "num_params".
"""

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import shapes  # noqa: E402
from diffusion_jax import data  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment import generate  # noqa: E402
from diffusion_jax.experiment import run as run_lib  # noqa: E402
from diffusion_jax.experiment import train_step as step_lib  # noqa: E402
from diffusion_jax.runtime import parallel  # noqa: E402


def parse_args():
  parser = argparse.ArgumentParser()
  parser.add_argument("command", choices=["train", "sample", "hlo"])
  parser.add_argument("--overrides", default="{}")
  parser.add_argument("--out", required=True)
  parser.add_argument("--samples", default="")
  return parser.parse_args()


def make_config(overrides):
  config = shapes.get_config()
  for name, value in overrides.items():
    section, _, field = name.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[field] = tuple(value) if isinstance(value, list) else value
  return config


def flatten(prefix, tree):
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {prefix + jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def initial_state(run):
  """The loop's fresh state: init_state on the init stream, replicated."""
  init = jax.jit(
    lambda key: step_lib.init_state(run.model, run.tx, run.image_shape, key),
    out_shardings=parallel.replicated(run.mesh),
  )
  return init(rng.stream_key(run.config.seed, rng.INIT))


def train_steps(run):
  """The steps of `train.train_and_evaluate` (its data, placement and step), minus the files."""
  config = run.config
  state = initial_state(run)
  initial_params = flatten("initial_params", state.params)
  step_fn = step_lib.compile_train_step(run)
  train_key = rng.stream_key(config.seed, rng.TRAIN)
  batches = data.make_train_iterator(
    config.data,
    global_batch_size=config.train.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  losses, indices = [], []
  for _ in range(config.train.num_steps):
    batch = next(batches)
    indices.append(batch["index"])
    state, metrics = step_fn(
      state, parallel.put_batch({"image": batch["image"]}, run.mesh), train_key
    )
    losses.append(float(metrics["loss"]))
  return {
    "loss": np.asarray(losses),
    "indices": np.stack(indices),
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    **initial_params,
    **flatten("params", state.params),
    **flatten("ema_params", state.ema_params),
  }


def sample(run, requests):
  """Images from perturbed initial params for each "NUM:BATCH" of the comma-separated requests."""
  params = jax.device_get(initial_state(run).params)
  # The last layer starts at zero, so the initial network predicts zero whatever its input;
  # perturbed weights make every image depend on the network.
  noise = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + 0.1 * noise.standard_normal(x.shape, x.dtype), params)
  key = rng.stream_key(run.config.seed, rng.SAMPLE)
  out = {}
  for request in requests.split(","):
    num, batch_size = map(int, request.split(":"))
    run = dataclasses.replace(run, sample=dataclasses.replace(run.sample, batch_size=batch_size))
    samples = generate.generate(run.sample_fn(to_uint8=False), params, key, num, batch_size)
    out[f"samples_{num}_{batch_size}"] = samples
  return out


def compiled_train_step(run):
  """The train step as the loop compiles it, for the config's global batch."""
  abstract = run.abstract_state()
  shape = (run.config.train.batch_size, *run.image_shape)
  batch = {
    "image": jax.ShapeDtypeStruct(shape, np.uint8, sharding=parallel.batch_sharded(run.mesh))
  }
  train_key = rng.stream_key(run.config.seed, rng.TRAIN)
  compiled = step_lib.compile_train_step(run).lower(abstract, batch, train_key).compile()
  return {
    "hlo": np.asarray(compiled.as_text()),
    "num_params": sum(x.size for x in jax.tree.leaves(abstract.params)),
  }


def main():
  args = parse_args()
  # Joins the other processes, if any, before anything starts the backend.
  parallel.initialize_distributed()
  run = run_lib.make_run(make_config(json.loads(args.overrides)))
  if args.command == "train":
    out = train_steps(run)
  elif args.command == "sample":
    out = sample(run, args.samples)
  else:
    out = compiled_train_step(run)
  np.savez(args.out, **out)


if __name__ == "__main__":
  main()
