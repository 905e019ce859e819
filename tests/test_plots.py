"""Tests of diffusion_jax.runtime.plots: metrics.jsonl parsing, the EMA smoothing, the PNG."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.runtime import plots
from diffusion_jax.runtime.metric_writer import MetricWriter


def write_run(workdir, num_steps=60, seed=0, truncate=False):
  """Logs a decaying noisy loss and the other training metrics with MetricWriter, as train does."""
  rng = np.random.default_rng(seed)
  writer = MetricWriter(str(workdir))
  expected = []
  for step in range(1, num_steps + 1):
    values = {
      "loss": 0.05 + np.exp(-step / 10) * (1 + 0.2 * rng.random()),
      "grad_norm": 0.5 + rng.random(),
      "param_norm": 10 + 0.01 * step,
      "lr": 1e-3 * min(1.0, step / 10),
    }
    writer.write(step, values)
    expected.append(values)
  writer.close()
  if truncate:  # a run killed in the middle of writing a record
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": num_steps + 1, "loss": 0.0})[:-6])
  return expected


# ---------------------------------------------------------------- read_metrics


def test_read_metrics_round_trips_metric_writer(tmp_path):
  expected = write_run(tmp_path, num_steps=20, truncate=True)
  metrics = plots.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))

  assert set(metrics) == {"step", "loss", "grad_norm", "param_norm", "lr"}
  np.testing.assert_array_equal(metrics["step"], np.arange(1, 21))  # the truncated line is skipped
  assert metrics["step"].dtype == np.int64
  for name in ("loss", "grad_norm", "param_norm", "lr"):
    assert metrics[name].dtype == np.float64 and metrics[name].shape == (20,)
    np.testing.assert_allclose(metrics[name], [float(v[name]) for v in expected], rtol=1e-12)


def test_read_metrics_nulls_missing_keys_and_resumed_steps(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(1, {"loss": 1.0, "grad_norm": float("inf")})  # written as null
  writer.write(2, {"loss": float("nan"), "grad_norm": 2.0})
  writer.write(3, {"loss": 0.5, "grad_norm": 1.5, "mse": 0.25})  # a key that appears late
  writer.write(2, {"loss": 0.75, "grad_norm": 2.5})  # a resumed run logs step 2 again
  writer.close()
  path = os.path.join(tmp_path, "metrics.jsonl")
  with open(path) as f:
    assert "null" in f.read()

  metrics = plots.read_metrics(path)
  np.testing.assert_array_equal(metrics["step"], [1, 2, 3])
  np.testing.assert_array_equal(metrics["loss"], [1.0, 0.75, 0.5])  # the latest record of step 2
  np.testing.assert_array_equal(metrics["grad_norm"], [np.nan, 2.5, 1.5])
  np.testing.assert_array_equal(metrics["mse"], [np.nan, np.nan, 0.25])


def test_read_metrics_missing_empty_and_garbage(tmp_path):
  assert plots.read_metrics(os.path.join(tmp_path, "absent.jsonl")) == {}
  empty = os.path.join(tmp_path, "empty.jsonl")
  open(empty, "w").close()
  assert plots.read_metrics(empty) == {}
  garbage = os.path.join(tmp_path, "garbage.jsonl")
  with open(garbage, "w") as f:
    f.write('\n[1, 2]\n{"loss": 1.0}\n{"step": "x", "loss": 1.0}\n{"step": 4, "lo')
  assert plots.read_metrics(garbage) == {}


# ---------------------------------------------------------------- smooth


@pytest.mark.parametrize("weight", [0.0, 0.5, 0.9, 0.99, None])
def test_smooth_of_a_constant_is_the_constant(weight):
  np.testing.assert_allclose(plots.smooth(np.full(300, 3.25), weight=weight), 3.25, rtol=1e-12)


def test_smooth_step_function_is_debiased_and_converges():
  x = np.concatenate([np.full(50, 2.0), np.full(200, 5.0)])
  y = plots.smooth(x, weight=0.9)

  assert y[0] == x[0]  # debiased: no pull towards 0 at the start
  np.testing.assert_allclose(y[:50], 2.0, rtol=1e-12)
  assert np.all(np.diff(y[50:]) > 0) and np.all(y[50:] < 5.0)  # rises monotonically to the level
  np.testing.assert_allclose(y[-1], 5.0, rtol=1e-6)
  # k points past the step, the 50 points at 2 keep the weight w^(k+1) (1 - w^50) / (1 - w^(51+k)).
  w, k = 0.9, np.arange(200)
  old = w ** (k + 1) * (1 - w**50) / (1 - w ** (51 + k))
  np.testing.assert_allclose(y[50:], 2.0 * old + 5.0 * (1 - old), rtol=1e-12)


def test_smooth_skips_non_finite_values():
  x = np.array([np.nan, 1.0, np.inf, 1.0, np.nan, 1.0])
  y = plots.smooth(x)
  np.testing.assert_array_equal(np.isnan(y), ~np.isfinite(x))
  np.testing.assert_allclose(y[np.isfinite(x)], 1.0, rtol=1e-12)
  assert np.isnan(plots.smooth(np.full(3, np.nan))).all()
  with pytest.raises(ValueError, match="smoothing weight"):
    plots.smooth(x, weight=1.0)


# ---------------------------------------------------------------- write_metrics_plot


def check_png(path):
  """The PNG at `path` has the figure's size in pixels and several distinct colours."""
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    width, height = plots.FIGSIZE
    assert image.size == (round(width * plots.DPI), round(height * plots.DPI))
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
  colours = np.unique(pixels, axis=0)
  assert len(colours) > 20
  return pixels


def no_temporary_files(directory):
  return [name for name in os.listdir(directory) if name.endswith(".tmp")] == []


def test_write_metrics_plot_one_run(tmp_path):
  run = tmp_path / "run"
  write_run(run, truncate=True)
  out = str(tmp_path / "plots" / "metrics.png")  # the directory is created

  assert plots.write_metrics_plot(str(run), out) == out
  pixels = check_png(out)
  # The curves are drawn in matplotlib's first colour (C0, #1f77b4), raw and smoothed.
  assert (np.abs(pixels.astype(int) - [0x1F, 0x77, 0xB4]).sum(axis=1) < 10).sum() > 500
  assert no_temporary_files(tmp_path / "plots")

  # Drawing again replaces the file.
  assert plots.write_metrics_plot(str(run), out) == out
  check_png(out)
  assert sorted(os.listdir(tmp_path / "plots")) == ["metrics.png"]


def test_write_metrics_plot_seed_study(tmp_path):
  runs = {}
  for seed in range(3):
    write_run(tmp_path / f"seed_{seed}", seed=seed)
    runs[f"seed {seed}"] = str(tmp_path / f"seed_{seed}")
  out = str(tmp_path / "metrics.png")

  assert plots.write_metrics_plot(runs, out) == out
  pixels = check_png(out)
  for colour in ([0x1F, 0x77, 0xB4], [0xFF, 0x7F, 0x0E], [0x2C, 0xA0, 0x2C]):  # C0, C1, C2
    assert (np.abs(pixels.astype(int) - colour).sum(axis=1) < 10).sum() > 100
  assert no_temporary_files(tmp_path)


def test_write_metrics_plot_nothing_to_plot(tmp_path):
  out = str(tmp_path / "metrics.png")
  assert plots.write_metrics_plot(str(tmp_path), out) is None  # no metrics.jsonl
  open(tmp_path / "metrics.jsonl", "w").close()
  assert plots.write_metrics_plot(str(tmp_path), out) is None  # an empty one
  assert (
    plots.write_metrics_plot({"seed 0": str(tmp_path), "seed 1": str(tmp_path / "x")}, out) is None
  )
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_write_metrics_plot_loss_only_and_nulls(tmp_path):
  """A run that logged only the loss, with a null in it, still gets its (one-panel) picture."""
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in range(1, 30):
      f.write(json.dumps({"step": step, "loss": None if step == 7 else 1.0 / step}) + "\n")
  out = str(tmp_path / "metrics.png")
  assert plots.write_metrics_plot(str(tmp_path), out) == out
  check_png(out)
