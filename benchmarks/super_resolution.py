"""How faithfully a super-resolution run enlarges held-out shapes, read by the analytic judge.

Run from the repository root, after training (python main.py --config=shapes_sr):
  python benchmarks/super_resolution.py --workdir=runs/shapes_sr --num_images=1000

Takes the first --num_images images x of the shapes test split (an independent draw, never
trained on), shrinks them as training does (block averages, `core.super_resolution.downsample`),
enlarges them with the run's latest EMA parameters and sample settings (a text-conditional run
gets each image's caption, "a red circle"), and reports:
- how often the judge reads the same colour, and the same shape, on SR(downsample(x)) as on x;
- PSNR against x of the samples and of bicubic and bilinear upsampling (PIL) of the same inputs.
Writes WORKDIR/eval/super_resolution.{json,md} and a grid of input / bicubic / sample / truth.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax import data  # noqa: E402
from diffusion_jax.core import rng, super_resolution  # noqa: E402
from diffusion_jax.evaluation import judge  # noqa: E402
from diffusion_jax.experiment import generate, sample_mode, saved_config  # noqa: E402
from diffusion_jax.experiment import run as run_lib  # noqa: E402
from diffusion_jax.runtime import images  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/shapes_sr", "The trained super-resolution run.")
flags.DEFINE_integer("num_images", 1000, "Test images enlarged.")
flags.DEFINE_integer("batch_size", 0, "Images per sampling call; 0: the run's sample.batch_size.")
flags.DEFINE_float("aug_level", None, "sr.aug_level; default: the run's.")
flags.DEFINE_integer("seed", 0, "Sample seed.")


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per image, in dB, of uint8 images."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


def resized(low: np.ndarray, size: int, method) -> np.ndarray:
  return np.stack([np.asarray(Image.fromarray(x).resize((size, size), method)) for x in low])


def main(argv):
  del argv
  workdir = FLAGS.workdir
  config = saved_config.load(workdir)
  if config is None:
    raise SystemExit(f"error: {workdir} holds no run (config.json)")
  if FLAGS.aug_level is not None:
    config.sr.aug_level = FLAGS.aug_level
  batch_size = FLAGS.batch_size or config.sample.batch_size
  config.sample.batch_size = batch_size
  run = run_lib.make_run(config)
  if not run.low_res_size:
    raise SystemExit(f"error: {workdir} is no super-resolution run (model.low_res_size=0)")
  state = sample_mode.restore(run, workdir)
  step = int(state.step)

  test = data.make_source(dataclasses.replace(run.data, split="test", exclude_classes=""))
  n = min(FLAGS.num_images, len(test))
  truth = np.stack([test[i]["image"] for i in range(n)])
  factor = run.image_shape[0] // run.low_res_size
  low = np.asarray(super_resolution.downsample(data.normalize_images(truth), factor))
  condition = {"low_res": low}
  if run.cond_kind != "none":
    prompts = [test.attributes(i)["caption"] for i in range(n)]
    condition.update(run.prompt_condition(prompts))
  key = jax.random.fold_in(rng.stream_key(config.seed, rng.SAMPLE), FLAGS.seed + 1)
  sample_fn = run.sample_fn(progress=generate.SampleProgress())
  start = time.time()
  samples = generate.generate(sample_fn, state.ema_params, key, n, batch_size, condition)
  seconds = time.time() - start

  low_uint8 = data.denormalize_images(low)
  size = run.image_shape[0]
  bicubic = resized(low_uint8, size, Image.BICUBIC)
  bilinear = resized(low_uint8, size, Image.BILINEAR)
  on_truth, on_samples = judge.judge(truth), judge.judge(samples)
  same = {a: np.asarray(on_samples[a]) == np.asarray(on_truth[a]) for a in ("colour", "shape")}
  both = same["colour"] & same["shape"]
  figures = {
    "step": step,
    "num_images": n,
    "aug_level": float(config.sr.aug_level),
    "sampler": config.sample.sampler,
    "num_steps": config.sample.num_steps,
    "guidance_scale": float(config.sample.guidance_scale),
    "same_colour": float(same["colour"].mean()),
    "same_shape": float(same["shape"].mean()),
    "same_colour_and_shape": float(both.mean()),
    "truth_read_as_prompted_shape": float(
      np.mean([s == test.attributes(i)["shape"] for i, s in enumerate(on_truth["shape"])])
    ),
    "psnr_samples": float(psnr(samples, truth).mean()),
    "psnr_bicubic": float(psnr(bicubic, truth).mean()),
    "psnr_bilinear": float(psnr(bilinear, truth).mean()),
    "psnr_samples_downsampled": float(
      psnr(
        data.denormalize_images(
          np.asarray(super_resolution.downsample(data.normalize_images(samples), factor))
        ),
        low_uint8,
      ).mean()
    ),
    "sampling_seconds": seconds,
  }
  lines = [
    f"Step {step}, the first {n} images of the test split at {size}x{size} from "
    f"{run.low_res_size}x{run.low_res_size} block averages; sampler {config.sample.sampler} "
    f"({config.sample.num_steps} steps), guidance {config.sample.guidance_scale:g}, "
    f"sr.aug_level {config.sr.aug_level:g}; sampling took {seconds:.0f} s.",
    "",
    "| figure | value |",
    "|---|--:|",
    f"| judge: same colour on SR(downsample(x)) as on x | {figures['same_colour']:.1%} |",
    f"| judge: same shape | {figures['same_shape']:.1%} |",
    f"| judge: same colour and shape | {figures['same_colour_and_shape']:.1%} |",
    f"| judge: x itself read as its true shape | {figures['truth_read_as_prompted_shape']:.1%} |",
    f"| PSNR of the samples against x | {figures['psnr_samples']:.2f} dB |",
    f"| PSNR of bicubic upsampling | {figures['psnr_bicubic']:.2f} dB |",
    f"| PSNR of bilinear upsampling | {figures['psnr_bilinear']:.2f} dB |",
    f"| PSNR of the samples, downsampled, against the inputs | "
    f"{figures['psnr_samples_downsampled']:.2f} dB |",
  ]
  table = "\n".join(lines)
  print(table)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "super_resolution.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out_dir, "super_resolution.json"), "w") as f:
    json.dump(figures, f, indent=2)
  inputs = np.repeat(np.repeat(low_uint8, factor, axis=1), factor, axis=2)
  rows = np.stack([inputs, bicubic, samples, truth], axis=1)[:16]
  grid = os.path.join(out_dir, f"super_resolution_{step:07d}.png")
  images.save_labelled_grid(grid, rows, [f"image {i}" for i in range(len(rows))])
  print(f"wrote {grid}")


if __name__ == "__main__":
  app.run(main)
