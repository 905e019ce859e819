"""Metrics to WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events.

Training's losses go to metrics.jsonl, sample-quality figures (FID, ...) to eval_metrics.jsonl,
both with the step."""

import json
import math
import os
from typing import Any

import jax


class MetricWriter:
  """Appends scalar metrics of a step; only process 0 writes, the others do nothing.

  Args:
    workdir: the run directory; events go to WORKDIR/tensorboard.
    filename: the JSON-lines file in `workdir`.
    tag_prefix: prepended to each metric's TensorBoard tag ("eval/": eval/fid).
  """

  def __init__(self, workdir: str, filename: str = "metrics.jsonl", tag_prefix: str = ""):
    self._tag_prefix = tag_prefix
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, filename), "a")  # noqa: SIM115
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard events are optional; metrics.jsonl is always written.
        self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records `metrics` (scalars) at `step`; non-finite values are written as null."""
    if not self._active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(self._tag_prefix + name, value, int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
