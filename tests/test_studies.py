"""Tests for diffusion_jax.studies: the across-seed statistics against hand computation and their
coverage on simulated studies, and the JSON / Markdown round trip."""

import json
import math

import numpy as np
import pytest

from diffusion_jax import studies


def test_summary_against_hand_computation():
  per_seed = {3: {"loss": 4.0, "fid": 10.0}, 0: {"loss": 1.0, "fid": 10.0}}
  per_seed.update({1: {"loss": 2.0, "fid": 10.0}, 2: {"loss": 3.0, "fid": 10.0}})
  summary = studies.summarize(per_seed)
  assert summary["seeds"] == [0, 1, 2, 3]
  assert [row["seed"] for row in summary["per_seed"]] == [0, 1, 2, 3]
  assert [row["loss"] for row in summary["per_seed"]] == [1.0, 2.0, 3.0, 4.0]
  loss = summary["across_seeds"]["loss"]
  # mean 2.5; sample variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; t(0.975, 3) = 3.182446305.
  half = 3.182446305284263 * math.sqrt(5 / 3) / 2
  assert loss["n"] == 4 and loss["mean"] == pytest.approx(2.5)
  assert loss["std"] == pytest.approx(math.sqrt(5 / 3))
  assert (loss["ci95_low"], loss["ci95_high"]) == pytest.approx((2.5 - half, 2.5 + half))
  fid = summary["across_seeds"]["fid"]
  assert fid["std"] == 0.0 and fid["ci95_low"] == fid["ci95_high"] == 10.0


def test_one_seed_has_no_spread():
  summary = studies.summarize({7: {"loss": 0.5}})
  assert summary["across_seeds"]["loss"] == {
    "mean": 0.5,
    "std": None,
    "ci95_low": None,
    "ci95_high": None,
    "n": 1,
  }
  assert "| 95% CI of the mean | – |" in studies.markdown_table(summary)


@pytest.mark.parametrize("k", [3, 5])
def test_interval_covers_the_true_mean_95_percent_of_the_time(k):
  # 4000 simulated studies of K normal seeds: coverage 0.95 within 4 binomial standard errors.
  rng = np.random.default_rng(k)
  trials, covered = 4000, 0
  for values in rng.normal(1.0, 0.3, (trials, k)):
    stats = studies.summarize({s: {"x": v} for s, v in enumerate(values)})["across_seeds"]["x"]
    covered += stats["ci95_low"] <= 1.0 <= stats["ci95_high"]
  assert abs(covered / trials - 0.95) < 4 * math.sqrt(0.95 * 0.05 / trials)


def test_bad_studies_are_one_line_errors():
  with pytest.raises(ValueError, match="at least one seed"):
    studies.summarize({})
  with pytest.raises(ValueError, match=r"seed 1 reports \['fid'\], seed 0 reports \['loss'\]"):
    studies.summarize({0: {"loss": 1.0}, 1: {"fid": 2.0}})


def test_write_summary_json_round_trip_and_markdown(tmp_path):
  summary = studies.summarize({0: {"loss": 1.0}, 1: {"loss": 3.0}})
  json_path, md_path = studies.write_summary(str(tmp_path / "study"), summary)
  with open(json_path) as f:
    assert json.load(f) == summary
  with open(md_path) as f:
    lines = f.read().splitlines()
  assert lines[0] == "| seed | loss |"
  assert lines[2:5] == ["| 0 | 1 |", "| 1 | 3 |", "| mean | 2 |"]
  # t(0.975, 1) = 12.7062; std sqrt(2); half-width 12.7062 * sqrt(2) / sqrt(2).
  assert lines[6] == "| 95% CI of the mean | [-10.7062, 14.7062] |"
