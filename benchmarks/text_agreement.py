"""Text-image agreement of a text-conditional shapes model, read by the analytic judge.

Run from the repository root, after training (python main.py --config=shapes_text):
  python benchmarks/text_agreement.py --config=configs/shapes_text.py --workdir=runs/shapes_text

For each prompt it draws --num_samples images with each guidance scale in --scales (the same
noise for every scale), and `diffusion_jax.judge` reads each image's colour, shape, size and
position. It prints a Markdown table of the fraction of images that show the prompted colour,
shape (and size or position, where the prompt names them), per prompt and scale, marks the prompts
whose colour-shape pair was held out of training (data.exclude_classes), and writes
WORKDIR/eval/text_agreement.{json,md} and one labelled grid per scale.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax import text  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.data.shapes import COLOURS, SHAPES  # noqa: E402
from diffusion_jax.evaluation import judge  # noqa: E402
from diffusion_jax.experiment import (
  generate,  # noqa: E402
  saved_config,  # noqa: E402
)
from diffusion_jax.experiment import run as run_lib  # noqa: E402
from diffusion_jax.runtime import (
  checkpoints,  # noqa: E402
  images,  # noqa: E402
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/shapes_text.py", "The run's config file.")
flags.DEFINE_string("workdir", "runs/shapes_text", "The trained run.")
flags.DEFINE_list("scales", ["1", "3"], "Guidance scales compared.")
flags.DEFINE_integer("num_samples", 64, "Images per prompt and scale.")
flags.DEFINE_list(
  "prompts",
  [
    "a red circle",
    "a green square",
    "a blue triangle",
    "a yellow circle",
    "a small red triangle",
    "a large yellow square",
    "a green circle at the top",
    "a blue circle on the left",
  ],
  "Prompts; the held-out pairs of data.exclude_classes are added.",
)
flags.DEFINE_integer("seed", 0, "Sample seed.")

STRICT_RESIDUAL = judge.MAX_RESIDUAL / 2


def _named(prompt: str) -> dict[str, str | None]:
  """The attributes a prompt names: colour, shape, size, position (None where it names none)."""
  words = text.split_words(prompt)
  colour = next((w for w in words if w in COLOURS), None)
  shape = next((w for w in words if w in SHAPES), None)
  size = next((w for w in words if w in ("small", "large")), None)
  position = None
  for cell in ("top left", "top right", "bottom left", "bottom right", "top", "bottom", "left"):
    if f" {cell}" in f" {' '.join(words)}":
      position = cell
      break
  if position is None and "right" in words:
    position = "right"
  if position is None and "centre" in words:
    position = "centre"
  return {"colour": colour, "shape": shape, "size": size, "position": position}


def agreement_table(verdicts: dict, prompts: list[str]) -> dict[str, dict[str, float]]:
  """Per prompt, the fraction of its images whose judged attributes equal the named ones."""
  out = {}
  for i, prompt in enumerate(prompts):
    named = _named(prompt)
    row = {}
    for attribute, value in named.items():
      if value is not None:
        row[attribute] = float(np.mean([v == value for v in verdicts[attribute][i]]))
    out[prompt] = row
  return out


def main(argv):
  del argv
  workdir = FLAGS.workdir
  # The run's own config.json (a latent run's records its autoencoder and scale), with the
  # command line's sample fields on top.
  config = saved_config.reconcile(FLAGS.config, workdir, "sample")
  held_out = [c.strip() for c in config.data.exclude_classes.split(",") if c.strip()]
  prompts = list(FLAGS.prompts) + [text.class_caption(c) for c in held_out]
  run = run_lib.make_run(config)
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"))
  state = run_lib.restore_or_init(run, store)
  store.close()
  step = int(state.step)
  n = FLAGS.num_samples
  condition = {k: np.repeat(v, n, axis=0) for k, v in run.prompt_condition(prompts).items()}
  key = jax.random.fold_in(rng.stream_key(config.seed, rng.SAMPLE), FLAGS.seed + 1)
  results, timing = {}, {}
  out_dir = os.path.join(workdir, "eval")
  for scale in map(float, FLAGS.scales):
    sample_fn = run.sample_fn(guidance_scale=scale)
    start = time.time()
    samples = generate.generate(
      sample_fn, state.ema_params, key, n * len(prompts), config.sample.batch_size, condition
    )
    timing[scale] = time.time() - start
    grouped = samples.reshape(len(prompts), n, *samples.shape[1:])
    images.save_labelled_grid(
      os.path.join(out_dir, f"text_agreement_{step:07d}_w{scale:g}.png"), grouped[:, :16], prompts
    )
    verdicts = judge.judge(samples)
    verdicts = {k: np.asarray(v).reshape(len(prompts), n) for k, v in verdicts.items()}
    results[scale] = agreement_table(verdicts, prompts)
    # The same with a gate twice as strict: only shapes as well formed as real ones with noise.
    residual = judge.measure(samples)["residual"].reshape(len(prompts), n)
    for i, prompt in enumerate(prompts):
      hits = (verdicts["shape"][i] == _named(prompt)["shape"]) & (residual[i] <= STRICT_RESIDUAL)
      results[scale][prompt]["shape_strict"] = float(np.mean(hits))

  scales = list(results)
  lines = [
    f"Step {step}, {n} images per prompt and scale, sampler {config.sample.sampler} "
    f"({config.sample.num_steps or config.diffusion.num_timesteps} steps); % of images the judge "
    'reads as the prompted attribute (a shape it cannot name counts as wrong; "strict": only '
    f"shapes whose template residual is at most {STRICT_RESIDUAL:g}, as well formed as real "
    "images with pixel noise).",
    "",
    "| prompt | held out | "
    + " | ".join(f"colour w={s:g} | shape w={s:g} | size/position w={s:g}" for s in scales)
    + " |",
    "|---|---|" + "---|---|---|" * len(scales),
  ]
  for prompt in prompts:
    cells = []
    for s in scales:
      row = results[s][prompt]
      extra = [f"{row[a]:.0%}" for a in ("size", "position") if a in row]
      cells += [f"{row['colour']:.0%}", f"{row['shape']:.0%}", " / ".join(extra) or "-"]
    is_held_out = any(prompt == text.class_caption(c) for c in held_out)
    lines.append(f"| {prompt} | {'yes' if is_held_out else ''} | " + " | ".join(cells) + " |")
  for label, subset in (
    ("seen", [p for p in prompts if _named(p)["colour"] and not _held(p, held_out)]),
    ("held out", [p for p in prompts if _held(p, held_out)]),
  ):
    if not subset:
      continue
    cells = []
    for s in scales:
      cells += [
        f"{np.mean([results[s][p]['colour'] for p in subset]):.0%}",
        f"{np.mean([results[s][p]['shape'] for p in subset]):.0%}",
        f"strict shape {np.mean([results[s][p]['shape_strict'] for p in subset]):.0%}",
      ]
    lines.append(f"| **mean, {label}** | | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(
    "Sampling time per scale: " + ", ".join(f"w={s:g}: {timing[s]:.0f} s" for s in scales)
  )
  table = "\n".join(lines)
  print(table)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "text_agreement.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out_dir, "text_agreement.json"), "w") as f:
    json.dump(
      {
        "step": step,
        "num_samples": n,
        "held_out": held_out,
        "results": {f"{s:g}": results[s] for s in scales},
      },
      f,
      indent=2,
    )


def _held(prompt: str, held_out: list[str]) -> bool:
  named = _named(prompt)
  return f"{named['colour']} {named['shape']}" in held_out


if __name__ == "__main__":
  app.run(main)
