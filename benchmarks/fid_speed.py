"""FID feature extraction: our FID Inception-v3 (jitted) against pytorch-fid's, on a CPU.

Run from the repository root with the project's venv; pytorch-fid runs in a venv of its own
(torch, torchvision, pytorch-fid; no jax), named by --peer_python:
  python benchmarks/fid_speed.py --peer_python=/tmp/peer-venv/bin/python
  python benchmarks/fid_speed.py --peer_python=/tmp/peer-venv/bin/python --batch=50 --size=32 \\
    --rounds=7 --threads=2

One call: the [B, 2048] pool features of --batch images of --size x --size in [0, 1] (uniform
noise), resized to 299x299 inside the network (torch's bilinear interpolation) and scaled to
[-1, 1], float32, without gradients. Random weights, the same on both sides: this process writes
an .npz of pytorch-fid's state dict (He-scaled convolutions, batch norm near the identity) from
`pretrained.inception.weight_map`; ours loads it with `load_fid_inception`, pytorch-fid's
`InceptionV3([3])` gets it in place of its download.

Each side runs in a fresh process: ours jitted (compile = lower + compile), pytorch-fid eager
under torch.no_grad with torch.set_num_threads(--threads). Both start (load, compile, --warmup
untimed calls), then take turns: in each of --rounds rounds each times --calls calls while the
other waits idle. The table gives seconds per call and images/s, median (min–max) over all timed
calls, pytorch-fid's time over ours (>= 1: ours faster) of the medians and per round, and the
relative L2 difference of our features from pytorch-fid's.
"""

import argparse
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

_NAMES = {"ours": "ours (JAX, jit)", "pytorch_fid": "pytorch-fid eager"}


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """pytorch-fid's state dict (no batch norm counters) with random weights, torch layouts."""
  from diffusion_jax.pretrained.inception import weight_map

  rng = np.random.default_rng(seed)
  state = {}
  for name, _, shape in weight_map():
    if name.endswith("weight") and len(shape) > 1:
      x = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif name.endswith(("bn.weight", "running_var")):
      x = rng.uniform(0.8, 1.2, shape)
    else:
      x = 0.05 * rng.standard_normal(shape)
    state[name] = x.astype(np.float32)
  return state


def _ours(args):
  import jax

  from diffusion_jax.pretrained.inception import load_fid_inception

  model, params = load_fid_inception(os.path.join(args.folder, "weights.npz"), conv=args.conv)
  images = np.load(os.path.join(args.folder, "images.npy"))
  params, images = jax.device_put((params, images))
  holder = {}

  def compile_():
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    holder["compiled"], seconds = timing.compile_timed(apply, params, images)
    return seconds

  def call():
    holder["out"] = holder["compiled"](params, images)
    holder["out"].block_until_ready()

  return compile_, call, lambda: np.asarray(holder["out"])


def _pytorch_fid(args):
  import torch
  from pytorch_fid import inception

  torch.set_num_threads(args.threads)
  with np.load(os.path.join(args.folder, "weights.npz")) as data:
    state = {k: torch.from_numpy(data[k]) for k in data.files}
  inception.load_state_dict_from_url = lambda *unused, **unused_too: state
  model = inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  images = np.load(os.path.join(args.folder, "images.npy"))
  images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  holder = {}

  def call():
    with torch.no_grad():
      holder["out"] = model(images)[0].flatten(1)

  return lambda: None, call, lambda: holder["out"].numpy()


_SIDES = {"ours": _ours, "pytorch_fid": _pytorch_fid}


def worker(args):
  """One side, driven by JSON lines on stdin; replies on stdout."""
  reply_to = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # the libraries' prints go to stderr
  reply = lambda **fields: print(json.dumps(fields), file=reply_to)
  compile_, call, output = _SIDES[args.worker](args)
  compile_s = compile_()
  start = time.perf_counter()
  call()
  first_s = time.perf_counter() - start
  timing.timed(call, args.warmup - 1, 0)
  reply(compile_s=compile_s, first_s=first_s)

  def finish() -> dict:
    np.save(os.path.join(args.folder, f"out_{args.worker}.npy"), output())
    return {}

  timing.serve(call, reply, finish)


def _worker(side: str, args, log) -> timing.Worker:
  python = args.peer_python if side == "pytorch_fid" else sys.executable
  argv = [python, os.path.abspath(__file__), f"--worker={side}"]
  argv += [f"--{k}={getattr(args, k)}" for k in ("folder", "threads", "warmup", "conv")]
  return timing.Worker(side, argv, log)


def measure(args, log) -> dict:
  """{side: results}: start the sides one by one, then alternate rounds."""
  workers, results = {}, {}
  try:
    for side in _SIDES:
      print(f"starting {side}", file=sys.stderr, flush=True)
      workers[side] = _worker(side, args, log)
      results[side] = {**workers[side].ask(), "times": [], "rounds": []}
    sides = list(_SIDES)
    for round_index in range(args.rounds):
      for side in sides[round_index % 2 :] + sides[: round_index % 2]:
        times = workers[side].ask(do="time", calls=args.calls)["times"]
        results[side]["times"] += times
        results[side]["rounds"].append(statistics.median(times))
      print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for worker_ in workers.values():
      worker_.ask(do="finish")
      worker_.process.wait()
  finally:  # a failed or interrupted run leaves no worker behind
    for worker_ in workers.values():
      if worker_.process.poll() is None:
        worker_.process.kill()
  ours, reference = (np.load(os.path.join(args.folder, f"out_{s}.npy")) for s in _SIDES)
  results["ours"]["difference"] = float(
    np.linalg.norm(ours - reference) / np.linalg.norm(reference)
  )
  return results


def table(results: dict, batch: int) -> list[str]:
  lines = [
    "| side | compile (s) | first call (s) | s / call, median (min–max) | images / s "
    "| this / ours | this / ours per round | rel. L2 diff. |",
    "|---|--:|--:|--:|--:|--:|--:|--:|",
  ]
  ours = statistics.median(results["ours"]["times"])
  for side, r in results.items():
    per_round = [a / b for a, b in zip(r["rounds"], results["ours"]["rounds"], strict=True)]
    cells = [
      _NAMES[side],
      "–" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
      f"{r['first_s']:.1f}",
      timing.median_range(r["times"]),
      timing.num(batch / statistics.median(r["times"])),
      f"{statistics.median(r['times']) / ours:.2f}",
      "–" if side == "ours" else timing.median_range(per_round),
      f"{r['difference']:.1e}" if "difference" in r else "–",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--peer_python", help="python of a venv with torch and pytorch-fid")
  parser.add_argument("--batch", type=int, default=50, help="images per call")
  parser.add_argument("--size", type=int, default=32, help="image height and width")
  parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
  parser.add_argument("--calls", type=int, default=1, help="timed calls per side and round")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls (compile included)")
  parser.add_argument("--conv", default="auto", help="our 3x3 convolutions (load_fid_inception)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's threads")
  parser.add_argument("--worker", choices=list(_SIDES), help=argparse.SUPPRESS)
  parser.add_argument("--folder", help=argparse.SUPPRESS)
  return parser.parse_args()


def main():
  args = parse_args()
  if args.worker:
    return worker(args)
  if not args.peer_python:
    sys.exit("error: --peer_python is needed: the python of a venv with torch and pytorch-fid")
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up the workers and the folder
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix="fid_speed_") as folder:
    args.folder = folder
    np.savez(os.path.join(folder, "weights.npz"), **random_state_dict())
    rng = np.random.default_rng(1)
    images = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
    np.save(os.path.join(folder, "images.npy"), images)
    with timing.worker_log(os.path.join(folder, "workers.log")) as log:
      results = measure(args, log)
    versions = subprocess.run(
      [args.peer_python, "-c", "import torch; print(torch.__version__)"],
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  import jax

  print(
    f"\n{os.cpu_count()} CPUs, float32; jax {jax.__version__}, torch {versions} ({args.threads} "
    f"threads); our 3x3 convolutions: {args.conv}; batch {args.batch} of {args.size}x"
    f"{args.size} images resized to 299x299; "
    f"{args.rounds} alternating rounds of {args.calls} call(s) per side after {args.warmup} "
    f"warm-up call(s); load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}.\n"
  )
  print("\n".join(table(results, args.batch)))
  ratio = statistics.median(results["pytorch_fid"]["times"]) / statistics.median(
    results["ours"]["times"]
  )
  print(f"\npytorch-fid / ours = {ratio:.2f}")
  print(f"\nCommand: `python {' '.join(sys.argv)}`")


if __name__ == "__main__":
  main()
