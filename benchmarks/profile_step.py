"""Where the train step's time goes: XLA's own per-operation trace, summed by kind of operation.

Run from the repository root:
  python benchmarks/profile_step.py                      # CIFAR-10 network, train step, batch 32
  python benchmarks/profile_step.py --what=sample --batch=64
  python benchmarks/profile_step.py --config.model.subpixel_upsample=False

Compiles the program as the trainer does, runs it once to warm up, then once under
`jax.profiler.trace`, reads the trace back (`jax.profiler.ProfileData`) and sums the duration
of every XLA operation by kind: convolution forward, input gradient and weight gradient (from
the operation's shape and its JAX source in the HLO metadata), matrix products, layout copies and
the remaining fused elementwise/reduction work; on a GPU, the kernels' time on the device, with
cuDNN and cuBLAS calls told apart by their custom-call target. On a CPU the operations run on a
pool of threads and one operation may use several, so the times are thread time: their sum
exceeds the step's wall time, and the shares are what to compare. Prints a Markdown table and
the top operations.

On a GPU it also lists the memory-bound operations (all but cuDNN, cuBLAS and GEMM fusions)
that run furthest below the memory's copy rate (`--bandwidth`): each one's bytes come from the
compiled program (`gpu_compile.kernels`), its time from the trace. `--from_dir` prints that table
from the ops.tsv and hlo.txt.gz that `--out_dir` wrote on a GPU, on any machine, running nothing:
  python benchmarks/profile_step.py --from_dir=/tmp/h100_profile
"""

import collections
import csv
import dataclasses
import glob
import gzip
import os
import re
import shlex
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_compile, timing  # noqa: E402
from diffusion_jax import models  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.runtime import (
  hostmem,  # noqa: E402
  parallel,  # noqa: E402
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", "configs/cifar10.py", "Config whose network is profiled.", lock_config=True
)
flags.DEFINE_enum("what", "train", ("train", "sample"), "The train step or one sampling call.")
flags.DEFINE_integer("batch", 32, "Global batch.")
flags.DEFINE_integer("top", 12, "Single operations listed after the table.")
flags.DEFINE_string("top_kind", "", "List the longest operations of this kind only (a prefix).")
flags.DEFINE_integer("groups", 12, "Groups of the elementwise time by JAX source listed.")
flags.DEFINE_string(
  "out_dir",
  "",
  "Also write every operation (ops.tsv: time, kind, result, source) and the compiled program "
  "(hlo.txt.gz) there.",
)
flags.DEFINE_string(
  "from_dir",
  "",
  "Print only the operations furthest below --bandwidth, from the ops.tsv and hlo.txt.gz that "
  "--out_dir wrote on a GPU; compiles and runs nothing.",
)
flags.DEFINE_float(
  "bandwidth", 3.0e12, "Copy rate in bytes/s that GPU operations are compared with (an H100's)."
)
flags.DEFINE_integer("slow", 15, "Operations furthest below --bandwidth listed (GPU only).")

_CATEGORIES = (
  "convolution, weight gradient",
  "convolution, input gradient",
  "convolution, forward",
  "matrix products (dense layers, attention)",
  "layout copies and transposes",
  "elementwise and reductions (GroupNorm, swish, Adam, ...)",
)


def hlo_operations(hlo_text: str) -> dict[str, tuple[str, str, str, bool]]:
  """{operation name: (result shape, JAX source op_name, custom-call target, computes)} from HLO.

  `computes` is whether the operation is, or fuses, a matrix product or a convolution: XLA:CPU
  also hands reductions to its matrix library's fusions (`ynn_fusion`), which compute none.
  """
  computations = {}  # {computation name: opcodes of its instructions}
  for name, body in re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S):
    computations[name] = set(re.findall(r"= \S+ ([\w\-]+)\(", body))
  operations = {}
  for name, rest in re.findall(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo_text, re.M):
    shape = re.match(r"\(?(\w+\[[\d,]*\])", rest)
    source = re.search(r'op_name="([^"]*)"', rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    opcode = re.match(r"\S+ ([\w\-]+)\(", rest)
    opcodes = {opcode.group(1)} if opcode else set()
    for called in re.findall(r"calls=%?([\w.\-]+)", rest):
      opcodes |= computations.get(called, set())
    operations.setdefault(
      name,
      (
        shape.group(1) if shape else "",
        source.group(1) if source else "",
        target.group(1) if target else "",
        bool(opcodes & {"dot", "convolution", "custom-call"}),
      ),
    )
  return operations


# GPU library calls by custom-call target: cuDNN convolutions and cuBLAS matrix products.
_TARGETS = {
  "convBackwardFilter": _CATEGORIES[0],
  "convBackwardInput": _CATEGORIES[1],
  "convForward": _CATEGORIES[2],
  "convBiasActivationForward": _CATEGORIES[2],
  "cublas": _CATEGORIES[3],
}


def category(name: str, shape: str, source: str, target: str = "", computes: bool = True) -> str:
  """The kind of an XLA operation, from its name, result shape, JAX source and call target.

  `computes` is False for a library fusion that holds no matrix product or convolution.
  """
  for key, kind in _TARGETS.items():
    if key in target:
      return kind
  library = name.startswith(
    ("convolution", "conv_general_dilated", "ynn_fusion", "xnn_fusion", "dot", "gemm_fusion")
  )
  if library and computes:
    if re.match(r"\w+\[(\d+,3,3,\d+|3,3,\d+,\d+)\]$", shape):
      return _CATEGORIES[0]  # a 3x3 kernel's shape (XLA names no source for these)
    if "conv_general_dilated" in source:
      return _CATEGORIES[1] if "transpose(" in source else _CATEGORIES[2]
    return _CATEGORIES[3]
  if name.startswith(("transpose", "copy")):
    return _CATEGORIES[4]
  return _CATEGORIES[5]


def trace_durations(trace_dir: str) -> collections.Counter:
  """{operation name: summed duration in ns} over the trace's GPU kernels, else CPU threads."""
  (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
  planes = list(jax.profiler.ProfileData.from_file(path).planes)
  gpus = [plane for plane in planes if plane.name.startswith("/device:GPU")]
  durations = collections.Counter()
  for plane in gpus or planes:
    for line in plane.lines:
      for event in line.events:
        operation = dict(event.stats).get("hlo_op")
        if operation:
          durations[operation] += event.duration_ns
  return durations


@dataclasses.dataclass(frozen=True)
class SlowOperation:
  name: str
  shape: str
  source: str
  us: float
  bytes: int  # read and written, as gpu_compile.kernels counts them
  excess_us: float  # us - bytes / bandwidth: the time over what the copy rate allows


def below_copy_rate(
  durations_us: dict[str, float], hlo_text: str, bandwidth: float
) -> list[SlowOperation]:
  """The memory-bound operations of a GPU program, the most time over `bandwidth` first."""
  kernels = {k.name: k for k in gpu_compile.kernels(hlo_text)}
  slow = []
  for name, us in durations_us.items():
    kernel = kernels.get(name)
    if kernel is None or kernel.library:
      continue
    excess = us - 1e6 * kernel.bytes / bandwidth
    slow.append(SlowOperation(name, kernel.shape, kernel.source, us, kernel.bytes, excess))
  return sorted(slow, key=lambda op: -op.excess_us)


def print_below_copy_rate(slow: list[SlowOperation], bandwidth: float, top: int):
  total_us = sum(op.us for op in slow)
  moved = sum(op.bytes for op in slow)
  print(
    f"\nMemory-bound operations: {len(slow)}, {timing.num(total_us / 1e3)} ms moving "
    f"{moved / 1e9:.2f} GB ({timing.num(moved / total_us / 1e6)} TB/s on average); at "
    f"{bandwidth / 1e12:g} TB/s they would take {timing.num(1e3 * moved / bandwidth)} ms. The "
    f"{top} furthest below that rate:\n"
  )
  print("| operation | result | JAX source | µs | MB | TB/s | µs over |")
  print("|---|---|---|--:|--:|--:|--:|")
  for op in slow[:top]:
    source = op.source.removeprefix("jit(").split(")/", 1)[-1]
    shape = op.shape if len(op.shape) <= 60 else op.shape[:57] + "..."
    print(
      f"| {op.name} | `{shape}` | {source} | {op.us:.1f} | {op.bytes / 1e6:.1f} "
      f"| {op.bytes / op.us / 1e6:.2f} | {op.excess_us:.1f} |"
    )


def read_operations(out_dir: str) -> tuple[dict[str, float], str]:
  """({operation: µs}, HLO text) from the files `write_operations` wrote."""
  with open(os.path.join(out_dir, "ops.tsv")) as f:
    durations = {row["operation"]: float(row["us"]) for row in csv.DictReader(f, delimiter="\t")}
  with gzip.open(os.path.join(out_dir, "hlo.txt.gz"), "rt") as f:
    return durations, f.read()


def compiled_program(run, config):
  """(compiled function, its arguments) of the train step or of one sampling network call."""
  init = jax.jit(
    lambda key: step_lib.init_state(run.model, run.tx, run.image_shape, key),
    out_shardings=parallel.replicated(run.mesh),
  )
  state = init(rng.stream_key(config.seed, rng.INIT))
  np_rng = np.random.default_rng(0)
  if FLAGS.what == "train":
    images = np_rng.integers(0, 256, (FLAGS.batch, *run.image_shape), dtype=np.uint8)
    args = (state, parallel.put_batch({"image": images}, run.mesh))
    args += (rng.stream_key(config.seed, rng.TRAIN),)
    return step_lib.compile_train_step(run).lower(*args).compile(), args
  apply = lambda p, x, t: run.model.apply({"params": p}, x, t, train=False)
  chunk = config.model.get("microbatch", 0)
  apply_fn = jax.jit(lambda p, x, t: models.in_chunks(lambda x, t: apply(p, x, t), chunk)(x, t))
  x = np_rng.standard_normal((FLAGS.batch, *run.image_shape), dtype=np.float32)
  t = np_rng.integers(0, run.schedule.num_timesteps, (FLAGS.batch,), dtype=np.int32)
  args = (state.ema_params, x, t)
  return apply_fn.lower(*args).compile(), args


def main(argv):
  del argv
  if FLAGS.from_dir:
    durations, hlo_text = read_operations(FLAGS.from_dir)
    print_below_copy_rate(
      below_copy_rate(durations, hlo_text, FLAGS.bandwidth), FLAGS.bandwidth, FLAGS.slow
    )
    print(f"\nCommand: `{shlex.join(['python', *sys.argv])}`")
    return
  config = FLAGS.config
  hostmem.configure(config.get("reuse_host_memory", False))  # Before JAX starts its CPU client.
  run = run_lib.make_run(config)
  compiled, args = compiled_program(run, config)
  operations = hlo_operations(compiled.as_text())
  if FLAGS.what == "train":
    # The state is donated: feed each call the state the previous one returned.
    def call(args):
      state, metrics = compiled(*args)
      return (state, *args[1:]), metrics
  else:
    call = lambda args: (args, compiled(*args))
  args, out = call(args)
  jax.block_until_ready(out)
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      args, out = call(args)
      jax.block_until_ready(out)
    wall = time.perf_counter() - start
    durations = trace_durations(trace_dir)

  by_category = collections.Counter()
  counts = collections.Counter()
  for name, ns in durations.items():
    kind = category(name, *operations.get(name, ("", "", "", True)))
    by_category[kind] += ns
    counts[kind] += 1
  total = sum(by_category.values())
  what = "train step" if FLAGS.what == "train" else "sampling network call"
  device = jax.devices()[0]
  gflop = timing.flops(compiled) / 1e9
  gpu = device.platform == "gpu"
  where = "kernel time on the GPU" if gpu else "summed over threads"
  gpu_note = ", without cuDNN's convolutions" if gpu else ""
  print(
    f"**{what}**, batch {FLAGS.batch}, on {device.device_kind} ({os.cpu_count()} CPUs), "
    f"jax {jax.__version__}: {timing.num(1e3 * wall)} ms wall time under the profiler, "
    f"{timing.num(total / 1e6)} ms of operation time ({where}); XLA's cost analysis counts "
    f"{gflop:.0f} GFLOP ({gflop / FLAGS.batch:.1f} per image{gpu_note}).\n"
  )
  print("| kind of operation | operations | time (ms) | share |")
  print("|---|--:|--:|--:|")
  for kind in _CATEGORIES:
    ns = by_category[kind]
    print(f"| {kind} | {counts[kind]} | {timing.num(ns / 1e6)} | {100 * ns / total:.1f}% |")
  kind = f" ({FLAGS.top_kind}...)" if FLAGS.top_kind else ""
  print(f"\nThe {FLAGS.top} longest operations{kind}:\n")
  print("| operation | result | JAX source | ms |")
  print("|---|---|---|--:|")
  listed = [
    (name, ns)
    for name, ns in durations.most_common()
    if category(name, *operations.get(name, ("", "", "", True))).startswith(FLAGS.top_kind)
  ]
  for name, ns in listed[: FLAGS.top]:
    shape, source, *_ = operations.get(name, ("", "", "", True))
    source = source.removeprefix("jit(").split(")/", 1)[-1]
    print(f"| {name} | `{shape}` | {source} | {timing.num(ns / 1e6)} |")
  groups, sizes = collections.Counter(), collections.Counter()
  for name, ns in durations.items():
    info = operations.get(name, ("", "", "", True))
    if category(name, *info) == _CATEGORIES[-1]:
      groups[timing.source_group(info[1])] += ns
    us = ns / 1e3
    sizes[
      "< 5 µs" if us < 5 else "5–20 µs" if us < 20 else "20–100 µs" if us < 100 else "≥ 100 µs"
    ] += 1
  print(f"\nElementwise and reductions by JAX source, the {FLAGS.groups} largest:\n")
  print("| pass and layer | ms |")
  print("|---|--:|")
  for group, ns in groups.most_common(FLAGS.groups):
    print(f"| {group} | {timing.num(ns / 1e6)} |")
  print("\nOperations by duration: " + ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items())))
  if gpu:
    durations_us = {name: ns / 1e3 for name, ns in durations.items()}
    slow = below_copy_rate(durations_us, compiled.as_text(), FLAGS.bandwidth)
    print_below_copy_rate(slow, FLAGS.bandwidth, FLAGS.slow)
  if FLAGS.out_dir:
    write_operations(FLAGS.out_dir, durations, operations, compiled.as_text())
  print(f"\nCommand: `{shlex.join(['python', *sys.argv])}`")


def write_operations(out_dir: str, durations, operations, hlo_text: str):
  """ops.tsv (every operation, longest first) and hlo.txt.gz (the compiled program) in out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "ops.tsv"), "w") as f:
    f.write("operation\tus\tkind\tresult\tsource\ttarget\n")
    for name, ns in durations.most_common():
      shape, source, target, computes = operations.get(name, ("", "", "", True))
      kind = category(name, shape, source, target, computes)
      f.write(f"{name}\t{ns / 1e3:.1f}\t{kind}\t{shape}\t{source}\t{target}\n")
  with gzip.open(os.path.join(out_dir, "hlo.txt.gz"), "wt") as f:
    f.write(hlo_text)


if __name__ == "__main__":
  app.run(main)
