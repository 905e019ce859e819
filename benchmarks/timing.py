"""Helpers shared by the benchmark scripts: compile time, repeated calls, table cells, the
grouping of XLA operations by their JAX source, and the worker processes of side-by-side runs."""

import contextlib
import json
import math
import re
import statistics
import subprocess
import sys
import time


def compile_timed(jitted, *args):
  """(compiled, seconds to lower and compile) for `jitted` at the shapes of `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def timed(call, warmup: int, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of `call` (which blocks) after `warmup` untimed ones."""
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times


def flops(compiled) -> float:
  """FLOPs of a compiled XLA program from its cost analysis (nan where there is none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # Older jax: one dict per HLO module.
    cost = cost[0] if cost else None
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def num(x: float) -> str:
  """`x` with at least 3 significant digits and no exponent: 0.682, 23.3, 12215."""
  digits = max(0, 2 - math.floor(math.log10(abs(x)))) if x else 0
  return f"{x:.{digits}f}"


def median_range(values: list[float]) -> str:
  """The median (min–max) of `values`."""
  return f"{num(statistics.median(values))} ({num(min(values))}–{num(max(values))})"


_WRAPPERS = {"jit", "jvp", "vmap", "transpose", "checkpoint", "remat", "pjit", "lambda"}


def source_group(source: str) -> str:
  """ "<pass> <layer>" of an operation's JAX source, for summing the elementwise time.

  The pass is backward (under `transpose(...)`), forward (elsewhere under `jvp(...)` or in the
  network) or update (outside both: optimizer, EMA, metrics); the layer is the innermost named
  module or function with its indices dropped ("norm", "conv", "temb_proj"; "block" for a
  ResBlock's own operations: dropout, the residual sum)."""
  source = source.split(";")[0]
  phase = "backward" if "transpose(" in source else "forward"
  if "jvp(" not in source and "UNet" not in source:
    phase = "update"
  parts = source.split("/")[:-1]  # the last part is the primitive
  if parts and parts[0].startswith("jit("):
    parts = parts[1:]  # the compiled function itself
  names = [
    name
    for part in parts
    for name in re.findall(r"[A-Za-z_]\w*", part)[-1:]
    if name not in _WRAPPERS
  ]
  layer = re.sub(r"_?\d+", "", names[-1]) if names else "other"
  layer = re.sub(r"^(down|up|mid)_?block$", "block", layer)
  return f"{phase} {'other' if layer == 'UNet' else layer}"


class Worker:
  """A worker process of a side-by-side benchmark and the conversation with it: one JSON
  command per line on its stdin, one JSON reply per line on its stdout."""

  def __init__(self, side: str, argv: list[str], log):
    self.side = side
    self.process = subprocess.Popen(
      argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
    )

  def ask(self, **command) -> dict:
    """Sends `command` (if any) and returns the worker's next reply."""
    if command:
      self.process.stdin.write(json.dumps(command) + "\n")
      self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the {self.side} worker stopped (exit {self.process.wait()})")
    return json.loads(line)


@contextlib.contextmanager
def worker_log(path: str):
  """The log file the workers write their stderr to; if a worker stops, its tail is shown."""
  with open(path, "w") as log:
    try:
      yield log
    except RuntimeError:
      log.flush()
      with open(path) as f:
        sys.stderr.write(f.read()[-5000:])
      raise


def serve(call, reply, finish) -> None:
  """A worker's side of the conversation: {"do": "time", "calls": n} times n calls of `call`
  and replies {"times": [...]}; any other command replies finish()'s fields and returns."""
  for line in sys.stdin:
    command = json.loads(line)
    if command["do"] == "time":
      reply(times=timed(call, 0, command["calls"]))
    else:
      reply(**finish())
      return
