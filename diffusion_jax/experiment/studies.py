"""Seed studies: the runs of K seeds of one config, their figures, and the across-seed summary.

A training seed study (`--config.seeds=0,1,2,3`) trains K models in one program; seed s keeps
its own run directory WORKDIR/seed_<s>, laid out like a single run's workdir (config.json with
seed = s, checkpoints, metrics.jsonl, samples). A sampling seed study (`--mode=sample
--config.sample.seeds=0,1,2,3`) draws K disjoint sets of samples from one model.

`summarize` reduces the per-seed figures (final loss, any evaluation figure) to the mean, the
sample standard deviation and a two-sided 95% confidence interval of the mean from Student's t
distribution with K - 1 degrees of freedom, the interval that is exact for normally distributed
figures and is the usual one for a few seeds.
`write_summary` stores the result as JSON and as a Markdown table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from diffusion_jax import evaluation

CONFIDENCE = 0.95
TAIL_FRACTION = 0.1  # "tail_loss" averages the logged losses of the last 10% of the steps.


def parse_seeds(value, field: str = "seeds") -> list[int]:
  """The seeds of a study from a config field: "0,1,2,3", a list of ints, or "" for none.

  Raises:
    ValueError: not a list of distinct integers (one line, naming `field`).
  """
  if value is None or (isinstance(value, str) and not value.strip()):
    return []
  if isinstance(value, str):
    parts = value.split(",")
  elif isinstance(value, Sequence):
    parts = list(value)
  else:
    parts = [value]
  try:
    seeds = [int(str(p).strip()) for p in parts]
  except ValueError:
    seeds = None
  if seeds is None or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
    raise ValueError(
      f"{field}={value!r} is not a list of distinct non-negative integers; "
      f"write e.g. --config.{field}=0,1,2,3"
    )
  return seeds


def member_workdir(workdir: str, seed: int) -> str:
  """The run directory of seed `seed` inside a study's WORKDIR."""
  return os.path.join(workdir, f"seed_{seed}")


def member_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The config of one seed of a study: the study's config with `seed` set and no `seeds`."""
  member = ml_collections.ConfigDict(config.to_dict())
  member.seed = seed
  member.seeds = ""
  return member


def training_figures(workdir: str, num_steps: int) -> dict[str, float]:
  """A finished run's final loss and its mean logged loss over the last TAIL_FRACTION of steps.

  Reads WORKDIR/metrics.jsonl; a step logged twice (a resumed run repeats the steps after its
  checkpoint) counts once, with its latest record.

  Raises:
    ValueError: the run has not logged step `num_steps`.
  """
  by_step = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      by_step[record["step"]] = record
  if num_steps not in by_step:
    raise ValueError(f"{workdir} has no metrics for step {num_steps}: the run is not finished")
  first = num_steps - max(int(TAIL_FRACTION * num_steps), 1)
  tail = [r["loss"] for step, r in by_step.items() if step > first and r["loss"] is not None]
  return {"final_loss": by_step[num_steps]["loss"], "tail_loss": float(np.mean(tail))}


def sample_figures(samples: np.ndarray, reference: np.ndarray, key: jax.Array) -> dict[str, float]:
  """Figures of uint8 samples [N, H, W, C] against N reference images: the pixel-space sliced
  Wasserstein distance `swd` (data range [-1, 1]) and the mean pixel value `pixel_mean`."""
  reference = reference[: len(samples)]
  if len(reference) < len(samples):
    raise ValueError(f"{len(samples)} samples but only {len(reference)} reference images")
  x = evaluation.images_to_unit_range(samples)
  swd = evaluation.sliced_wasserstein(x, evaluation.images_to_unit_range(reference), key)
  return {"swd": swd, "pixel_mean": float(x.mean())}


def summarize(per_seed: Mapping[int, Mapping[str, float]]) -> dict:
  """Across-seed statistics of every figure the seeds report.

  Args:
    per_seed: seed -> {figure name: value}; every seed reports the same figures.

  Returns:
    {"seeds": [sorted seeds], "per_seed": [{"seed": seed, name: value, ...} in seed order],
    "across_seeds": {name: {"mean", "std" (sample standard deviation, ddof=1; None for one
    seed), "ci95_low", "ci95_high" (None for one seed), "n"}}}.

  Raises:
    ValueError: no seeds, or seeds that report different figures (one line).
  """
  if not per_seed:
    raise ValueError("a seed study needs at least one seed")
  seeds = sorted(per_seed)
  names = sorted(per_seed[seeds[0]])
  for seed in seeds:
    if sorted(per_seed[seed]) != names:
      raise ValueError(
        f"seed {seed} reports {sorted(per_seed[seed])}, seed {seeds[0]} reports {names}"
      )
  across = {}
  for name in names:
    values = np.asarray([float(per_seed[seed][name]) for seed in seeds], np.float64)
    n = len(values)
    mean = float(values.mean())
    if n > 1:
      from scipy import stats  # on first use: scipy.stats takes 0.6 s to import

      std = float(values.std(ddof=1))
      half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * std / math.sqrt(n)
      low, high = mean - half, mean + half
    else:
      std = low = high = None
    across[name] = {"mean": mean, "std": std, "ci95_low": low, "ci95_high": high, "n": n}
  return {
    "seeds": seeds,
    "per_seed": [
      {"seed": seed, **{name: float(per_seed[seed][name]) for name in names}} for seed in seeds
    ],
    "across_seeds": across,
  }


def common_figures(per_seed: Mapping[int, Mapping[str, float]]) -> dict[int, dict[str, float]]:
  """`per_seed` restricted to the figures every seed reports."""
  names = set.intersection(*(set(figures) for figures in per_seed.values()))
  return {seed: {n: figures[n] for n in names} for seed, figures in per_seed.items()}


def markdown_table(summary: dict) -> str:
  """The summary as a Markdown table: one row per seed, then mean, std and the 95% CI."""
  names = sorted(summary["across_seeds"])
  fmt = lambda v: "–" if v is None else f"{v:.6g}"
  lines = [
    "| seed | " + " | ".join(names) + " |",
    "|---|" + "--:|" * len(names),
  ]
  for row in summary["per_seed"]:
    lines.append(f"| {row['seed']} | " + " | ".join(fmt(row[name]) for name in names) + " |")
  across = summary["across_seeds"]
  lines.append("| mean | " + " | ".join(fmt(across[n]["mean"]) for n in names) + " |")
  lines.append("| std | " + " | ".join(fmt(across[n]["std"]) for n in names) + " |")
  ci = lambda a: "–" if a["ci95_low"] is None else f"[{a['ci95_low']:.6g}, {a['ci95_high']:.6g}]"
  lines.append("| 95% CI of the mean | " + " | ".join(ci(across[n]) for n in names) + " |")
  return "\n".join(lines) + "\n"


def write_summary(directory: str, summary: dict, name: str = "seed_summary") -> tuple[str, str]:
  """Writes `<directory>/<name>.json` and `<directory>/<name>.md`; returns both paths."""
  os.makedirs(directory, exist_ok=True)
  json_path = os.path.join(directory, f"{name}.json")
  md_path = os.path.join(directory, f"{name}.md")
  with open(json_path, "w") as f:
    json.dump(summary, f, indent=2)
  with open(md_path, "w") as f:
    f.write(markdown_table(summary))
  return json_path, md_path
