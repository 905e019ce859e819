"""Cost per seed of a seed study's train step: K seeds in one program against one seed alone.

Run from the repository root:
  python benchmarks/seed_study.py                  # the shapes network, K = 4, both modes
  python benchmarks/seed_study.py --num_seeds=2 --repeats=10

Prints a Markdown table for benchmarks/results/seed_studies.md. The single-seed step and the
K-seed step of each `train.seed_batching` mode ("vmap", "unroll") are compiled as the trainer
compiles them and timed in interleaved rounds of --steps_per_round steps, so that machine noise
hits all of them alike; the table gives the median (min-max) ms per step and the cost per seed
relative to the single-seed step.
"""

import os
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import shapes  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import (
  train,  # noqa: E402
)
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.runtime import parallel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_seeds", 4, "K, the seeds trained together.")
flags.DEFINE_list("modes", ["vmap", "unroll"], "train.seed_batching modes measured.")
flags.DEFINE_integer("repeats", 7, "Interleaved timing rounds; the median is reported.")
flags.DEFINE_integer("steps_per_round", 3, "Steps per round of each program.")


def _step_program(config, num_seeds):
  """(compiled step, state, batch, key, compile seconds) for one seed or a K-seed study."""
  run = run_lib.make_run(config)
  init = jax.jit(run.init_state)
  images = np.random.default_rng(0).integers(
    0, 256, (num_seeds or 1, config.train.batch_size, *run.image_shape), dtype=np.uint8
  )
  if num_seeds:
    state = train._stack(*[init(rng.stream_key(s, rng.INIT)) for s in range(num_seeds)])
    key = jnp.stack([rng.stream_key(s, rng.TRAIN) for s in range(num_seeds)])
    batch = parallel.put_batch({"image": images}, run.mesh, axis=1)
  else:
    state, key = init(rng.stream_key(0, rng.INIT)), rng.stream_key(0, rng.TRAIN)
    batch = parallel.put_batch({"image": images[0]}, run.mesh)
  start = time.perf_counter()
  step = step_lib.compile_train_step(run, num_seeds).lower(state, batch, key).compile()
  return step, state, batch, key, time.perf_counter() - start


def main(argv):
  del argv
  config = shapes.get_config()
  programs = {"single seed": _step_program(config, None)}
  for mode in FLAGS.modes:
    config.train.seed_batching = mode
    programs[f"{FLAGS.num_seeds} seeds, {mode}"] = _step_program(config, FLAGS.num_seeds)
  states = {name: p[1] for name, p in programs.items()}
  times = {name: [] for name in programs}
  for round_index in range(FLAGS.repeats + 1):  # round 0 warms up
    for name, (step, _, batch, key, _) in programs.items():
      start = time.perf_counter()
      for _ in range(FLAGS.steps_per_round):
        states[name], metrics = step(states[name], batch, key)
      jax.block_until_ready(metrics)
      if round_index:
        times[name].append((time.perf_counter() - start) / FLAGS.steps_per_round)
      print(f"round {round_index} {name}", file=sys.stderr)
  single = statistics.median(times["single seed"])
  command = shlex.join(["python", "benchmarks/seed_study.py", *sys.argv[1:]])
  print(f"`{command}`")
  print(f"\n{jax.devices()[0].device_kind}, shapes network, batch {config.train.batch_size}\n")
  print("| program | compile s | ms per step | ms per seed-step | cost per seed vs one seed |")
  print("|---|--:|--:|--:|--:|")
  for name, (_, _, _, _, compile_s) in programs.items():
    median = statistics.median(times[name])
    seeds = 1 if name == "single seed" else FLAGS.num_seeds
    spread = f"{min(times[name]) * 1e3:.0f}–{max(times[name]) * 1e3:.0f}"
    print(
      f"| {name} | {compile_s:.1f} | {median * 1e3:.0f} ({spread}) | "
      f"{median / seeds * 1e3:.0f} | {median / seeds / single:.2f}× |"
    )


if __name__ == "__main__":
  app.run(main)
