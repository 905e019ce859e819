"""Summaries of seed studies: per-seed figures, and their mean, spread and confidence interval.

A seed study runs the same config with K seeds. `summarize` reduces the per-seed figures (final
loss, any evaluation figure) to the mean, the sample standard deviation and a two-sided 95%
confidence interval of the mean from Student's t distribution with K - 1 degrees of freedom, the
interval that is exact for normally distributed figures and is the usual one for a few seeds.
`write_summary` stores the result as JSON and as a Markdown table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


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
