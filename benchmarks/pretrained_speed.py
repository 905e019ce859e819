"""Stable Diffusion 1.5's U-Net call and VAE decoder against diffusers (PyTorch), float32, on a CPU.

Run from the repository root with the project's venv; diffusers runs in a venv of its own
(torch and diffusers, no jax), named by --peer_python:
  python benchmarks/pretrained_speed.py --peer_python=.venv-peer/bin/python --torch_compile
  python benchmarks/pretrained_speed.py --peer_python=.venv-peer/bin/python --networks=unet \\
    --attention=plain --conv=xla          # LatentUNetConfig's defaults

Random weights with Stable Diffusion 1.5's configs, the same on both sides: a helper process in
the peer's venv builds diffusers' UNet2DConditionModel and AutoencoderKL from seeded torch
initialisation and saves them (`save_pretrained`) to a temporary folder; ours loads those folders
(`pretrained.load_unet`, `pretrained.load_vae`), diffusers' side rebuilds the models from the same
seeds. The calls, float32, without gradients:
  - unet: one U-Net call on [2, 64, 64, 4] latents (batch 2, as classifier-free guidance runs
    it), t = 500 for both, a [2, 77, 768] text context;
  - vae: the decoder on [1, 64, 64, 4] latents (unit Gaussian / 0.18215) to a 512x512 image.
Ours runs with the options given (by default the fastest measured on a 2-core CPU: chunked
attention, Winograd's convolutions at the U-Net's first level and in the whole VAE decoder) and
reuse_host_memory as main.py sets it; the loader's freed buffers are handed back (malloc_trim)
before compiling.

Every (network, side) runs in a fresh process of its own: ours jitted (the compile time is lower
+ compile), diffusers eager under torch.no_grad with torch.set_num_threads(--threads) and, with
--torch_compile, also through `torch.compile` (its compile time is the first call's; its "first
call" is the one after). A network's processes start one after the other (load, compile,
--warmup untimed calls), then take turns: in each of --rounds rounds each process times --calls
calls while the others wait idle, so that other work on the machine hits all sides alike. The
table gives seconds per call, median (min–max) over all timed calls; each side's time over ours
(>= 1: ours at least as fast), of the medians and per round (median (min–max) of the rounds'
ratios, from which noise shared by neighbouring calls cancels); the process's peak resident
memory (VmHWM, loading included) and its peak from compiling on (VmHWM reset after loading); the
relative L2 difference of each output from diffusers' eager one; and the CPU time other processes
took during the timed calls, in cores (from /proc/stat: the machine's busy time less the timed
process's), with the load averages, to tell a disturbed run.
"""

import argparse
import ctypes
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402

# diffusers' UNet2DConditionModel config of Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5).
UNET_CONFIG = {
  "sample_size": 64,
  "in_channels": 4,
  "out_channels": 4,
  "center_input_sample": False,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "down_block_types": [
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  ],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "block_out_channels": [320, 640, 1280, 1280],
  "layers_per_block": 2,
  "downsample_padding": 1,
  "mid_block_scale_factor": 1,
  "act_fn": "silu",
  "norm_num_groups": 32,
  "norm_eps": 1e-5,
  "cross_attention_dim": 768,
  "attention_head_dim": 8,
}
# diffusers' AutoencoderKL config of Stable Diffusion's VAE.
VAE_CONFIG = {
  "sample_size": 512,
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ["DownEncoderBlock2D"] * 4,
  "up_block_types": ["UpDecoderBlock2D"] * 4,
  "block_out_channels": [128, 256, 512, 512],
  "layers_per_block": 2,
  "act_fn": "silu",
  "latent_channels": 4,
  "norm_num_groups": 32,
  "scaling_factor": 0.18215,
}
_SEEDS = {"unet": 0, "vae": 1}
_CALLS = {"unet": "U-Net call, batch 2, 64x64x4", "vae": "VAE decode, 64x64x4 -> 512x512"}


def inputs(seed: int = 0) -> dict[str, np.ndarray]:
  """The calls' inputs, NHWC."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  return {
    "x": normal(2, 64, 64, 4),
    "t": np.full((2,), 500, np.int32),
    "context": normal(2, 77, 768),
    "z": normal(1, 64, 64, 4) / np.float32(VAE_CONFIG["scaling_factor"]),
  }


def _peak_kib() -> int:
  """The process's peak resident memory (VmHWM) in KiB."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _reset_peak():
  """Resets VmHWM to the current resident memory (Linux 4.0+)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


# Each side's set-up loads the model and inputs: (network, folder, args) -> (compile, call, output)
# where compile() returns its seconds or None and output() is the last call's NHWC output. The
# imports are inside: each side runs in its own venv.


def _ours(network: str, folder: str, args):
  from diffusion_jax.runtime import hostmem

  hostmem.configure(True)  # Before JAX starts its CPU client, as main.py does by default.
  import jax

  from diffusion_jax.models import Autoencoder
  from diffusion_jax.pretrained import unet, vae

  data = np.load(os.path.join(folder, "inputs.npz"))
  if network == "unet":
    conv = tuple(args.conv.split(",")) if "," in args.conv else args.conv
    options = dict(attention=args.attention, conv=conv)
    model, params, _ = unet.load_unet(os.path.join(folder, "unet"), **options)
    apply = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
    operands = (data["x"], data["t"], data["context"])
  else:
    options = dict(conv=args.vae_conv, subpixel_upsample=args.vae_subpixel)
    model, params, _ = vae.load_vae(os.path.join(folder, "vae"), **options)
    apply = lambda p, z: model.apply({"params": p}, z, method=Autoencoder.decode)
    operands = (data["z"],)
  params, operands = jax.device_put((params, operands))
  # reuse_host_memory keeps freed memory resident: hand the loader's buffers back to the kernel.
  gc.collect()
  ctypes.CDLL(None).malloc_trim(0)
  holder = {}

  def compile_():
    holder["compiled"], seconds = timing.compile_timed(jax.jit(apply), params, *operands)
    return seconds

  def call():
    holder["out"] = holder["compiled"](params, *operands)
    holder["out"].block_until_ready()

  return compile_, call, lambda: np.asarray(holder["out"])


def peer_model(network: str):
  """diffusers' model of `network` with seeded random weights, in eval mode."""
  import torch
  from diffusers import AutoencoderKL, UNet2DConditionModel

  torch.manual_seed(_SEEDS[network])
  if network == "unet":
    return UNet2DConditionModel(**UNET_CONFIG).eval()
  return AutoencoderKL(**VAE_CONFIG).eval()


def _diffusers(network: str, folder: str, args, compiled: bool = False):
  import torch

  torch.set_num_threads(args.threads)
  model = peer_model(network)
  data = np.load(os.path.join(folder, "inputs.npz"))
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
  if network == "unet":
    operands = (nchw(data["x"]), torch.from_numpy(data["t"]), torch.from_numpy(data["context"]))
    forward = lambda x, t, c: model(x, t, c).sample
  else:
    operands = (nchw(data["z"]),)
    forward = lambda z: model.decode(z).sample
  if compiled:
    forward = torch.compile(forward)
  holder = {}

  def call():
    with torch.no_grad():
      holder["out"] = forward(*operands)

  def compile_():  # torch.compile compiles at the first call
    if not compiled:
      return None
    start = time.perf_counter()
    call()
    return time.perf_counter() - start

  return compile_, call, lambda: holder["out"].permute(0, 2, 3, 1).numpy()


_SIDES = {
  "ours": _ours,
  "diffusers": _diffusers,
  "diffusers_compiled": lambda *a: _diffusers(*a, compiled=True),
}
_NAMES = {
  "ours": "ours (JAX, jit)",
  "diffusers": "diffusers eager",
  "diffusers_compiled": "diffusers, torch.compile",
}


def worker(args):
  """One side of one network, driven by JSON lines on stdin; replies on stdout."""
  reply_to = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # the libraries' prints go to stderr
  reply = lambda **fields: print(json.dumps(fields), file=reply_to)
  start = time.perf_counter()
  compile_, call, output = _SIDES[args.worker](args.network, args.folder, args)
  setup_s = time.perf_counter() - start
  load_peak = _peak_kib()
  _reset_peak()
  compile_s = compile_()
  start = time.perf_counter()
  call()
  first_s = time.perf_counter() - start
  timing.timed(call, args.warmup - 1, 0)
  reply(setup_s=setup_s, compile_s=compile_s, first_s=first_s)

  def finish() -> dict:
    np.save(os.path.join(args.folder, f"out_{args.network}_{args.worker}.npy"), output())
    run_peak = _peak_kib()
    return {"peak_kib": max(load_peak, run_peak), "run_peak_kib": run_peak}

  timing.serve(call, reply, finish)


def prepare(args):
  """Saves the seeded diffusers models for ours to load."""
  for network in args.networks.split(","):
    peer_model(network).save_pretrained(os.path.join(args.folder, network))


def _busy_ticks() -> int:
  with open("/proc/stat") as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _process_ticks(pid: int) -> int:
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def _worker(side: str, network: str, args, log) -> timing.Worker:
  python = args.peer_python if side.startswith("diffusers") else sys.executable
  argv = [python, os.path.abspath(__file__), f"--worker={side}", f"--network={network}"]
  argv += [f"--{k}={getattr(args, k)}" for k in _WORKER_FLAGS]
  return timing.Worker(side, argv, log)


def measure(network: str, sides: list[str], args, log) -> dict:
  """{side: results} of one network: start the sides one by one, then alternate rounds."""
  workers, results = {}, {}
  try:
    for side in sides:
      print(f"{network}: starting {side}", file=sys.stderr, flush=True)
      workers[side] = _worker(side, network, args, log)
      results[side] = {**workers[side].ask(), "times": [], "rounds": [], "others": []}
    hz = os.sysconf("SC_CLK_TCK")
    for round_index in range(args.rounds):
      order = sides[round_index % len(sides) :] + sides[: round_index % len(sides)]
      for side in order:
        pid = workers[side].process.pid
        busy, own, start = _busy_ticks(), _process_ticks(pid), time.perf_counter()
        times = workers[side].ask(do="time", calls=args.calls)["times"]
        wall = time.perf_counter() - start
        others = (_busy_ticks() - busy) - (_process_ticks(pid) - own)
        results[side]["times"] += times
        results[side]["rounds"].append(statistics.median(times))
        results[side]["others"].append(max(others, 0) / hz / wall)
      print(f"{network}: round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for side, worker_ in workers.items():
      results[side].update(worker_.ask(do="finish"))
      worker_.process.wait()
  finally:  # a failed or interrupted run leaves no worker behind
    for worker_ in workers.values():
      if worker_.process.poll() is None:
        worker_.process.kill()
  reference = np.load(os.path.join(args.folder, f"out_{network}_diffusers.npy"))
  for side in sides:
    out = np.load(os.path.join(args.folder, f"out_{network}_{side}.npy"))
    results[side]["difference"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
  return results


def table(all_results: dict) -> list[str]:
  lines = [
    "| call | side | compile (s) | first call (s) | s / call, median (min–max) | this / ours "
    "| this / ours per round | peak RSS (GiB) | from compile on (GiB) | rel. L2 diff. "
    "| others' CPU (cores) |",
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for network, results in all_results.items():
    ours = statistics.median(results["ours"]["times"])
    ours_rounds = results["ours"]["rounds"]
    for side, r in results.items():
      per_round = [a / b for a, b in zip(r["rounds"], ours_rounds, strict=True)]
      cells = [
        _CALLS[network],
        _NAMES[side],
        "–" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
        f"{r['first_s']:.1f}",
        timing.median_range(r["times"]),
        f"{statistics.median(r['times']) / ours:.2f}",
        "–" if side == "ours" else timing.median_range(per_round),
        f"{r['peak_kib'] / 2**20:.2f}",
        f"{r['run_peak_kib'] / 2**20:.2f}",
        "–" if side == "diffusers" else f"{r['difference']:.1e}",
        f"{statistics.median(r['others']):.2f} (max {max(r['others']):.2f})",
      ]
      lines.append("| " + " | ".join(cells) + " |")
  return lines


_WORKER_FLAGS = (
  "folder",
  "threads",
  "warmup",
  "attention",
  "conv",
  "vae_conv",
  "vae_subpixel",
)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--peer_python", help="python of a venv with torch and diffusers")
  parser.add_argument("--networks", default="unet,vae", help="unet, vae or both")
  parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
  parser.add_argument("--calls", type=int, default=1, help="timed calls per side and round")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls (compile included)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's threads")
  parser.add_argument("--torch_compile", action="store_true", help="add torch.compile'd diffusers")
  parser.add_argument("--attention", default="chunked", help="our LatentUNetConfig.attention")
  parser.add_argument(
    "--conv",
    default="winograd,xla,xla,xla",
    help="our LatentUNetConfig.conv: one value, or one per level separated by commas",
  )
  parser.add_argument("--vae_conv", default="winograd", help="our AutoencoderConfig.conv")
  parser.add_argument(
    "--vae_subpixel",
    default=True,
    type=lambda s: s.lower() in ("1", "true"),
    help="our AutoencoderConfig.subpixel_upsample",
  )
  parser.add_argument("--worker", choices=["prepare", *_SIDES], help=argparse.SUPPRESS)
  parser.add_argument("--network", help=argparse.SUPPRESS)
  parser.add_argument("--folder", help=argparse.SUPPRESS)
  return parser.parse_args()


def main():
  args = parse_args()
  if args.worker == "prepare":
    return prepare(args)
  if args.worker:
    return worker(args)
  if not args.peer_python:
    sys.exit("error: --peer_python is needed: the python of a venv with torch and diffusers")
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up the workers and the folder
  networks = args.networks.split(",")
  sides = ["ours", "diffusers"] + (["diffusers_compiled"] if args.torch_compile else [])
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix="pretrained_speed_") as folder:
    args.folder = folder
    np.savez(os.path.join(folder, "inputs.npz"), **inputs())
    with timing.worker_log(os.path.join(folder, "workers.log")) as log:
      print("saving diffusers' random models", file=sys.stderr, flush=True)
      argv = [args.peer_python, os.path.abspath(__file__), "--worker=prepare"]
      subprocess.run(argv + [f"--folder={folder}", f"--networks={args.networks}"], check=True)
      results = {network: measure(network, sides, args, log) for network in networks}
    versions = subprocess.run(
      [
        args.peer_python,
        "-c",
        "import torch, diffusers; print(torch.__version__, diffusers.__version__)",
      ],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.split()
  import jax

  print(
    f"\n{os.cpu_count()} CPUs, float32; jax {jax.__version__}, torch {versions[0]} "
    f"({args.threads} threads), diffusers {versions[1]}; ours: attention={args.attention}, "
    f"conv={args.conv} (U-Net), conv={args.vae_conv}, subpixel_upsample={args.vae_subpixel} "
    f"(VAE); {args.rounds} alternating rounds of {args.calls} call(s) per side after "
    f"{args.warmup} warm-up call(s); load average before {load_before[0]:.2f}, after "
    f"{os.getloadavg()[0]:.2f}.\n"
  )
  print("\n".join(table(results)))
  for network, results_ in results.items():
    ours = statistics.median(results_["ours"]["times"])
    for side in sides[1:]:
      ratio = statistics.median(results_[side]["times"]) / ours
      print(f"\n{_CALLS[network]}: {_NAMES[side]} / ours = {ratio:.2f}", end="")
  print(f"\n\nCommand: `python {' '.join(sys.argv)}`")


if __name__ == "__main__":
  main()
