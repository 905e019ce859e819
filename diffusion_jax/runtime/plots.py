"""Training curves of a run (or of every seed of a study) from metrics.jsonl to one PNG.

Drawn with matplotlib's Agg canvas on a private Figure, not pyplot: no display is needed and no
global matplotlib state (current figure, backend) changes for other users in the process.
"""

import json
import math
import os
from collections.abc import Mapping

import numpy as np

FIGSIZE = (10.0, 7.0)  # inches
DPI = 100  # so the PNG is 1000 x 700 pixels

# (metric, panel title, smoothed curve over the raw one, log y-axis when every value is > 0).
# The loss is required; the other panels appear when some run logged the metric.
PANELS = (
  ("loss", "loss", True, True),
  ("grad_norm", "gradient norm", True, True),
  ("lr", "learning rate", False, False),
  ("param_norm", "parameter norm", False, False),
)


def read_metrics(path: str) -> dict[str, np.ndarray]:
  """Reads a metrics.jsonl (one JSON object per line, as MetricWriter writes) into arrays.

  Lines that are not a JSON object with a numeric "step" are skipped: a run killed mid-write
  leaves a truncated last line. A step logged twice (a resumed run repeats the steps after its
  checkpoint) keeps its latest record.

  Args:
    path: the metrics.jsonl file.

  Returns:
    {name: [N] array} over the N distinct steps in increasing order: "step" int64, every other
    key float64, NaN where a record lacks the key, has null (a non-finite value) or a
    non-number. {} when the file is missing or holds no record.
  """
  if not os.path.exists(path):
    return {}
  by_step: dict[int, dict] = {}
  names: dict[str, None] = {}  # every key, in order of first appearance
  with open(path, errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if not isinstance(record, dict) or not _is_number(record.get("step")):
        continue
      step = record["step"]
      if not math.isfinite(step):
        continue
      by_step[int(step)] = record
      names.update(dict.fromkeys(k for k in record if k != "step"))
  if not by_step:
    return {}
  steps = sorted(by_step)
  out = {"step": np.asarray(steps, dtype=np.int64)}
  for name in names:
    values = (by_step[s].get(name) for s in steps)
    out[name] = np.asarray([v if _is_number(v) else np.nan for v in values], dtype=np.float64)
  return out


def _is_number(value) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def _auto_weight(values: np.ndarray) -> float:
  """The EMA weight smooth(weight=None) picks for `values`: a window of 1/50 of the finite
  points, at least 10 (weight 0.9)."""
  return 1.0 - 1.0 / max(10.0, np.isfinite(values).sum() / 50.0)


def _log_y(ax, values: np.ndarray) -> None:
  """A log y-axis; over at most 3 decades ticks at 1, 2 and 5 times powers of ten, as plain
  numbers, so a curve within one or two decades still has several labelled levels."""
  from matplotlib import ticker  # on first use: matplotlib takes 0.4 s to import

  ax.set_yscale("log")
  if np.log10(values.max() / values.min()) <= 3:
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def smooth(values: np.ndarray, weight: float | None = 0.9) -> np.ndarray:
  """Exponential moving average with debiasing, as TensorBoard's smoothing slider.

  s_t = weight * s_{t-1} + (1 - weight) * x_t from s_0 = 0, divided by 1 - weight**k after k
  finite points, so the start is not pulled towards 0: the first output equals the first input.

  Args:
    values: [N] floats; non-finite entries are skipped (the average carries over them).
    weight: in [0, 1); 0 returns the input. None chooses it from the number of points: an
      average over about 1/50 of them (at least 10 points, weight >= 0.9), so long runs get
      curves as readable as short ones.

  Returns:
    [N] float64: the smoothed values, NaN where the input is not finite.
  """
  x = np.asarray(values, dtype=np.float64).reshape(-1)
  finite = np.isfinite(x)
  if weight is None:
    weight = _auto_weight(x)
  if not 0.0 <= weight < 1.0:
    raise ValueError(f"the smoothing weight must be in [0, 1), got {weight}")
  out = np.full_like(x, np.nan)
  last, count = 0.0, 0
  for i in np.flatnonzero(finite):
    last = weight * last + (1.0 - weight) * x[i]
    count += 1
    out[i] = last / (1.0 - weight**count)
  return out


def write_metrics_plot(workdir_or_runs: str | Mapping[str, str], path: str) -> str | None:
  """Draws the training curves of one run, or of every seed of a study overlaid, as one PNG.

  Panels against step: loss (raw thin and light, debiased-EMA smoothed bold; log y-axis when all
  values are > 0), gradient norm (the same), learning rate, and parameter norm; a panel other than
  the loss is left out when no run logged its metric. The file is written to a temporary name in
  the same directory and renamed over `path`, so a reader never sees a half-written PNG.

  Args:
    workdir_or_runs: one run directory (reads DIR/metrics.jsonl), or {label: run directory} for a
      seed study, drawn in one colour per label with a legend of the labels.
    path: the PNG to write, FIGSIZE * DPI pixels (1000 x 700).

  Returns:
    `path`, or None (nothing written) when no run has a record.
  """
  if isinstance(workdir_or_runs, Mapping):
    dirs = {str(label): d for label, d in workdir_or_runs.items()}
    title = f"seed study: {len(dirs)} seed{'s' * (len(dirs) != 1)}"
  else:
    dirs = {None: workdir_or_runs}
    title = os.path.basename(os.path.normpath(os.fspath(workdir_or_runs)))
  runs = {label: read_metrics(os.path.join(d, "metrics.jsonl")) for label, d in dirs.items()}
  runs = {label: m for label, m in runs.items() if m}
  if not runs:
    return None
  panels = [p for p in PANELS if p[0] == "loss" or any(p[0] in m for m in runs.values())]

  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  fig.suptitle(f"training curves: {title}", fontsize=14)
  # The loss gets the whole top row; the other panels share the bottom one.
  grid = fig.add_gridspec(2, max(1, len(panels) - 1))
  axes = [fig.add_subplot(grid[0, :])]
  axes += [fig.add_subplot(grid[1, i]) for i in range(len(panels) - 1)]
  colors = [f"C{i % 10}" for i in range(len(runs))]
  for ax, (name, panel_title, smoothed, log_if_positive) in zip(axes, panels, strict=True):
    everything = []
    for (label, metrics), color in zip(runs.items(), colors, strict=True):
      if name not in metrics:
        continue
      step, y = metrics["step"], metrics[name]
      everything.append(y[np.isfinite(y)])
      if smoothed:
        weight = _auto_weight(y)
        ema = smooth(y, weight=weight)
        alpha = 0.35 if len(runs) == 1 else 0.2
        ax.plot(step, y, color=color, lw=0.8, alpha=alpha, label="raw" if label is None else None)
        smooth_label = f"smoothed (EMA {weight:.3g})" if label is None else label
        ax.plot(step, ema, color=color, lw=2.0, label=smooth_label)
      else:
        ax.plot(step, y, color=color, lw=1.8, label=label)
    values = np.concatenate(everything) if everything else np.zeros(0)
    if log_if_positive and values.size and (values > 0).all():
      _log_y(ax, values)
    elif name == "lr":
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title(panel_title, fontsize=12)
    ax.set_xlabel("step", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0] and (len(runs) > 1 or name == "loss"):
      ax.legend(fontsize=9, loc="best", framealpha=0.8)

  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(4).hex()}.tmp")
  try:
    with open(temporary, "xb") as f:  # "x": never another writer's file; mode from the umask
      fig.savefig(f, format="png", dpi=DPI)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return path
