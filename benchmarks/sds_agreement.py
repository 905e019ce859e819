"""What score distillation makes of shapes prompts, read by the analytic judge.

Run from the repository root, after training the prior (python main.py --config=shapes_text):
  python benchmarks/sds_agreement.py --prior=runs/shapes_text --mode=2d --seeds=8
  python benchmarks/sds_agreement.py --prior=runs/shapes_text --mode=3d --seeds=1 \\
    --prompts="a red circle,a blue circle,a green circle,a yellow circle" --num_steps=600
  python benchmarks/sds_agreement.py --prior=runs/shapes_latent_text --mode=2d --seeds=4

For each prompt and seed it optimises from scratch with the sds.* settings of
configs/shapes_sds.py (overridden by the flags), then reads the ring of sds.num_views views (2d:
the image) with the judge: the fraction of views showing the prompted colour and shape, per
prompt and overall, and the time per run. Writes --out/sds_agreement_<mode>.{md,json} and a grid
of every run's views.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import shapes_sds  # noqa: E402
from diffusion_jax.core import rng  # noqa: E402
from diffusion_jax.evaluation import judge  # noqa: E402
from diffusion_jax.experiment import sds_mode  # noqa: E402
from diffusion_jax.runtime import images  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("prior", "runs/shapes_text", "The prior run.")
flags.DEFINE_enum("mode", "2d", ["2d", "3d"], "sds.mode.")
flags.DEFINE_integer("seeds", 8, "Seeds per prompt (0, 1, ...).")
flags.DEFINE_integer("num_steps", 0, "sds.num_steps; 0: the config's.")
flags.DEFINE_float("guidance", 0.0, "sds.guidance_scale; 0: the config's.")
flags.DEFINE_float("learning_rate", 0.0, "sds.learning_rate; 0: the config's.")
flags.DEFINE_float("t_max", 0.0, "sds.t_max; 0: the config's.")
flags.DEFINE_integer("render_size", 0, "sds.render_size; 0: the prior's image size.")
flags.DEFINE_float("t_min", 0.0, "sds.t_min; 0: the config's.")
flags.DEFINE_float("tv_weight", 0.0, "sds.tv_weight; 0: the config's.")
flags.DEFINE_string("out", "", "Output directory; default: the prior's eval/.")
flags.DEFINE_list("prompts", list(judge.COLOUR_SHAPE_PROMPTS), "Colour-shape prompts.")


def main(argv):
  del argv
  config = shapes_sds.get_config()
  config.sds.prior_workdir = FLAGS.prior
  config.sds.mode = FLAGS.mode
  for field, value in (
    ("num_steps", FLAGS.num_steps),
    ("guidance_scale", FLAGS.guidance),
    ("learning_rate", FLAGS.learning_rate),
    ("t_max", FLAGS.t_max),
    ("render_size", FLAGS.render_size),
    ("t_min", FLAGS.t_min),
    ("tv_weight", FLAGS.tv_weight),
  ):
    if value:
      config.sds[field] = value
  base = sds_mode.read_settings(config)
  tx = optax.adam(base.learning_rate)
  rows, all_views, seconds = {}, [], []
  for prompt in FLAGS.prompts:
    s = dataclasses.replace(base, prompt=prompt)
    prior = sds_mode.load_prior(config, s)
    size = sds_mode.render_size(s, prior)
    step_fn = sds_mode.make_step(s, prior, tx)
    colour, shape = prompt.split()[-2:]
    hits = {"colour": [], "shape": []}
    for seed in range(FLAGS.seeds):
      start = time.time()
      params = sds_mode.init_params(s, rng.stream_key(seed, rng.INIT), (size, size, 3))
      opt_state, seed_key = tx.init(params), rng.stream_key(seed, rng.SDS)
      for step in range(s.num_steps):
        params, opt_state, _ = step_fn(params, opt_state, np.int32(step), seed_key, prior.params)
      views = sds_mode.views_uint8(s, params, size)
      jax.block_until_ready(views)
      seconds.append(time.time() - start)
      views = views[:1] if s.mode == "2d" else views
      verdicts = judge.judge(views)
      hits["colour"] += [c == colour for c in verdicts["colour"]]
      hits["shape"] += [v == shape for v in verdicts["shape"]]
      all_views.append(views)
      print(f"{prompt!r} seed {seed}: {verdicts['colour']} {verdicts['shape']}", flush=True)
    rows[prompt] = {k: float(np.mean(v)) for k, v in hits.items()}
  what = "images" if base.mode == "2d" else f"views (a ring of {base.num_views} per run)"
  lines = [
    f"sds.mode={base.mode}, {FLAGS.seeds} seeds per prompt, {base.num_steps} steps of Adam "
    f"({base.learning_rate:g}), {base.batch_size} renders per step, guidance "
    f"{base.guidance_scale:g}, t in [{base.t_min:g}, {base.t_max:g}] T; % of {what} the judge "
    f"reads as the prompted colour / shape. Median time per run (each prompt's first also "
    f"compiles): {np.median(seconds):.1f} s.",
    "",
    "| prompt | colour | shape |",
    "|---|--:|--:|",
  ]
  lines += [f"| {p} | {r['colour']:.0%} | {r['shape']:.0%} |" for p, r in rows.items()]
  lines.append(
    f"| **all** | {np.mean([r['colour'] for r in rows.values()]):.1%} | "
    f"{np.mean([r['shape'] for r in rows.values()]):.1%} |"
  )
  table = "\n".join(lines)
  print(table)
  out = FLAGS.out or os.path.join(FLAGS.prior, "eval")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"sds_agreement_{base.mode}.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out, f"sds_agreement_{base.mode}.json"), "w") as f:
    json.dump({"settings": dataclasses.asdict(base), "prompts": rows}, f, indent=2)
  grid = np.stack(all_views).reshape(len(FLAGS.prompts), -1, size, size, 3)
  path = images.save_labelled_grid(
    os.path.join(out, f"sds_agreement_{base.mode}.png"), grid, FLAGS.prompts
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
