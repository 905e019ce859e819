"""The CIFAR-10 train step and sampling call side by side with Hugging Face diffusers (PyTorch).

Set-up, once (the peer stays out of the project's requirements):
  python3 -m venv .venv-peer
  .venv-peer/bin/pip install -r requirements.txt torch==2.13.0 diffusers
Run from the repository root:
  .venv-peer/bin/python benchmarks/peer_diffusers.py
  .venv-peer/bin/python benchmarks/peer_diffusers.py --train_batch=32 --sample_batch=64 --rounds=5
  .venv-peer/bin/python benchmarks/peer_diffusers.py --processes     # each side in its own process
  python benchmarks/peer_diffusers.py --torch_device=cuda --dtype=bfloat16 --train_batch=128 \
    --sample_batch=256 --steps=10 --rounds=5                                   # on a GPU

Both sides build the DDPM CIFAR-10 network: ours from configs/cifar10.py, the peer as diffusers'
`UNet2DModel` with block_out_channels (128, 256, 256, 256), 2 layers per block, one attention
head at 16x16 and dropout 0.1 (--dropout). The train step is the same work on both:
ε-prediction MSE at uniform t of the linear T = 1000 schedule, global-norm clipping at 1, Adam at
2e-4 and an EMA update, on a batch of random uint8 images, in float32 (--dtype=bfloat16: bfloat16
compute, float32 parameters and loss). The sampling call is one network evaluation without
gradients. After warm-up, the two sides alternate in --rounds rounds of --steps calls each, so
that machine noise hits both alike; the table gives images/s as the median (min–max) over rounds
and our/peer ratios of the medians. With --processes each side runs in a fresh process in each
round (compiled and warmed up anew, then timed), the processes alternating, so that neither
library's threads or heap touch the other's timings. On a GPU (--torch_device=cuda, JAX on its
default GPU) each call waits for the device; PyTorch gets cuDNN's autotuner and, like JAX's
default precision, TF32 for float32 matmuls and convolutions.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import timing  # noqa: E402
from configs import cifar10  # noqa: E402
from diffusion_jax import models  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment import train_step as step_lib
from diffusion_jax.runtime import (
  hostmem,  # noqa: E402
  parallel,  # noqa: E402
)

FLAGS = flags.FLAGS
flags.DEFINE_integer("train_batch", 32, "Batch of the train step.")
flags.DEFINE_integer("sample_batch", 64, "Batch of the sampling network call.")
flags.DEFINE_integer("rounds", 3, "Alternating timing rounds; the median over rounds is reported.")
flags.DEFINE_integer("steps", 2, "Calls per side and round.")
flags.DEFINE_float("dropout", 0.1, "Dropout rate of both networks (the DDPM setting is 0.1).")
flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16"],
  "Compute dtype: ours model.dtype, the peer torch.autocast; parameters stay float32.",
)
flags.DEFINE_bool(
  "reuse_host_memory", True, "config.reuse_host_memory: keep freed host memory (CPU, glibc)."
)
flags.DEFINE_bool(
  "processes",
  False,
  "Run each side in a fresh process per round (alternating) instead of both in this one.",
)
flags.DEFINE_enum("conv", "auto", ["auto", "xla", "winograd"], "Our model.conv.")
flags.DEFINE_enum("side", "both", ["both", "ours", "diffusers"], "Measure one side only.")
flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"], "Where the peer runs.")
flags.DEFINE_integer(
  "microbatch", 0, "Our model.microbatch for the sampling call (0: the whole batch at once)."
)


def ours(train_batch: int, sample_batch: int):
  """(train step call, sampling call, parameter count) of this project's CIFAR-10 network."""
  config = cifar10.get_config()
  config.train.batch_size = train_batch
  config.model.dropout = FLAGS.dropout
  config.model.dtype = FLAGS.dtype
  config.model.microbatch = FLAGS.microbatch
  config.model.conv = FLAGS.conv
  run = run_lib.make_run(config)
  # Replicated over the mesh, as the trainer makes it: the step's output state is the same
  # sharding, so the second call does not compile the step again.
  init = jax.jit(run.init_state, out_shardings=parallel.replicated(run.mesh))
  state = init(rng.stream_key(0, rng.INIT))
  step_fn = step_lib.compile_train_step(run)
  images = np.random.default_rng(0).integers(0, 256, (train_batch, 32, 32, 3), dtype=np.uint8)
  batch = parallel.put_batch({"image": images}, run.mesh)
  key = rng.stream_key(0, rng.TRAIN)
  holder = {"state": state}

  def train_call():
    holder["state"], metrics = step_fn(holder["state"], batch, key)
    jax.block_until_ready(metrics)

  apply = lambda p, x, t: run.model.apply({"params": p}, x, t, train=False)
  apply_fn = jax.jit(
    lambda p, x, t: models.in_chunks(lambda x, t: apply(p, x, t), FLAGS.microbatch)(x, t)
  )
  x = np.random.default_rng(1).standard_normal((sample_batch, 32, 32, 3), dtype=np.float32)
  t = np.random.default_rng(2).integers(0, 1000, sample_batch).astype(np.int32)
  x, t = jax.device_put((x, t))
  sample_call = lambda: jax.block_until_ready(apply_fn(holder["state"].ema_params, x, t))
  count = sum(p.size for p in jax.tree.leaves(state.params))
  return train_call, sample_call, count


def peer(train_batch: int, sample_batch: int):
  """(train step call, sampling call, parameter count) of diffusers' UNet2DModel."""
  import torch
  from diffusers import UNet2DModel

  device = torch.device(FLAGS.torch_device)
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sync = torch.cuda.synchronize
  else:
    torch.set_num_threads(os.cpu_count())
    sync = lambda: None
  torch.manual_seed(0)
  model = UNet2DModel(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=256,
    dropout=FLAGS.dropout,
  ).to(device)
  ema = [p.detach().clone() for p in model.parameters()]
  bf16 = FLAGS.dtype == "bfloat16"
  autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
  optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(device)
  images = torch.randint(0, 256, (train_batch, 3, 32, 32), dtype=torch.uint8).to(device)

  def train_call():
    model.train()
    x0 = images.float() / 127.5 - 1
    t = torch.randint(0, 1000, (train_batch,), device=device)
    noise = torch.randn_like(x0)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with autocast():
      prediction = model(x_t, t).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(model.parameters()), 1 - 0.9999)
    sync()

  x = torch.randn(sample_batch, 3, 32, 32, device=device)
  t = torch.randint(0, 1000, (sample_batch,), device=device)

  def sample_call():
    model.eval()
    with torch.no_grad(), autocast():
      model(x, t)
    sync()

  return train_call, sample_call, sum(p.numel() for p in model.parameters())


_BUILDERS = {"ours": ours, "diffusers": peer}
_SIDE_FLAGS = (
  "train_batch",
  "sample_batch",
  "steps",
  "dropout",
  "dtype",
  "microbatch",
  "conv",
  "torch_device",
  "reuse_host_memory",
)


def measure(names, rounds: int, batches: dict) -> tuple[dict, dict]:
  """({(side, measurement): images/s per round}, {side: parameter count}) in this process."""
  sides = {name: _BUILDERS[name](FLAGS.train_batch, FLAGS.sample_batch) for name in names}
  rates = {(side, what): [] for side in sides for what in batches}
  for train_call, sample_call, _ in sides.values():  # Compile and warm up.
    train_call(), sample_call()
  for _ in range(rounds):
    for side, (train_call, sample_call, _) in sides.items():
      for what, call in (("train step", train_call), ("sampling call", sample_call)):
        times = timing.timed(call, 0, FLAGS.steps)
        rates[side, what].append(batches[what] / statistics.median(times))
  return rates, {side: count for side, (_, _, count) in sides.items()}


def measure_in_processes(batches: dict) -> tuple[dict, dict]:
  """`measure` with each side in a fresh process per round, the sides alternating."""
  rates = {(side, what): [] for side in _BUILDERS for what in batches}
  counts = {}
  for round_index in range(FLAGS.rounds):
    for side in _BUILDERS:
      print(f"round {round_index + 1}/{FLAGS.rounds}: {side}", file=sys.stderr, flush=True)
      argv = [sys.executable, os.path.abspath(__file__), f"--side={side}", "--rounds=1"]
      argv += [f"--{name}={getattr(FLAGS, name)}" for name in _SIDE_FLAGS]
      result = subprocess.run(argv, capture_output=True, text=True, check=True)
      reply = json.loads(result.stdout.strip().splitlines()[-1])
      counts[side] = reply["parameters"]
      for what in batches:
        rates[side, what] += reply["rates"][what]
  return rates, counts


def main(argv):
  del argv
  reused = hostmem.configure(FLAGS.reuse_host_memory)  # Before JAX starts its CPU client.
  batches = {"train step": FLAGS.train_batch, "sampling call": FLAGS.sample_batch}
  if FLAGS.side != "both":  # One side for a --processes run: a JSON line on stdout.
    rates, counts = measure([FLAGS.side], FLAGS.rounds, batches)
    reply = {"rates": {what: rates[FLAGS.side, what] for what in batches}}
    print(json.dumps({**reply, "parameters": counts[FLAGS.side]}))
    return
  if FLAGS.processes:
    rates, counts = measure_in_processes(batches)
    how = "alternating fresh processes, one per side and round"
  else:
    rates, counts = measure(list(_BUILDERS), FLAGS.rounds, batches)
    how = "alternating rounds in one process"
  import torch

  where = f"{os.cpu_count()} CPUs"
  if FLAGS.torch_device == "cuda":
    where = f"ours on {jax.devices()[0].device_kind}, diffusers on {torch.cuda.get_device_name()}"
  lines = [
    f"{where}, {FLAGS.dtype}, dropout {FLAGS.dropout:g}, freed host memory "
    f"{'kept for reuse' if reused else 'returned'}; jax {jax.__version__}, "
    f"torch {torch.__version__}; "
    f"parameters: ours {counts['ours']:,}, diffusers {counts['diffusers']:,}. Images/s, "
    f"median (min–max) over {FLAGS.rounds} rounds of {FLAGS.steps} calls, {how}.",
    "",
    "| measurement | batch | ours | diffusers (PyTorch) | ours / diffusers |",
    "|---|--:|--:|--:|--:|",
  ]
  for what, batch in batches.items():
    a, b = rates["ours", what], rates["diffusers", what]
    ratio = statistics.median(a) / statistics.median(b)
    lines.append(
      f"| {what} | {batch} | {timing.median_range(a)} | {timing.median_range(b)} | {ratio:.2f} |"
    )
  lines += ["", "Command: `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`"]
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
