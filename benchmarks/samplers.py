"""Sampler accuracy against exact scores, and sampler speed with the CIFAR-10 network.

Run from the repository root:
  python benchmarks/samplers.py                          # everything (about 15 minutes on 2 cores)
  python benchmarks/samplers.py --sections=ode,ratio     # accuracy only
  python benchmarks/samplers.py --sections=timing --timing_batch=8

Prints Markdown tables for benchmarks/results/samplers.md and the command line to stdout;
progress goes to stderr. The model is replaced by the exact E[ε | x_t] of data with a closed-form
score (`diffusion_jax.testing.analytic.standard_problems`), so the only error left is the
sampler's own.

- ode: for the deterministic samplers (DDIM η=0, DPM-Solver++(2M), Heun), the distance between
  the sampler's x0 and the exact solution of the probability-flow ODE from the same x_T
  (`analytic.ode_solution`) against the number of model calls (NFE): the median over
  --num_samples samples of each sample's RMS error (the typical sample), and the RMS over all of
  them (dominated by the few trajectories near a boundary between modes); then the local order of
  convergence -log(e2/e1)/log(n2/n1) between neighbouring columns.
- dist: distance between --dist_samples samples and the data distribution, for every sampler:
  for the Gaussian, the KL divergence of the samples' Gaussian fit to the data Gaussian; for the
  mixture, the sliced 2-Wasserstein distance to as many exact draws. The floor row is the same
  distance for exact draws (pure sampling error).
- ratio: the smallest number of DDIM steps reaching DPM-Solver++'s median ODE error at 10 and 20
  NFE, for each of DDIM's spacings.
- timing: milliseconds per image per model call of each sampler with the CIFAR-10 U-Net
  (random weights, `generate.make_sample_fn` as --mode=sample runs it), median (min-max) of
  --repeats calls after --warmup ones, next to one bare network call.
"""

import functools
import importlib
import math
import os
import shlex
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402
from diffusion_jax.core import rng, schedules  # noqa: E402
from diffusion_jax.experiment import generate  # noqa: E402
from diffusion_jax.experiment import run as run_lib  # noqa: E402
from diffusion_jax.experiment import train_step as step_lib  # noqa: E402
from diffusion_jax.sampling import samplers  # noqa: E402
from diffusion_jax.testing import analytic  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sections", ["ode", "dist", "ratio", "timing"], "What to measure.")
flags.DEFINE_list("nfe", ["5", "10", "20", "50", "100", "1000"], "Model calls per sample.")
flags.DEFINE_enum("schedule", "linear", ["linear", "cosine"], "Schedule of the exact model.")
flags.DEFINE_integer("num_timesteps", 1000, "T of the schedule.")
flags.DEFINE_integer("num_samples", 512, "Samples of the ODE-error measurement.")
flags.DEFINE_integer("dist_samples", 16384, "Samples of the distribution-distance measurement.")
flags.DEFINE_integer("reference_steps", 1000, "RK4 steps of the reference ODE solution.")
flags.DEFINE_integer("timing_batch", 4, "Images per sampling call in the timing section.")
flags.DEFINE_integer("timing_nfe", 10, "Model calls per sample in the timing section.")
flags.DEFINE_integer("repeats", 3, "Timed calls per timing row; the median is reported.")
flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling, before the timed ones.")

# (row label, sampler, options): the deterministic samplers of the ODE table.
ODE_SAMPLERS = (
  ("ddim, uniform", "ddim", {"skip": "uniform"}),
  ("ddim, quadratic", "ddim", {"skip": "quadratic"}),
  ("ddim, logsnr", "ddim", {"skip": "logsnr"}),
  ("dpm_solver++, logsnr", "dpm_solver++", {"skip": "logsnr"}),
  ("dpm_solver++, quadratic", "dpm_solver++", {"skip": "quadratic"}),
  ("dpm_solver++, uniform", "dpm_solver++", {"skip": "uniform"}),
  ("heun", "heun", {}),
)
DIST_SAMPLERS = (
  ("ddpm, fixed_large", "ddpm", {"variance": "fixed_large"}),
  ("ddpm, fixed_small", "ddpm", {"variance": "fixed_small"}),
  ("ddim, η=1", "ddim", {"eta": 1.0}),
  ("ddim, η=0", "ddim", {}),
  ("dpm_solver++", "dpm_solver++", {}),
  ("heun", "heun", {}),
)


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def num_steps_for(sampler: str, nfe: int) -> int:
  """The num_steps with at most `nfe` model calls (heun: 2N - 1 calls)."""
  return (nfe + 1) // 2 if sampler == "heun" else nfe


@functools.cache
def _compiled(data_name, prediction, sampler, num_steps, options, batch):
  data = analytic.standard_problems()[data_name]
  schedule = schedules.make_schedule(FLAGS.schedule, FLAGS.num_timesteps)
  denoise_fn = analytic.exact_denoise_fn(data, schedule, prediction)
  shape = (batch, *data.means.shape[1:])
  fn = lambda key: samplers.sample(
    denoise_fn,
    schedule,
    shape,
    key,
    sampler=sampler,
    num_steps=num_steps,
    prediction=prediction,
    clip_x0=False,
    **dict(options),
  )
  return jax.jit(fn)


def run_sampler(data_name, sampler, num_steps, options, key, batch, prediction="eps"):
  """Samples [batch, *E] of the exact model of `data_name`, as float64 NumPy."""
  fn = _compiled(data_name, prediction, sampler, num_steps, tuple(sorted(options.items())), batch)
  return np.asarray(fn(key), np.float64)


def _sci(x: float) -> str:
  return f"{x:.2e}"


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


@functools.cache
def _reference(data_name: str):
  """(key, exact ODE solution [N, *E] float64, its distance to the half-as-fine solution)."""
  data = analytic.standard_problems()[data_name]
  schedule = schedules.make_schedule(FLAGS.schedule, FLAGS.num_timesteps)
  key = jax.random.key(1)
  x_T, _ = samplers.initial_noise(key, (FLAGS.num_samples, *data.means.shape[1:]))
  start = time.perf_counter()
  reference = analytic.ode_solution(data, schedule, x_T, FLAGS.reference_steps)
  coarse = analytic.ode_solution(data, schedule, x_T, FLAGS.reference_steps // 2)
  log(f"{data_name}: reference in {time.perf_counter() - start:.1f}s")
  return key, reference, analytic.rms(reference, coarse)


def ode_errors(data_name: str, sampler: str, num_steps: int, options: dict) -> np.ndarray:
  """Per-sample RMS distances [N] between the sampler's x0 and the exact ODE solution."""
  key, reference, _ = _reference(data_name)
  x = run_sampler(data_name, sampler, num_steps, options, key, FLAGS.num_samples)
  return np.sqrt(np.mean(np.square(x - reference).reshape(len(x), -1), axis=1))


def _orders(errs: list[tuple[int, float]]) -> list[float]:
  pairs = zip(errs[:-1], errs[1:], strict=True)
  return [-math.log(e2 / e1) / math.log(n2 / n1) for (n1, e1), (n2, e2) in pairs]


def ode_section(data_name: str, nfes: list[int]) -> str:
  """Median and RMS ODE errors of one problem against NFE, and the local orders."""
  data = analytic.standard_problems()[data_name]
  _, _, reference_error = _reference(data_name)
  tables = {"median": [], "rms": []}
  order_rows = []
  for label, sampler, options in ODE_SAMPLERS:
    results = {"median": [], "rms": []}
    for nfe in nfes:
      steps = num_steps_for(sampler, nfe)
      errors = ode_errors(data_name, sampler, steps, options)
      calls = samplers.num_function_evaluations(sampler, steps)
      results["median"].append((calls, float(np.median(errors))))
      results["rms"].append((calls, float(np.sqrt(np.mean(errors**2)))))
    for how, errs in results.items():
      cells = [
        _sci(e) + ("" if n == m else f" ({n})") for (n, e), m in zip(errs, nfes, strict=True)
      ]
      tables[how].append([label, *cells])
    medians, rmss = _orders(results["median"]), _orders(results["rms"])
    order_rows.append([label] + [f"{a:.2f} / {b:.2f}" for a, b in zip(medians, rmss, strict=True)])
  header = ["sampler"] + [str(n) for n in nfes]
  closed = " (closed form for one Gaussian)" if data.means.shape[0] == 1 else ""
  return (
    f"**{data_name}** ({FLAGS.num_samples} samples of shape {tuple(data.means.shape[1:])}): "
    f"error of x0 against the exact ODE solution from the same x_T, by NFE (Heun's actual NFE in "
    f"brackets). Reference: {FLAGS.reference_steps}-step RK4{closed}, within "
    f"{reference_error:.0e} of the {FLAGS.reference_steps // 2}-step one.\n\n"
    "Median over samples of the per-sample RMS error:\n\n"
    + _table(header, tables["median"])
    + "\n\nRMS over all samples:\n\n"
    + _table(header, tables["rms"])
    + "\n\nLocal order of convergence between neighbouring columns, median / RMS:\n\n"
    + _table(
      ["sampler"] + [f"{a}→{b}" for a, b in zip(nfes[:-1], nfes[1:], strict=True)], order_rows
    )
  )


def dist_section(data_name: str, nfes: list[int]) -> str:
  data = analytic.standard_problems()[data_name]
  n = FLAGS.dist_samples
  draw = lambda seed: np.asarray(analytic.sample_data(data, jax.random.key(seed), n))
  if data.means.shape[0] == 1:
    distance = lambda x: analytic.gaussian_kl(x, data)
    what = "KL (nats) of the samples' Gaussian fit to the data Gaussian"
  else:
    exact, projections = draw(11), jax.random.key(12)
    distance = lambda x: analytic.sliced_wasserstein(x, exact, projections)
    what = "sliced 2-Wasserstein distance to as many exact draws (256 directions)"
  rows = []
  for label, sampler, options in DIST_SAMPLERS:
    row = [label]
    for nfe in nfes:
      steps = num_steps_for(sampler, nfe)
      if steps < samplers.MIN_NUM_STEPS[sampler]:
        row.append("–")
        continue
      x = run_sampler(data_name, sampler, steps, options, jax.random.key(2), n)
      row.append(_sci(distance(x)))
    rows.append(row)
  floors = [distance(draw(seed)) for seed in range(100, 108)]
  floor = f"{np.mean(floors):.2e} ± {np.std(floors, ddof=1):.0e}"
  return (
    f"**{data_name}**, {n} samples: {what}. The floor is the same distance for exact draws "
    f"(mean ± sd over 8 sets): pure sampling error.\n\n"
    + _table(["sampler"] + [str(nfe) for nfe in nfes], rows)
    + f"\n\nFloor: {floor}."
  )


def ratio_section(data_names: list[str]) -> str:
  """Smallest DDIM num_steps whose median ODE error is at most DPM-Solver++'s at 10 and 20 NFE."""
  rows = []
  for data_name in data_names:
    ddim_error = lambda steps, skip, data_name=data_name: float(
      np.median(ode_errors(data_name, "ddim", steps, {"skip": skip}))
    )
    for nfe in (10, 20):
      target = float(np.median(ode_errors(data_name, "dpm_solver++", nfe, {"skip": "logsnr"})))
      row = [data_name, str(nfe), _sci(target)]
      for skip in ("uniform", "quadratic", "logsnr"):
        # Bisection for the smallest S with error <= target (the error falls with S).
        low, high = nfe, FLAGS.num_timesteps
        if ddim_error(high, skip) > target:
          row.append(f"> {high}")
          continue
        while high - low > 1:
          mid = (low + high) // 2
          low, high = (low, mid) if ddim_error(mid, skip) <= target else (mid, high)
        row.append(f"{high} ({high / nfe:.1f}×)")
      rows.append(row)
  return (
    "NFE DDIM needs to reach DPM-Solver++(2M)'s median ODE error (logsnr spacing), by bisection "
    "over DDIM's num_steps, and its ratio to DPM-Solver++'s NFE:\n\n"
    + _table(
      ["problem", "DPM-Solver++ NFE", "its error", "DDIM uniform", "DDIM quadratic", "DDIM logsnr"],
      rows,
    )
  )


def timing_section() -> str:
  config = importlib.import_module("configs.cifar10").get_config()
  batch = FLAGS.timing_batch
  config.sample.batch_size = batch
  run = run_lib.make_run(config)
  init = jax.jit(lambda key: step_lib.init_state(run.model, run.tx, run.image_shape, key))
  params = init(rng.stream_key(config.seed, rng.INIT)).ema_params
  num_params = sum(x.size for x in jax.tree.leaves(params))
  key = jax.random.key(0)
  rows = []

  x_t = jax.random.normal(key, (batch, *run.image_shape))
  t = np.full((batch,), 500, np.int32)
  apply_fn = jax.jit(lambda p, x, t: run.model.apply({"params": p}, x, t, train=False))
  start = time.perf_counter()
  compiled = apply_fn.lower(params, x_t, t).compile()
  compile_s = time.perf_counter() - start
  times = timing.timed(lambda: jax.block_until_ready(compiled(params, x_t, t)), 2, FLAGS.repeats)
  rows.append(
    [
      "network call alone",
      "1",
      f"{compile_s:.1f}",
      timing.median_range([1e3 * s / batch for s in times]),
    ]
  )

  for sampler in samplers.SAMPLERS:
    steps = num_steps_for(sampler, FLAGS.timing_nfe)
    nfe = samplers.num_function_evaluations(sampler, steps)
    log(f"timing {sampler}, {nfe} NFE, batch {batch}")
    sample_fn = generate.make_sample_fn(
      run.model,
      run.schedule,
      run.image_shape,
      batch,
      run.mesh,
      sampler=sampler,
      num_steps=steps,
      to_uint8=False,
      prediction="eps",
      clip_x0=True,
    )
    start = time.perf_counter()
    compiled = sample_fn.lower(params, key, np.int32(0), {}).compile()
    compile_s = time.perf_counter() - start
    call = lambda compiled=compiled: jax.block_until_ready(compiled(params, key, np.int32(0), {}))
    times = timing.timed(call, FLAGS.warmup, FLAGS.repeats)
    rows.append(
      [
        sampler,
        str(nfe),
        f"{compile_s:.1f}",
        timing.median_range([1e3 * s / (batch * nfe) for s in times]),
      ]
    )

  device = jax.devices()[0]
  return (
    f"CIFAR-10 U-Net ({num_params:,} parameters, random weights), batch {batch}, on "
    f"{device.device_kind} ({device.platform}); median (min–max) of {FLAGS.repeats} calls after "
    f"{FLAGS.warmup} warm-up call(s):\n\n"
    + _table(["sampler", "NFE", "compile (s)", "ms / image / NFE"], rows)
  )


def main(argv):
  del argv
  nfes = [int(n) for n in FLAGS.nfe]
  sections = set(FLAGS.sections)
  problems = list(analytic.standard_problems())
  print(
    f"{FLAGS.schedule} schedule, T = {FLAGS.num_timesteps}; exact ε of "
    f"`analytic.standard_problems()`; jax {jax.__version__}, {os.cpu_count()} CPUs.\n"
  )
  # The accuracy sections compile ~300 small programs: XLA's cheapest pipeline (same results
  # up to float rounding) keeps that to minutes; the timing section uses the default one.
  jax.config.update("jax_disable_most_optimizations", True)
  if "ode" in sections:
    for name in problems:
      print(ode_section(name, nfes) + "\n", flush=True)
  if "dist" in sections:
    for name in ("gaussian_2d", "mixture_2d"):
      log(f"distribution distances: {name}")
      print(dist_section(name, nfes) + "\n", flush=True)
  if "ratio" in sections:
    log("DPM-Solver++ against DDIM")
    print(ratio_section(problems) + "\n", flush=True)
  jax.config.update("jax_disable_most_optimizations", False)
  if "timing" in sections:
    print(timing_section() + "\n", flush=True)
  print(f"Command: `{shlex.join(['python', *sys.argv])}`")


if __name__ == "__main__":
  app.run(main)
