"""--mode=eval's sample-quality figures (experiment/quality_mode.py): images from a folder or an
.npz scored against a reference folder or statistics file, with the FID Inception's seeded random
weights (tests/fixtures/fid_inception)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import shapes
from diffusion_jax.evaluation import feature_metrics
from diffusion_jax.experiment import cli, quality_mode
from diffusion_jax.runtime.errors import ConfigError
from tests.fixtures.fid_inception import weights

pytestmark = [
  pytest.mark.usefixtures("fast_compile"),
  # A few images in 2048 dimensions: singular covariances, as scipy's sqrtm warns.
  pytest.mark.filterwarnings("ignore:Matrix is singular"),
]

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "fid_inception"
SIZE = 16


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> pathlib.Path:
  state_shapes = json.loads((FIXTURES / "state_dict_shapes.json").read_text())
  path = tmp_path_factory.mktemp("inception") / "weights.npz"
  np.savez(path, **weights.random_state_dict(state_shapes))
  return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict:
  """Two sets of 6 pictures, each in a folder; the generated set also as an .npz."""
  root = tmp_path_factory.mktemp("pictures")
  rng = np.random.default_rng(0)
  out = {}
  for name, shift in (("reference", 0), ("generated", 60)):
    folder = root / name
    folder.mkdir()
    for i, image in enumerate(rng.integers(0, 196, (6, SIZE, SIZE, 3), np.uint8) + shift):
      Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:02d}.png")
    out[name] = folder
  np.savez(root / "generated.npz", samples=quality_mode.read_images(str(out["generated"])))
  return {**out, "npz": root / "generated.npz"}


def _config(weights_file, **eval_fields):
  config = shapes.get_config()
  config.data.image_size = SIZE
  config.eval.inception_weights = str(weights_file)
  config.eval.batch_size = 4  # 6 images: a full batch and a padded one
  config.eval.kid_subset_size = 4
  for name, value in eval_fields.items():
    config.eval[name] = value
  return config


def test_compute_gives_the_figures_of_feature_metrics():
  rng = np.random.default_rng(1)
  generated = {"pool": rng.normal(size=(30, 8)) + 0.3, "logits": rng.normal(size=(30, 5)) * 3}
  pool = rng.normal(size=(40, 8))
  stats = feature_metrics.FeatureStats().update(pool)
  reference = {"mu": stats.mean, "sigma": stats.cov, "pool": pool}
  config = _config("unused")
  got = quality_mode.compute(("fid", "kid", "is", "pr"), generated, reference, config)
  g = generated["pool"]
  fid = feature_metrics.frechet_distance(
    g.mean(0), np.cov(g, rowvar=False), pool.mean(0), np.cov(pool, rowvar=False)
  )
  assert got["fid"] == pytest.approx(fid, rel=1e-10)
  assert (got["kid"], got["kid_std"]) == feature_metrics.kid(g, pool, subset_size=4)
  assert (got["is"], got["is_std"]) == feature_metrics.inception_score(generated["logits"])
  assert (got["precision"], got["recall"]) == feature_metrics.precision_recall(pool, g)
  with pytest.raises(ConfigError, match="eval.metrics=kid,pr need the reference's features"):
    quality_mode.compute(("kid", "pr"), generated, {"mu": stats.mean, "sigma": stats.cov}, config)


def test_images_scored_against_a_folder_and_against_themselves(weights_file, pictures, capsys):
  reference = str(pictures["reference"])
  # No FID here: its 2048x2048 matrix square root takes seconds (test_compute_... covers it).
  config = _config(weights_file, metrics="kid,pr", images=str(pictures["npz"]), reference=reference)
  result, path = quality_mode.evaluate(config, "/nonexistent")
  assert path == str(pictures["npz"])[: -len(".npz")] + "_metrics.json"
  assert json.loads(pathlib.Path(path).read_text()) == result
  assert result["num_images"] == 6 and result["step"] is None and "fid" not in result
  assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1

  # The reference's features were cached next to the images; scored against itself (from the
  # cache), the reference covers itself and has no KID beyond its noise.
  (cached,) = (pictures["npz"].parent / "eval_reference").glob("reference_*.npz")
  with np.load(cached) as archive:
    assert archive["pool"].shape == (6, 2048)
  # Through --mode=eval's code: one line per figure, then where they went.
  cli._evaluate(_config(weights_file, metrics="kid,pr", images=reference, reference=reference), "")
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines[:-1]] == ["kid", "kid_std", "precision", "recall"]
  path = reference + "_metrics.json"
  assert lines[-1] == f"6 images scored: {path}"
  itself = json.loads(pathlib.Path(path).read_text())
  assert float(lines[0].split()[1]) == pytest.approx(itself["kid"], rel=1e-5)
  assert itself["precision"] == itself["recall"] == 1.0
  # The unbiased MMD estimate of a set against itself is not exactly 0, but within its noise.
  assert abs(itself["kid"]) <= 3 * itself["kid_std"] + 1e-9


def test_a_statistics_file_serves_fid_and_names_what_it_lacks(weights_file, tmp_path):
  rng = np.random.default_rng(2)
  mu, sigma = rng.normal(size=4), np.eye(4) * 2
  feature_metrics.save_stats(tmp_path / "ttur.npz", mu, sigma)
  config = _config(weights_file, metrics="fid", reference=str(tmp_path / "ttur.npz"))
  got = quality_mode.reference_features(config, None, str(tmp_path / "cache"))
  np.testing.assert_array_equal(got["mu"], mu)
  np.testing.assert_array_equal(got["sigma"], sigma)
  assert "pool" not in got
  config.eval.metrics, config.eval.images = "fid,kid", str(tmp_path / "images.npz")
  np.savez(config.eval.images, samples=np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(ConfigError, match="eval.metrics=kid need the reference's features"):
    quality_mode.evaluate(config, "/nonexistent")  # before any image is scored


@pytest.mark.parametrize(
  ("fields", "message"),
  [
    ({"metrics": "fid,lpips"}, "eval.metrics='fid,lpips': unknown lpips; valid: bpd, fid"),
    ({"metrics": " , "}, "eval.metrics=' , ': empty"),
    ({"metrics": "fid", "inception_weights": ""}, "eval.inception_weights is not set"),
    ({"metrics": "fid", "inception_weights": "/no/pt_inception.pth"}, "no such file; get"),
    ({"metrics": "fid", "images": "/no/images.npz"}, "eval.images=/no/images.npz: no such"),
  ],
)
def test_bad_settings_are_one_line_errors(weights_file, fields, message):
  with pytest.raises(ConfigError, match=message) as error:
    quality_mode.evaluate(_config(weights_file, **fields), "/nonexistent")
  assert "\n" not in str(error.value)


def test_figures_do_not_depend_on_the_device_count(
  weights_file, pictures, tmp_path, fast_compile_env
):
  """--mode=eval on 4 simulated devices with batches of 8 (6 images: one padded batch, 2 rows
  per device) gives the features and figures of 1 device with batches of 4 (a full batch and a
  padded one)."""
  results = {}
  for devices in (1, 4):
    folder = tmp_path / str(devices)
    folder.mkdir()
    shutil.copy(pictures["npz"], folder / "generated.npz")
    fields = {
      "metrics": "kid,pr",
      "images": str(folder / "generated.npz"),
      "reference": str(pictures["reference"]),
    }
    config = _config(weights_file, **fields, batch_size=4 if devices == 1 else 8)
    if devices == 1:
      quality_mode.evaluate(config, "")
    else:
      names = {*fields, "inception_weights", "batch_size", "kid_subset_size"}
      command = [sys.executable, str(ROOT / "main.py"), "--config=shapes", "--mode=eval"]
      command += [f"--config.data.image_size={SIZE}"]
      command += [f"--config.eval.{name}={config.eval[name]}" for name in sorted(names)]
      env = {**os.environ, **fast_compile_env, "JAX_PLATFORMS": "cpu"}
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
      done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
      assert done.returncode == 0, done.stderr[-2000:]
    (cached,) = (folder / "eval_reference").glob("reference_*.npz")
    with np.load(cached) as archive:
      pool = archive["pool"]
    results[devices] = (json.loads((folder / "generated_metrics.json").read_text()), pool)
  (one, pool_one), (four, pool_four) = results[1], results[4]
  np.testing.assert_allclose(pool_four, pool_one, rtol=1e-5, atol=1e-6 * np.abs(pool_one).max())
  for name in ("kid", "kid_std", "precision", "recall"):
    assert four[name] == pytest.approx(one[name], rel=1e-4, abs=1e-7), name


def test_figures_during_training_equal_those_of_eval_mode(
  weights_file, tiny_config, tmp_path, capsys
):
  from diffusion_jax.experiment import train

  config = tiny_config({"train.eval_every": 3, "train.eval_samples": 2})
  config.train.num_grid_samples = 0
  config.eval.inception_weights = str(weights_file)
  config.eval.metrics, config.eval.num_reference, config.eval.kid_subset_size = "kid", 4, 2
  config.eval.batch_size = config.eval.num_samples = 2
  train.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(line) for line in (tmp_path / "eval_metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [3, 6]
  assert all(set(line) == {"step", "kid", "kid_std"} for line in lines)
  assert all("loss" in json.loads(line) for line in open(tmp_path / "metrics.jsonl"))
  assert "step 6: kid " in "".join(capsys.readouterr())
  # --mode=eval on the last checkpoint draws the same samples: the same figures.
  result, path = quality_mode.evaluate(config, str(tmp_path))
  assert path == str(tmp_path / "eval" / "metrics_0000006.json")
  for name in ("kid", "kid_std"):
    assert result[name] == pytest.approx(lines[-1][name], rel=1e-6)
  assert len((tmp_path / "eval_metrics.jsonl").read_text().splitlines()) == 3


def test_eval_every_needs_a_sample_quality_metric(weights_file, tiny_config, tmp_path):
  from diffusion_jax.experiment import train

  config = tiny_config({"train.eval_every": 3})
  config.eval.inception_weights = str(weights_file)
  with pytest.raises(ConfigError, match="train.eval_every > 0 needs eval.metrics with fid"):
    train.train_and_evaluate(config, str(tmp_path))
