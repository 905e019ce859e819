"""How faithfully a shapes autoencoder reconstructs held-out images, read by the analytic judge.

Run from the repository root, after training (python main.py --config=shapes_autoencoder):
  python benchmarks/autoencoder_shapes.py --workdir=runs/shapes_autoencoder

It reconstructs the first --num_images images of the test split (the posterior's mean, decoded),
has `diffusion_jax.evaluation.judge` read the colour and shape of each original and of its
reconstruction, and prints a Markdown table: the share of images whose reconstruction reads as
the same colour, the same shape and both, with PSNR and SSIM. It also writes a grid of the first
32 pairs to WORKDIR/eval/reconstructions.png.
"""

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.evaluation import judge, reconstruction  # noqa: E402
from diffusion_jax.experiment import autoencoder, run  # noqa: E402
from diffusion_jax.runtime import images  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/shapes_autoencoder", "The autoencoder run.")
  flags.DEFINE_integer("num_images", 1000, "Held-out images reconstructed.")
  flags.DEFINE_integer("batch_size", 100, "Images per compiled call.")


def main(argv) -> None:
  del argv
  r, state = run.load(FLAGS.workdir)
  if not r.is_autoencoder:
    raise SystemExit(f"error: {FLAGS.workdir} is not an autoencoder run")
  source = autoencoder.held_out_source(r.config)
  count = min(FLAGS.num_images, len(source))
  originals = np.stack([source[i]["image"] for i in range(count)])
  start = time.perf_counter()
  fn = autoencoder.make_reconstruct_fn(r)
  out, kl = autoencoder.reconstruct(r, fn, state.ema_params, originals, FLAGS.batch_size)
  seconds = time.perf_counter() - start
  psnr = np.asarray(reconstruction.psnr(out, originals))
  ssim = np.asarray(reconstruction.ssim(out, originals))
  judged_in, judged_out = judge.judge(originals), judge.judge(out)
  same = {
    name: np.array([a == b for a, b in zip(judged_in[name], judged_out[name], strict=True)])
    for name in ("colour", "shape")
  }
  both = same["colour"] & same["shape"]
  cfg = r.config.autoencoder
  f = 2 ** (len(cfg.channel_mult) - 1)
  size = r.config.data.image_size
  print(
    f"{FLAGS.workdir} at step {int(state.step)}: {count} test images of {size}x{size}, f = {f} "
    f"(latents {size // f}x{size // f}x{cfg.z_channels}), reconstructed in {seconds:.1f} s "
    f"(compilation included) on {jax.devices()[0].device_kind}\n"
  )
  print("| same colour | same shape | both | PSNR (dB) | SSIM | KL per image |")
  print("|---|---|---|---|---|---|")
  print(
    f"| {same['colour'].mean():.1%} | {same['shape'].mean():.1%} | {both.mean():.1%} "
    f"| {psnr.mean():.2f} | {ssim.mean():.4f} | {kl.mean():.1f} |"
  )
  named = np.mean([s != judge.UNCLEAR for s in judged_in["shape"]])
  print(f"\nthe judge names the shape of {named:.1%} of the originals")
  pairs = min(32, count) // 8 * 8 or count
  rows = []
  for first in range(0, pairs, 8):
    rows += [originals[first : first + 8], out[first : first + 8]]
  path = images.save_grid(
    os.path.join(FLAGS.workdir, "eval", "reconstructions.png"), np.concatenate(rows), columns=8
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
