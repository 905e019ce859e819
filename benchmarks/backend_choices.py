"""The train step's per-backend speed paths (model.fast), each flipped, timed against the default.

Run from the repository root:
  python benchmarks/backend_choices.py                   # CIFAR-10 network, batch 32
  python benchmarks/backend_choices.py --dtype=bfloat16 --attention=fused --batch=128 \
    --steps_per_call=8                                   # a GPU

The model.fast flags that a run resolves from the backend when they say "auto": whether
GroupNorm's backward pass recomputes dz (`recompute_dz`), whether a residual block holds its
branch's gradient apart (`hold_branch_gradient`), whether the up path hands its ResBlocks
(h, skip) instead of their concatenation (`skips_in_parts`), and whether fused attention asks for
cuDNN's flash attention (`flash_attention`). Each "auto" is decided from measurements on one kind
of machine (`models/fast/__init__.py`). This script compiles the step as the trainer does (state
donated) with the choices "auto" makes on the backend it runs on and once more with each choice
flipped, then times all of them in alternating rounds, so that every variant sees the same
machine state. Each round queues --calls calls per variant and waits once, so the host's dispatch
overlaps the device's work as in the trainer; each call runs --steps_per_call steps (the trainer's
train.steps_per_call), and the per-step time is the round's time over the steps. The loss after the
last call is printed as well: a flip changes float rounding only. Prints a Markdown table for
benchmarks/results/train_step_gpu.md.
"""

import importlib
import os
import shlex
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment import run as run_lib  # noqa: E402
from diffusion_jax.experiment import train_step as step_lib  # noqa: E402
from diffusion_jax.models import fast  # noqa: E402
from diffusion_jax.runtime import parallel  # noqa: E402

# The model.fast flags that "auto" sets per backend.
CHOICES = tuple(fast.AUTO)

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_enum("config", "cifar10", ("cifar10", "shapes"), "Config (configs/).")
  flags.DEFINE_integer("batch", 32, "Global batch of the train step.")
  flags.DEFINE_enum("dtype", None, ("float32", "bfloat16"), "model.dtype (default: the config's).")
  flags.DEFINE_enum("attention", None, ("plain", "fused"), "model.attention (default: config's).")
  flags.DEFINE_list("flip", list(CHOICES), "Choices flipped, one variant each.")
  flags.DEFINE_integer("rounds", 5, "Alternating timing rounds.")
  flags.DEFINE_integer("calls", 4, "Calls queued per variant and round.")
  flags.DEFINE_integer("steps_per_call", 1, "Train steps per call (train.steps_per_call).")


def flipped_config(config, flip: str | None):
  """`config` with "auto" resolved for this backend, and model.fast.<flip> then negated."""
  config = run_lib.resolve_auto(config, jax.default_backend())
  if flip:
    config.model.fast[flip] = "false" if config.model.fast[flip] == "true" else "true"
  return config


def build(config, flip: str | None, steps_per_call: int = 1):
  """(compiled train step, its arguments) with the choice `flip` negated (None: none).

  The arguments are [state, batch, key], or with `steps_per_call` = k > 1 [state, k batches, k,
  key]: each call runs k steps.
  """
  run = run_lib.make_run(flipped_config(config, flip))
  init = jax.jit(run.init_state, out_shardings=parallel.replicated(run.mesh))
  state = init(rng.stream_key(config.seed, rng.INIT))
  images = np.random.default_rng(0).integers(
    0, 256, (config.train.batch_size, *run.image_shape), dtype=np.uint8
  )
  key = rng.stream_key(config.seed, rng.TRAIN)
  if steps_per_call > 1:
    batches = np.broadcast_to(images, (steps_per_call, *images.shape))
    args = [state, parallel.put_batch({"image": batches}, run.mesh, axis=1)]
    args += [np.int32(steps_per_call), key]
  else:
    args = [state, parallel.put_batch({"image": images}, run.mesh), key]
  step = step_lib.compile_train_step(run, steps_per_call=steps_per_call)
  return step.lower(*args).compile(), args


def time_rounds(
  programs: dict, rounds: int, calls: int, steps_per_call: int = 1
) -> tuple[dict, dict]:
  """({variant: seconds per step of each round}, {variant: loss after its last call})."""
  times = {name: [] for name in programs}
  losses = {}
  for round_ in range(rounds + 1):  # the first round warms up
    for name, (compiled, args) in programs.items():
      start = time.perf_counter()
      for _ in range(calls):
        args[0], metrics = compiled(*args)
      jax.block_until_ready((args[0], metrics))
      if round_:
        times[name].append((time.perf_counter() - start) / (calls * steps_per_call))
      losses[name] = float(metrics["loss"])
  return times, losses


def main(argv):
  del argv
  config = importlib.import_module(f"configs.{FLAGS.config}").get_config()
  config.train.batch_size = FLAGS.batch
  config.model.dtype = FLAGS.dtype or config.model.dtype
  config.model.attention = FLAGS.attention or config.model.attention
  unknown = sorted(set(FLAGS.flip) - set(CHOICES))
  if unknown:
    raise app.UsageError(f"--flip: unknown {', '.join(unknown)}; known: {', '.join(CHOICES)}")
  resolved = flipped_config(config, None).model.fast
  defaults = {name: resolved[name] == "true" for name in CHOICES}
  programs = {}
  for flip in [None, *FLAGS.flip]:
    name = "defaults" if flip is None else f"{flip} {'off' if defaults[flip] else 'on'}"
    print(f"compiling {name}", file=sys.stderr, flush=True)
    programs[name] = build(config, flip, FLAGS.steps_per_call)
  times, losses = time_rounds(programs, FLAGS.rounds, FLAGS.calls, FLAGS.steps_per_call)
  base = statistics.median(times["defaults"])
  device = jax.devices()[0]
  on = ", ".join(f"{n} {'on' if v else 'off'}" for n, v in defaults.items())
  print(
    f"**train step, backend choices flipped**: {FLAGS.config} network, batch {FLAGS.batch}, "
    f"model.dtype={config.model.dtype}, model.attention={config.model.attention}, on "
    f"{device.device_kind} ({device.platform}); jax {jax.__version__}. Defaults here: {on}. "
    f"Median (min–max) over {FLAGS.rounds} alternating rounds of {FLAGS.calls} queued calls of "
    f"{FLAGS.steps_per_call} step(s).\n"
  )
  print("| variant | ms / step | images / s | defaults / variant | XLA temp GiB | loss |")
  print("|---|--:|--:|--:|--:|--:|")
  for name, (compiled, _) in programs.items():
    step = statistics.median(times[name])
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
    print(
      f"| {name} | {timing.median_range([1e3 * t for t in times[name]])} "
      f"| {timing.num(FLAGS.batch / step)} | {base / step:.3f} | {temp:.2f} "
      f"| {losses[name]:.6f} |"
    )
  print(f"\nCommand: `{shlex.join(['python', *sys.argv])}`")


if __name__ == "__main__":
  define_flags()
  app.run(main)
