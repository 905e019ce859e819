"""Speed of the train step and of one sampling network call, against the machine's matmul peak.

Run from the repository root:
  python benchmarks/train_step.py                    # the CIFAR-10 network, 35,746,307 parameters
  python benchmarks/train_step.py --config=shapes    # the small network
  python benchmarks/train_step.py --batch_sizes=32,128 --sample_batch=256 --repeats=20
  python benchmarks/train_step.py --dtype=bfloat16 --batch_sizes=128 --sample_batch=256 \
    --matmul_dtype=bfloat16 --matmul_size=8192 --repeats=20 --warmup=3   # on a GPU

Prints a Markdown table for benchmarks/results/train_step_cpu.md (CPU) or
benchmarks/results/train_step_gpu.md (GPU) and the command line to stdout; progress goes to stderr.
The train step is `experiment.train_step.train_step` jitted as the trainer jits it (state donated,
batch sharded over the mesh), fed synthetic uint8 images; the sampling row is one U-Net apply with
train=False, the unit every reverse step repeats. Times are the median (min-max) of --repeats calls
after --warmup untimed ones. The model FLOPs, those that model FLOP utilisation counts, are counted
from the program's jaxpr (`jax.experimental.roofline`; the same network with plain attention, XLA's
direct convolutions and without remat, so that no FLOP hides in a library call, is counted twice,
or is saved by Winograd's algorithm, which computes the same function); the compiled FLOPs are
XLA's count for the compiled program (`cost_analysis`, per device; on a GPU it leaves out cuDNN's
convolutions). The achieved rate is the model FLOPs over the median time, compared with a
--matmul_dtype matmul timed in the same process at JAX's default matmul precision, the one the
model's convolutions and dense layers use. """

import importlib
import logging
import os
import shlex
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import roofline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.runtime import (
  hostmem,  # noqa: E402
  parallel,  # noqa: E402
)

_CONFIGS = ("cifar10", "shapes")

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "cifar10", _CONFIGS, "Config whose network is measured (configs/).")
flags.DEFINE_list("batch_sizes", ["8", "32"], "Global batch sizes of the train step.")
flags.DEFINE_integer("sample_batch", 64, "Batch of the sampling network call (0: none).")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement; the median is reported.")
flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling, before the timed ones.")
flags.DEFINE_integer("matmul_size", 4096, "N of the N x N matmul giving the peak.")
flags.DEFINE_enum("matmul_dtype", "float32", ("float32", "bfloat16"), "dtype of the peak matmul.")
flags.DEFINE_enum("dtype", None, ("float32", "bfloat16"), "model.dtype (default: the config's).")
flags.DEFINE_bool(
  "reuse_host_memory", True, "config.reuse_host_memory: keep freed host memory (CPU, glibc)."
)
flags.DEFINE_enum("attention", None, ("plain", "fused"), "model.attention (default: the config's).")
flags.DEFINE_enum("conv", None, ("auto", "xla", "winograd"), "model.conv (default: the config's).")
flags.DEFINE_bool(
  "in_flight",
  False,
  "Time train steps as the trainer runs them: each call waits for the previous one only.",
)
flags.DEFINE_list(
  "steps_per_call",
  ["1"],
  "train.steps_per_call values: train steps per dispatch, a row each (times are per step).",
)


def _row(name, batch, compile_s, times, flops, compiled_flops=None) -> dict:
  compiled_flops = flops if compiled_flops is None else compiled_flops
  return dict(
    name=name,
    batch=batch,
    compile_s=compile_s,
    times=times,
    flops=flops,
    compiled_flops=compiled_flops,
  )


def model_flops(fn, *args) -> float:
  """FLOPs of `fn` at `args` as written, counted from its jaxpr (`jax.experimental.roofline`).

  XLA's counts miss library calls, such as cuDNN's convolutions on a GPU."""
  # Silences "no roofline rule" for the FLOP-free primitives (absl in older jax).
  loggers = [logging.getLogger(name) for name in ("absl", roofline.roofline.__module__)]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    _, result = roofline.roofline(fn)(*args)
  finally:
    for logger, level in zip(loggers, levels, strict=True):
      logger.setLevel(level)
  return float(result.unfused_flops)


def compile_counted(jitted, counted, *args):
  """(compiled, compile seconds, model FLOPs, compiled FLOPs) of `jitted` at `args`' shapes.

  The model FLOPs are those of `counted`, the same function built with plain attention, direct
  convolutions and without remat, whose every FLOP the jaxpr count sees."""
  flops = model_flops(counted, *args)
  compiled, compile_s = timing.compile_timed(jitted, *args)
  return compiled, compile_s, flops, timing.flops(compiled)


def matmul_peak(n: int, dtype: str, warmup: int, repeats: int) -> dict:
  """The [n, n] @ [n, n] matmul in `dtype`: 2 n^3 FLOPs per call."""
  a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32).astype(dtype)
  compiled, compile_s = timing.compile_timed(jax.jit(jnp.matmul), a, b)
  times = timing.timed(lambda: jax.block_until_ready(compiled(a, b)), warmup, repeats)
  return _row(f"{dtype} matmul {n}x{n}", None, compile_s, times, 2.0 * n**3)


def bench_train_step(
  run,
  count_run,
  state,
  batch_size: int,
  warmup: int,
  repeats: int,
  steps_per_call: int = 1,
  in_flight: bool = False,
):
  """Times the donated, jitted `train_step` at `batch_size`; returns (row, new state).

  `count_run` is `run` with plain attention, direct convolutions and without remat: its FLOPs
  are counted. With `steps_per_call` = k > 1, each call runs k steps in one dispatch (the
  trainer's `train.steps_per_call`) and the row gives the time per step. Each call is waited
  for before the next, unless `in_flight`: then each waits for the previous call only, as the
  trainer does, so that dispatching a call overlaps the device's work on the one before."""
  parallel.check_batch_size(batch_size, run.mesh)
  images = np.random.default_rng(batch_size).integers(
    0, 256, (batch_size, *run.image_shape), dtype=np.uint8
  )
  batch = parallel.put_batch({"image": images}, run.mesh)
  train_key = rng.stream_key(run.config.seed, rng.TRAIN)
  step_fn = step_lib.compile_train_step(run)
  counted = step_fn if count_run is run else step_lib.compile_train_step(count_run)
  args = (state, batch, train_key)
  if steps_per_call > 1:
    step_fn = step_lib.compile_train_step(run, steps_per_call=steps_per_call)
    batches = np.broadcast_to(images, (steps_per_call, *images.shape))
    batches = parallel.put_batch({"image": batches}, run.mesh, axis=1)
    args = (state, batches, np.int32(steps_per_call), train_key)
  flops = model_flops(counted, state, batch, train_key)
  compiled, compile_s = timing.compile_timed(step_fn, *args)

  pending = []

  def step():
    nonlocal state
    state, metrics = compiled(state, *args[1:])
    if not in_flight:
      jax.block_until_ready((state, metrics))
      return
    if pending:
      jax.block_until_ready(pending.pop())
    pending.append(metrics["loss"])

  times = [t / steps_per_call for t in timing.timed(step, max(warmup, 1), repeats)]
  jax.block_until_ready((state, pending))
  name = "train step" + (f", {steps_per_call} per call (per step)" if steps_per_call > 1 else "")
  name += ", one call in flight" if in_flight else ""
  # XLA's cost analysis counts a loop's body once: per step either way.
  return _row(name, batch_size, compile_s, times, flops, timing.flops(compiled)), state


def bench_sample_call(run, count_run, params, batch_size: int, warmup: int, repeats: int) -> dict:
  """Times one jitted U-Net apply with train=False, as each reverse step makes it."""
  parallel.check_batch_size(batch_size, run.mesh, field="--sample_batch")
  shardings = (parallel.replicated(run.mesh), *[parallel.batch_sharded(run.mesh)] * 2)

  def jitted_apply(model):
    apply = lambda params, x_t, t: model.apply({"params": params}, x_t, t, train=False)
    return jax.jit(apply, in_shardings=shardings)

  apply_fn = jitted_apply(run.model)
  counted = apply_fn if count_run is run else jitted_apply(count_run.model)
  np_rng = np.random.default_rng(0)
  inputs = parallel.put_batch(
    {
      "x_t": np_rng.standard_normal((batch_size, *run.image_shape), dtype=np.float32),
      "t": np_rng.integers(0, run.schedule.num_timesteps, (batch_size,), dtype=np.int32),
    },
    run.mesh,
  )
  args = (params, inputs["x_t"], inputs["t"])
  compiled, compile_s, *flops = compile_counted(apply_fn, counted, *args)
  call = lambda: jax.block_until_ready(compiled(*args))
  times = timing.timed(call, warmup, repeats)
  return _row("sampling network call", batch_size, compile_s, times, *flops)


def format_table(rows: list[dict], peak_flops_per_s: float) -> str:
  lines = [
    "| measurement | batch | compile (s) | ms / call | images / s | model GFLOP / call "
    "| compiled GFLOP / call | model GFLOP/s | % of matmul peak |",
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for row in rows:
    times, batch, flops = row["times"], row["batch"], row["flops"]
    achieved = flops / statistics.median(times)
    lines.append(
      f"| {row['name']} | {batch or '–'} | {row['compile_s']:.1f} "
      f"| {timing.median_range([1e3 * t for t in times])} "
      f"| {timing.median_range([batch / t for t in times]) if batch else '–'} "
      f"| {flops / 1e9:.1f} | {row['compiled_flops'] / 1e9:.1f} | {achieved / 1e9:.0f} "
      f"| {100 * achieved / peak_flops_per_s:.1f} |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  reused = hostmem.configure(FLAGS.reuse_host_memory)  # Before JAX starts its CPU client.
  config = importlib.import_module(f"configs.{FLAGS.config}").get_config()
  config.sample.batch_size = FLAGS.sample_batch or config.sample.batch_size
  for field in ("dtype", "attention", "conv"):
    if getattr(FLAGS, field) is not None:
      config.model[field] = getattr(FLAGS, field)
  run = run_lib.make_run(config)
  # The same network with plain attention, XLA's convolutions and no remat, for the FLOP count.
  count_run = run
  if (config.model.attention, config.model.conv, config.model.remat) != ("plain", "xla", False):
    count_config = config.copy_and_resolve_references()
    count_config.model.attention, count_config.model.conv = "plain", "xla"
    count_config.model.remat = False
    count_run = run_lib.make_run(count_config)
  log = lambda message: print(message, file=sys.stderr, flush=True)

  log(f"matmul peak ({FLAGS.matmul_size}x{FLAGS.matmul_size} {FLAGS.matmul_dtype})")
  peak = matmul_peak(FLAGS.matmul_size, FLAGS.matmul_dtype, FLAGS.warmup, FLAGS.repeats)
  peak_flops_per_s = peak["flops"] / statistics.median(peak["times"])

  init = jax.jit(
    lambda key: step_lib.init_state(run.model, run.tx, run.image_shape, key),
    out_shardings=parallel.replicated(run.mesh),
  )
  state = init(rng.stream_key(config.seed, rng.INIT))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  rows = []
  for batch_size in batch_sizes:
    for k in (int(k) for k in FLAGS.steps_per_call):
      log(f"train step, batch {batch_size}, {k} per call")
      row, state = bench_train_step(
        run, count_run, state, batch_size, FLAGS.warmup, FLAGS.repeats, k, FLAGS.in_flight
      )
      rows.append(row)
      log(format_table([row], peak_flops_per_s))
  if FLAGS.sample_batch:
    log(f"sampling network call, batch {FLAGS.sample_batch}")
    rows.append(
      bench_sample_call(
        run, count_run, state.ema_params, FLAGS.sample_batch, FLAGS.warmup, FLAGS.repeats
      )
    )
  rows.append(peak)

  device = jax.devices()[0]
  print(
    f"**{FLAGS.config}** network, {num_params:,} parameters, model.dtype={config.model.dtype}, "
    f"model.attention={config.model.attention}, on {device.device_kind} "
    f"({device.platform}, {jax.device_count()} device(s)); jax {jax.__version__}; "
    f"{os.cpu_count()} CPUs. Median (min–max) of {FLAGS.repeats} timed calls after "
    f"{FLAGS.warmup} warm-up call(s); compile = lower + compile; freed host memory "
    f"{'kept for reuse' if reused else 'returned (malloc defaults)'}.\n"
  )
  print(format_table(rows, peak_flops_per_s))
  print(f"\nCommand: `{shlex.join(['python', *sys.argv])}`")


if __name__ == "__main__":
  app.run(main)
