"""Static clipping against Imagen's dynamic thresholding at high guidance, on a shapes_text run.

Run from the repository root, after training (python main.py --config=shapes_text):
  python benchmarks/thresholding.py --workdir=runs/shapes_text --scales=10,20 --num_samples=32

For each guidance scale and each of diffusion.threshold = static, dynamic (percentile
--percentile), it draws --num_samples images for each of 8 colour-shape prompts from the same
noise and reports the judge's agreement with the prompt (colour, shape) and the fraction of
saturated pixel values (0 or 255 in any channel), next to the same fraction on real test images.
Writes WORKDIR/eval/thresholding.{json,md} and a grid per setting.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax import data  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.evaluation import judge  # noqa: E402
from diffusion_jax.experiment import generate, sample_mode, saved_config  # noqa: E402
from diffusion_jax.experiment import run as run_lib  # noqa: E402
from diffusion_jax.runtime import images  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/shapes_text", "A trained text-conditional shapes run.")
flags.DEFINE_list("scales", ["10", "20"], "Guidance scales.")
flags.DEFINE_integer("num_samples", 32, "Images per prompt and setting.")
flags.DEFINE_float("percentile", 0.995, "diffusion.threshold_percentile of dynamic thresholding.")
flags.DEFINE_string("sampler", "", "sample.sampler; default: the run's.")
flags.DEFINE_integer("num_steps", 0, "sample.num_steps; 0: the run's.")
flags.DEFINE_list("prompts", list(judge.COLOUR_SHAPE_PROMPTS), "Colour-shape prompts.")


def saturated(samples: np.ndarray) -> float:
  return float(np.mean((samples == 0) | (samples == 255)))


def main(argv):
  del argv
  workdir = FLAGS.workdir
  config = saved_config.load(workdir)
  if config is None:
    raise SystemExit(f"error: {workdir} holds no run (config.json)")
  if FLAGS.sampler:
    config.sample.sampler = FLAGS.sampler
  if FLAGS.num_steps:
    config.sample.num_steps = FLAGS.num_steps
  config.diffusion.threshold_percentile = FLAGS.percentile
  prompts, n = FLAGS.prompts, FLAGS.num_samples
  key = jax.random.fold_in(rng.stream_key(config.seed, rng.SAMPLE), 1)
  results, out_dir = {}, os.path.join(workdir, "eval")
  state, step = None, 0
  for threshold in ("static", "dynamic"):
    config.diffusion.threshold = threshold
    run = run_lib.make_run(config)
    if state is None:
      state = sample_mode.restore(run, workdir)
      step = int(state.step)
    condition = {k: np.repeat(v, n, axis=0) for k, v in run.prompt_condition(prompts).items()}
    for scale in map(float, FLAGS.scales):
      start = time.time()
      sample_fn = run.sample_fn(guidance_scale=scale, progress=generate.SampleProgress())
      samples = generate.generate(
        sample_fn, state.ema_params, key, n * len(prompts), config.sample.batch_size, condition
      )
      verdicts = judge.judge(samples)
      colour_hits, shape_hits = [], []
      for i, prompt in enumerate(prompts):
        colour, shape = prompt.split()[-2:]
        part = slice(i * n, (i + 1) * n)
        colour_hits += [c == colour for c in verdicts["colour"][part]]
        shape_hits += [s == shape for s in verdicts["shape"][part]]
      results[f"{threshold} w={scale:g}"] = {
        "threshold": threshold,
        "scale": scale,
        "colour": float(np.mean(colour_hits)),
        "shape": float(np.mean(shape_hits)),
        "saturated": saturated(samples),
        "seconds": time.time() - start,
      }
      grouped = samples.reshape(len(prompts), n, *samples.shape[1:])[:, :12]
      path = os.path.join(out_dir, f"thresholding_{step:07d}_{threshold}_w{scale:g}.png")
      images.save_labelled_grid(path, grouped, prompts)
      print(f"{threshold} w={scale:g}: {results[f'{threshold} w={scale:g}']}", flush=True)

  test = data.make_source(dataclasses.replace(run.data, split="test", exclude_classes=""))
  real = np.stack([test[i]["image"] for i in range(min(1000, len(test)))])
  lines = [
    f"Step {step}, {n} images for each of {len(prompts)} colour-shape prompts per setting, "
    f"sampler {config.sample.sampler} ({config.sample.num_steps} steps), the same noise for "
    f"every setting; dynamic: percentile {FLAGS.percentile:g}. Saturated: pixel values at 0 or "
    f"255 (real test images: {saturated(real):.2%}).",
    "",
    "| guidance | threshold | colour | shape | saturated pixel values |",
    "|--:|---|--:|--:|--:|",
  ]
  for scale in map(float, FLAGS.scales):
    for threshold in ("static", "dynamic"):
      r = results[f"{threshold} w={scale:g}"]
      lines.append(
        f"| {scale:g} | {threshold} | {r['colour']:.1%} | {r['shape']:.1%} | {r['saturated']:.2%} |"
      )
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(out_dir, "thresholding.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out_dir, "thresholding.json"), "w") as f:
    json.dump({"step": step, "real_saturated": saturated(real), "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
