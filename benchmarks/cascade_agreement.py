"""Does a cascade keep what the base model drew? The judge on its 64x64 output against the base's.

Run from the repository root, after `python main.py --config=shapes_cascade --mode=train`:
  python benchmarks/cascade_agreement.py --workdir=runs/shapes_cascade [--num_samples=64]
(--cascade_workdirs=runs/shapes_text,runs/shapes_sr for stages trained on their own.)

Runs --mode=sample of the shapes_cascade config (the base with guidance --guidance, the upsampler
with its own settings) for 8 colour-shape prompts, --num_samples images each, and reads every
image with the analytic judge: the fraction showing the prompted colour and shape at the base's
resolution (the base model alone: stage 0 draws exactly what --mode=sample of the base run draws)
and after the last stage, and how often the last stage keeps the base image's colour and shape.
Writes WORKDIR/eval/cascade_agreement.{json,md}; the grids are the cascade's own.
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import shapes_cascade  # noqa: E402
from diffusion_jax.evaluation import judge  # noqa: E402
from diffusion_jax.experiment import cascade  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/shapes_cascade", "The cascade's directory.")
flags.DEFINE_string("cascade_workdirs", "", "cascade.workdirs; default: the stages in --workdir.")
flags.DEFINE_integer("num_samples", 64, "Images per prompt.")
flags.DEFINE_float("guidance", 3.0, "The base stage's guidance scale.")
flags.DEFINE_list("prompts", list(judge.COLOUR_SHAPE_PROMPTS), "Colour-shape prompts.")


def main(argv):
  del argv
  config = shapes_cascade.get_config()
  config.cascade.workdirs = FLAGS.cascade_workdirs
  guidance = config.cascade.guidance_scales.split(",")
  config.cascade.guidance_scales = ",".join([f"{FLAGS.guidance:g}", *guidance[1:]])
  config.sample.num_samples = FLAGS.num_samples
  prompts_file = os.path.join(FLAGS.workdir, "eval", "cascade_prompts.txt")
  os.makedirs(os.path.dirname(prompts_file), exist_ok=True)
  with open(prompts_file, "w") as f:
    f.write("\n".join(FLAGS.prompts) + "\n")
  config.sample.prompts_file = prompts_file
  start = time.time()
  stages = cascade.sample(config, FLAGS.workdir)
  seconds = time.time() - start
  n, prompts = FLAGS.num_samples, FLAGS.prompts
  verdicts = [judge.judge(images) for _, _, images in stages]
  rows = {}
  for p, prompt in enumerate(prompts):
    colour, shape = prompt.split()[-2:]
    part = slice(p * n, (p + 1) * n)
    row = {}
    for k, v in enumerate(verdicts):
      row[f"stage{k}_colour"] = float(np.mean([c == colour for c in v["colour"][part]]))
      row[f"stage{k}_shape"] = float(np.mean([s == shape for s in v["shape"][part]]))
    first, last = verdicts[0], verdicts[-1]
    row["kept"] = float(
      np.mean(
        [
          first["colour"][i] == last["colour"][i] and first["shape"][i] == last["shape"][i]
          for i in range(p * n, (p + 1) * n)
        ]
      )
    )
    rows[prompt] = row
  sizes = [f"{images.shape[1]}x{images.shape[2]}" for _, _, images in stages]
  last = len(stages) - 1
  lines = [
    f"{n} images per prompt, base guidance {FLAGS.guidance:g}; stages at {', '.join(sizes)}; "
    f"% read by the judge as the prompted colour / shape; 'kept': the last stage shows the same "
    f"colour and shape as the base image it enlarged. Sampling took {seconds:.0f} s.",
    "",
    f"| prompt | colour {sizes[0]} | shape {sizes[0]} | colour {sizes[-1]} | shape {sizes[-1]} "
    "| kept |",
    "|---|--:|--:|--:|--:|--:|",
  ]
  for prompt, row in rows.items():
    lines.append(
      f"| {prompt} | {row['stage0_colour']:.0%} | {row['stage0_shape']:.0%} | "
      f"{row[f'stage{last}_colour']:.0%} | {row[f'stage{last}_shape']:.0%} | {row['kept']:.0%} |"
    )
  means = {k: np.mean([r[k] for r in rows.values()]) for k in next(iter(rows.values()))}
  lines.append(
    f"| **all** | {means['stage0_colour']:.1%} | {means['stage0_shape']:.1%} | "
    f"{means[f'stage{last}_colour']:.1%} | {means[f'stage{last}_shape']:.1%} | "
    f"{means['kept']:.1%} |"
  )
  table = "\n".join(lines)
  print(table)
  out_dir = os.path.join(FLAGS.workdir, "eval")
  with open(os.path.join(out_dir, "cascade_agreement.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out_dir, "cascade_agreement.json"), "w") as f:
    json.dump({"num_samples": n, "guidance": FLAGS.guidance, "prompts": rows}, f, indent=2)
  for png, _, _ in stages:
    print(f"grid: {png}")


if __name__ == "__main__":
  app.run(main)
