"""benchmarks/sample_progress.py: rounds alternate between the variants, and the table's cells."""

import numpy as np

from benchmarks import sample_progress


def test_rounds_alternate_and_every_variant_is_timed_once_per_round():
  order = []

  def variant(name):
    def sample_fn(params, key, first_index, cond):
      order.append(name)
      return np.zeros((2, 1, 1, 1), np.uint8)

    return sample_fn

  variants = {"plain": variant("plain"), "progress": variant("progress")}
  cpu = {}
  times = sample_progress.measure(variants, None, 2, rounds=3, warmup=1, cpu=cpu)
  # Warm-up in order, then ABBA...: each variant runs first as often as the other.
  assert order == ["plain", "progress"] + ["plain", "progress", "progress", "plain"] + [
    "plain",
    "progress",
  ]
  assert {name: len(values) for name, values in times.items()} == {"plain": 3, "progress": 3}
  assert {name: len(values) for name, values in cpu.items()} == {"plain": 3, "progress": 3}


def test_the_table_gives_the_ratio_to_the_first_variant():
  times = {"plain": [2.0, 1.0, 3.0], "progress": [2.2, 1.1, 3.3]}
  cpu = {"plain": [4.0, 4.0, 4.0], "progress": [4.0, 4.2, 4.4]}
  table = sample_progress.format_table(times, {"plain": 1.0, "progress": 1.5}, 100, cpu)
  lines = table.splitlines()
  assert lines[0].startswith("| variant |") and len(lines) == 4
  assert lines[2] == (
    "| plain | 1.0 | 2.00 (1.00–3.00) | 20.0 (10.0–30.0) | 1.0000 | 1.00 (1.00–1.00) "
    "| 4.00 (4.00–4.00) | 1.0000 | 1.00 (1.00–1.00) |"
  )
  assert lines[3] == (
    "| progress | 1.5 | 2.20 (1.10–3.30) | 22.0 (11.0–33.0) | 1.1000 | 1.10 (1.10–1.10) "
    "| 4.20 (4.00–4.40) | 1.0500 | 1.05 (1.00–1.10) |"
  )
