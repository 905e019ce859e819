"""The measured effect of each speed switch, against the default setting, in one process.

Run from the repository root:
  python benchmarks/fast_paths.py                  # CIFAR-10 network, batch 32, and the shapes one
  python benchmarks/fast_paths.py --rounds=5 --batch=64

CIFAR-10 network: the train step (as the trainer compiles it: state donated) with each network
switch flipped on its own (`model.conv`, `model.subpixel_upsample`, `model.remat`,
`model.attention`, `model.dtype`), all compiled first and then timed in alternating rounds, so
that every variant sees the same machine state; plus one sampling network call with and without
Winograd convolutions and the sub-pixel Upsample, and in chunks of `--microbatch`
(`model.microbatch`). Shapes network:
`train.steps_per_call` = 1 against k (per-step time; the dispatch overhead it removes matters
for small models). Memory is XLA's `memory_analysis()` of each
compiled program: the temporary buffers beyond the arguments and outputs, which is what remat
trades for compute. Prints Markdown tables for benchmarks/results/fast_paths.md.
"""

import importlib
import os
import shlex
import statistics
import sys
import time
from functools import partial

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402
from diffusion_jax import models  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.runtime import (
  hostmem,  # noqa: E402
  parallel,  # noqa: E402
)

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Train batch of the CIFAR-10 network.")
flags.DEFINE_integer("sample_batch", 64, "Batch of the sampling network call.")
flags.DEFINE_integer("rounds", 3, "Alternating timing rounds; medians over rounds are reported.")
flags.DEFINE_integer("steps_per_call", 8, "k of the shapes network's steps_per_call row.")
flags.DEFINE_integer("shapes_batch", 32, "Train batch of the shapes network.")
flags.DEFINE_bool(
  "reuse_host_memory", True, "config.reuse_host_memory: keep freed host memory (CPU, glibc)."
)
flags.DEFINE_integer("microbatch", 16, "model.microbatch of the sampling call's chunked row.")

# (row label, model overrides) of the CIFAR-10 train-step variants; the first is the default.
VARIANTS = (
  ("default (float32, sub-pixel Upsample, model.conv=auto)", {}),
  ("model.conv=xla", {"conv": "xla"}),
  ("model.subpixel_upsample=False", {"subpixel_upsample": False}),
  ("model.remat=True", {"remat": True}),
  ("model.attention=fused", {"attention": "fused"}),
  ("model.dtype=bfloat16", {"dtype": "bfloat16"}),
)

log = lambda message: print(message, file=sys.stderr, flush=True)


def make_run(name: str, batch: int, **model):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.train.batch_size = batch
  for field, value in model.items():
    config.model[field] = value
  return run_lib.make_run(config)


def init_state(run):
  init = jax.jit(
    lambda key: step_lib.init_state(run.model, run.tx, run.image_shape, key),
    out_shardings=parallel.replicated(run.mesh),
  )
  return init(rng.stream_key(run.config.seed, rng.INIT))


def temp_gib(compiled) -> float:
  return compiled.memory_analysis().temp_size_in_bytes / 2**30


class TrainCall:
  """A compiled train step with its own state, called as `call()`; `steps` steps per call."""

  def __init__(self, run, batch: int, steps_per_call: int = 1):
    self.state = init_state(run)
    self.steps = steps_per_call
    images = np.random.default_rng(0).integers(0, 256, (batch, *run.image_shape), dtype=np.uint8)
    key = rng.stream_key(run.config.seed, rng.TRAIN)
    fn = step_lib.compile_train_step(run, steps_per_call=steps_per_call)
    if steps_per_call > 1:
      stacked = np.stack([images] * steps_per_call)
      self.args = (parallel.put_batch({"image": stacked}, run.mesh, axis=1), steps_per_call, key)
    else:
      self.args = (parallel.put_batch({"image": images}, run.mesh), key)
    self.compiled, self.compile_s = timing.compile_timed(fn, self.state, *self.args)
    self.flops = timing.flops(self.compiled)
    self.temp = temp_gib(self.compiled)

  def __call__(self):
    self.state, metrics = self.compiled(self.state, *self.args)
    jax.block_until_ready(metrics)


def timed_once(call) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
  """Seconds per call of each entry, one call each per round, after one warm-up call each."""
  for call in calls.values():
    call()
  times = {name: [] for name in calls}
  for r in range(rounds):
    log(f"round {r + 1}/{rounds}")
    for name, call in calls.items():
      times[name].append(timed_once(call))
  return times


def main(argv):
  del argv
  hostmem.configure(FLAGS.reuse_host_memory)  # Before JAX starts its CPU client.
  n = FLAGS.batch
  calls = {}
  for label, model in VARIANTS:
    log(f"compiling the train step: {label}")
    calls[label] = TrainCall(make_run("cifar10", n, **model), n)
  sample_calls = {}
  sample_variants = (
    ("default (sub-pixel Upsample, model.conv=auto, whole batch)", {}),
    ("model.conv=xla", {"conv": "xla"}),
    ("model.subpixel_upsample=False", {"subpixel_upsample": False}),
    (f"model.microbatch={FLAGS.microbatch}", {"microbatch": FLAGS.microbatch}),
  )
  for label, model in sample_variants:
    run = make_run("cifar10", n, **model)
    params = init_state(run).ema_params
    x = np.random.default_rng(1).standard_normal((FLAGS.sample_batch, *run.image_shape), "f4")
    t = np.random.default_rng(2).integers(0, 1000, FLAGS.sample_batch).astype(np.int32)
    apply = lambda p, x, t, run=run: run.model.apply({"params": p}, x, t, train=False)
    chunk = run.config.model.microbatch
    fn = jax.jit(lambda p, x, t, a=apply, c=chunk: models.in_chunks(partial(a, p), c)(x, t))
    compiled, _ = timing.compile_timed(fn, params, x, t)
    sample_calls[label] = lambda c=compiled, p=params, x=x, t=t: c(p, x, t).block_until_ready()
  timed_calls = {("train", k): call for k, call in calls.items()}
  timed_calls.update({("sample", k): call for k, call in sample_calls.items()})
  times = interleaved(timed_calls, FLAGS.rounds)

  base = statistics.median(times["train", VARIANTS[0][0]])
  print(
    f"CIFAR-10 network, train step at batch {n}; {jax.devices()[0].device_kind}, "
    f"{os.cpu_count()} CPUs, jax {jax.__version__}; median (min–max) of {FLAGS.rounds} "
    "alternating rounds.\n"
  )
  print(
    "| setting | compile (s) | s / step | images / s | GFLOP / step | XLA temp memory (GiB) "
    "| speed vs default |"
  )
  print("|---|--:|--:|--:|--:|--:|--:|")
  for label, _ in VARIANTS:
    call, ts = calls[label], times["train", label]
    rate = [n / t for t in ts]
    print(
      f"| {label} | {call.compile_s:.1f} | {timing.median_range(ts)} | "
      f"{timing.median_range(rate)} | {call.flops / 1e9:.0f} | {call.temp:.2f} | "
      f"{base / statistics.median(ts):.2f}x |"
    )
  sample_base = statistics.median(times["sample", sample_variants[0][0]])
  print(f"\nSampling network call, batch {FLAGS.sample_batch}:\n")
  print("| setting | s / call | images / s | speed vs default |")
  print("|---|--:|--:|--:|")
  for label in sample_calls:
    ts = times["sample", label]
    rate = [FLAGS.sample_batch / t for t in ts]
    print(
      f"| {label} | {timing.median_range(ts)} | {timing.median_range(rate)} | "
      f"{sample_base / statistics.median(ts):.2f}x |"
    )

  k, shapes_batch = FLAGS.steps_per_call, FLAGS.shapes_batch
  log(f"shapes network: steps_per_call 1 and {k}")
  shapes = {
    1: TrainCall(make_run("shapes", shapes_batch), shapes_batch),
    k: TrainCall(make_run("shapes", shapes_batch), shapes_batch, steps_per_call=k),
  }
  # Equal work per round: k single-step calls against one call of k steps.
  shape_times = interleaved(
    {1: lambda: [shapes[1]() for _ in range(k)], k: shapes[k]}, max(FLAGS.rounds, 5)
  )
  print(f"\nShapes network, train step at batch {shapes_batch}, {k} steps per round:\n")
  print("| train.steps_per_call | ms / step | images / s | speed vs 1 |")
  print("|--:|--:|--:|--:|")
  one = statistics.median(shape_times[1])
  for steps, ts in shape_times.items():
    per_step = [1e3 * t / k for t in ts]
    rate = [shapes_batch * k / t for t in ts]
    print(
      f"| {steps} | {timing.median_range(per_step)} | {timing.median_range(rate)} | "
      f"{one / statistics.median(ts):.2f}x |"
    )
  print(f"\nCommand: `{shlex.join(['python', *sys.argv])}`")


if __name__ == "__main__":
  app.run(main)
