"""Cost of sampling's progress reporting: one sampling call with and without the host callback.

Run from the repository root:
  python benchmarks/sample_progress.py                               # shapes, ddpm, 400 steps, 64
  python benchmarks/sample_progress.py --rounds=7 --num_steps=100 --batch=16

Prints a Markdown table and the command line to stdout; progress goes to stderr. Both sampling
functions are `generate.make_sample_fn` as --mode=sample makes them (random weights), one plain
and one with `progress=SampleProgress(...)`, whose compiled scan calls back to the host at every
network call (the bar, drawn to an in-memory stream so that the terminal's speed does not count,
and the stop check). Each round times one `generate` call of one batch with each, in alternating
order (ABBA), so that drifts of the machine's speed fall on both alike; the table gives the median
(min–max) over the rounds and the ratio of the medians, and of each round's pair. On a busy
machine the rounds vary by more than the callback costs, so the same two variants also sample
with a network that returns zeros at once, where nearly all the time is the sampler's own work
and the callback: their difference, per network call, is the callback's cost.
"""

import importlib
import io
import os
import shlex
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment import generate  # noqa: E402
from diffusion_jax.experiment import run as run_lib  # noqa: E402
from diffusion_jax.runtime import hostmem  # noqa: E402
from diffusion_jax.sampling import samplers  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  # Defined when run, not on import: the tests import several benchmark scripts together.
  flags.DEFINE_enum("config", "shapes", ("cifar10", "shapes"), "Config whose network samples.")
  flags.DEFINE_enum("sampler", "ddpm", samplers.SAMPLERS, "sample.sampler.")
  flags.DEFINE_integer("num_steps", None, "sample.num_steps (default: the config's).")
  flags.DEFINE_integer("batch", 64, "Images per sampling call (sample.batch_size).")
  flags.DEFINE_integer("rounds", 5, "Timed rounds; each times one call of each variant.")
  flags.DEFINE_integer("warmup", 1, "Untimed rounds after compiling.")
  flags.DEFINE_integer("zero_rounds", 20, "Rounds with the network that returns zeros (0: none).")


class ZeroNet(nn.Module):
  """A network without parameters that predicts zeros: sampling without the network's work."""

  @nn.compact
  def __call__(self, x, t, train=False):
    return jnp.zeros_like(x)


def make_variants(run, model=None) -> dict:
  """{"plain": sample_fn, "progress": sample_fn with the host callback} for `run` (with `model`
  in place of its network, if given)."""
  bar = generate.SampleProgress(file=io.StringIO())
  if model is None:
    return {"plain": run.sample_fn(), "progress": run.sample_fn(progress=bar)}
  sample = run.sample
  make = lambda **options: generate.make_sample_fn(
    model,
    run.schedule,
    run.image_shape,
    sample.batch_size,
    run.mesh,
    sampler=sample.sampler,
    num_steps=sample.num_steps,
    prediction=run.diffusion.prediction,
    **options,
  )
  return {"plain": make(), "progress": make(progress=bar)}


def measure(
  variants: dict, params, batch: int, rounds: int, warmup: int, log=None, cpu=None
) -> dict:
  """{name: [seconds of each round's `generate` call of one batch]}, in alternating order.

  `cpu`, a dict, gets {name: [the process's CPU seconds (all threads) of each round's call]}:
  unlike the wall time, it hardly changes with the load of other processes."""
  key = rng.stream_key(0, rng.SAMPLE)
  names = list(variants)
  cpu = {} if cpu is None else cpu

  def call(name):
    start, start_cpu = time.perf_counter(), time.process_time()
    generate.generate(variants[name], params, key, batch, batch)
    cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return time.perf_counter() - start

  for _ in range(warmup):
    for name in names:
      call(name)
  cpu.clear()
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      times[name].append(call(name))
      if log:
        log(f"round {r + 1}/{rounds}: {name} {times[name][-1]:.2f} s")
  return times


def callback_cost_us(times: dict, calls: int) -> list[float]:
  """Per round, the extra microseconds per network call of "progress" over "plain"."""
  return [1e6 * (p - q) / calls for p, q in zip(times["progress"], times["plain"], strict=True)]


def format_table(times: dict, compile_s: dict, calls: int, cpu: dict) -> str:
  """Markdown: per variant the median (min–max) seconds per call and ms per network call, and
  the ratio to the first variant (of the medians, and the median and range of the rounds'); the
  same for the CPU seconds."""
  names = list(times)
  ratios = lambda values, base: (
    f"{statistics.median(values) / statistics.median(base):.4f} "
    f"| {timing.median_range([v / b for v, b in zip(values, base, strict=True)])}"
  )
  lines = [
    "| variant | compile (s) | s / call | ms / network call | ratio of medians | ratio per round "
    "| CPU s / call | CPU ratio of medians | CPU ratio per round |",
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for name in names:
    values = times[name]
    lines.append(
      f"| {name} | {compile_s[name]:.1f} | {timing.median_range(values)} "
      f"| {timing.median_range([1e3 * v / calls for v in values])} "
      f"| {ratios(values, times[names[0]])} | {timing.median_range(cpu[name])} "
      f"| {ratios(cpu[name], cpu[names[0]])} |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  reused = hostmem.configure(True)  # Before JAX starts its CPU client, as main.py does.
  config = importlib.import_module(f"configs.{FLAGS.config}").get_config()
  config.sample.sampler = FLAGS.sampler
  config.sample.num_steps = FLAGS.num_steps
  config.sample.batch_size = FLAGS.batch
  run = run_lib.make_run(config)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  params = jax.jit(run.init_state)(rng.stream_key(config.seed, rng.INIT)).params
  num_steps = FLAGS.num_steps or samplers.DEFAULT_NUM_STEPS.get(
    FLAGS.sampler, run.schedule.num_timesteps
  )
  calls = samplers.num_function_evaluations(FLAGS.sampler, num_steps)
  variants = make_variants(run)
  compile_s = {}
  key = rng.stream_key(0, rng.SAMPLE)
  for name, fn in variants.items():
    log(f"compiling {name}")
    _, compile_s[name] = timing.compile_timed(fn, params, key, jax.numpy.int32(0), {})
  cpu = {}
  times = measure(variants, params, FLAGS.batch, FLAGS.rounds, FLAGS.warmup, log, cpu)
  zero_times = None
  if FLAGS.zero_rounds:
    log("the same with a network that returns zeros")
    zero = make_variants(run, ZeroNet())
    zero_times = measure(zero, {}, FLAGS.batch, FLAGS.zero_rounds, FLAGS.warmup)

  device = jax.devices()[0]
  print(
    f"**{FLAGS.config}** network, {FLAGS.sampler} with {num_steps} steps ({calls} network calls), "
    f"a batch of {FLAGS.batch} {run.image_shape[0]}x{run.image_shape[1]} images per call, on "
    f"{device.device_kind} ({device.platform}, {jax.device_count()} device(s)); jax "
    f"{jax.__version__}; {os.cpu_count()} CPUs; freed host memory "
    f"{'kept for reuse' if reused else 'returned (malloc defaults)'}. Median (min–max) of "
    f"{FLAGS.rounds} rounds after {FLAGS.warmup} warm-up round(s), each one `generate` call per "
    "variant in alternating order; progress = the host callback at every network call with its "
    "bar drawn to memory; CPU = the process's CPU time, all threads.\n"
  )
  print(format_table(times, compile_s, calls, cpu))
  if zero_times:
    cost = callback_cost_us(zero_times, calls)
    network_ms = statistics.median(times["plain"]) * 1e3 / calls
    print(
      f"\nWith a network that returns zeros ({FLAGS.zero_rounds} rounds; ms / network call: "
      f"plain {timing.median_range([1e3 * t / calls for t in zero_times['plain']])}, progress "
      f"{timing.median_range([1e3 * t / calls for t in zero_times['progress']])}), the callback "
      f"costs {timing.median_range(cost)} µs per network call: "
      f"{statistics.median(cost) / 10 / network_ms:.2f}% of the network call above."
    )
  print(f"\nCommand: `{shlex.join(['python', *sys.argv])}`")


if __name__ == "__main__":
  define_flags()
  app.run(main)
