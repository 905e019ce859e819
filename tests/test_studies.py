"""Tests for diffusion_jax.studies: the across-seed statistics against hand computation and their
coverage on simulated studies, and the JSON / Markdown round trip."""

import json
import math

import jax
import numpy as np
import pytest

from diffusion_jax.experiment import studies


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


# ---------------------------------------------------------------- seed lists and run figures


@pytest.mark.parametrize(
  "value, seeds",
  [("", []), (None, []), ("0,1,2,3", [0, 1, 2, 3]), (" 7 , 2", [7, 2]), ((1, 4), [1, 4]), (5, [5])],
)
def test_parse_seeds(value, seeds):
  assert studies.parse_seeds(value) == seeds


@pytest.mark.parametrize("value", ["0,x", "1,1", "-1", "0,,1", "1.5"])
def test_parse_seeds_rejects_bad_lists(value):
  with pytest.raises(ValueError, match=r"seeds=.*distinct non-negative integers.*seeds=0,1,2,3"):
    studies.parse_seeds(value)


def test_training_figures_count_a_repeated_step_once(tmp_path):
  # Steps 9 and 10 were run twice (a resume from step 8); the later records count.
  records = [(s, float(s)) for s in range(1, 11)] + [(9, 90.0), (10, 100.0)]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step, loss in records:
      f.write(json.dumps({"step": step, "loss": loss}) + "\n")
  figures = studies.training_figures(str(tmp_path), 10)
  assert figures == {"final_loss": 100.0, "tail_loss": 100.0}
  with pytest.raises(ValueError, match="no metrics for step 20"):
    studies.training_figures(str(tmp_path), 20)


def test_tail_loss_is_the_mean_of_the_last_tenth(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in range(10, 101, 10):
      f.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
  # The last 10% of 100 steps are steps 91-100: one record, step 100.
  assert studies.training_figures(str(tmp_path), 100)["tail_loss"] == 100.0
  with open(tmp_path / "metrics.jsonl", "a") as f:
    for step in range(101, 201):
      f.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
  # Steps 181-200.
  assert studies.training_figures(str(tmp_path), 200)["tail_loss"] == pytest.approx(190.5)


# ---------------------------------------------------------------- sliced Wasserstein distance


def test_sliced_wasserstein_per_direction_against_scipy():
  from scipy.stats import wasserstein_distance

  from diffusion_jax import evaluation

  gen = np.random.default_rng(0)
  x, y = gen.normal(size=(50, 6)), gen.normal(1.0, 2.0, size=(50, 6))
  key = jax.random.key(3)
  directions = np.asarray(jax.random.normal(key, (6, 64)), np.float64)
  directions /= np.linalg.norm(directions, axis=0)
  expected = np.mean([wasserstein_distance(x @ u, y @ u) for u in directions.T])
  assert evaluation.sliced_wasserstein(x, y, key, 64) == pytest.approx(expected, rel=1e-10)
  assert evaluation.sliced_wasserstein(x, x[::-1], key, 64) == 0.0


def test_sliced_wasserstein_of_a_translation():
  """y = x + c: every direction u gives exactly |<u, c>|, whose mean over the sphere in R^D is
  |c| Γ(D/2) / (√π Γ((D+1)/2))."""
  from diffusion_jax import evaluation

  dim = 12
  x = np.random.default_rng(1).normal(size=(40, dim))
  c = np.linspace(-1.0, 2.0, dim)
  sphere_mean = math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
  estimate = evaluation.sliced_wasserstein(x, x + c, jax.random.key(0), 20_000)
  # 20,000 directions: the Monte Carlo error of the mean of |<u, c>| is below 1%.
  assert estimate == pytest.approx(np.linalg.norm(c) * sphere_mean, rel=0.02)
