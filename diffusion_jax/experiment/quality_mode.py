"""--mode=eval with `eval.metrics`: FID, KID, Inception Score and precision/recall of images.

The images scored are `eval.num_samples` samples of the run's latest checkpoint (the `sample.*`
sampler, step count and guidance scale), or an existing folder or .npz (`eval.images`). They are
compared with reference features: a statistics .npz (`eval.reference`: TTUR's `mu` and `sigma`,
enough for FID; the project's files also hold the features that KID and precision/recall need),
a folder of images, or by default the run's own data set (`data.*`, split `eval.reference_split`,
at most `eval.num_reference` images), extracted once and cached in WORKDIR/eval/.

Features are pytorch-fid's FID Inception-v3 pool features (`eval.inception_weights`), extracted
in batches of `eval.batch_size` sharded over the devices. Inception Score uses the fc layer's
logits without its bias, as torch-fidelity does.
"""

import dataclasses
import functools
import glob
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from PIL import Image

from diffusion_jax import data
from diffusion_jax.evaluation import feature_metrics
from diffusion_jax.experiment import sample_mode, settings
from diffusion_jax.pretrained import WeightsError, load_fid_inception
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime.errors import ConfigError
from diffusion_jax.runtime.metric_writer import MetricWriter

METRICS = ("bpd", "fid", "kid", "is", "pr")
# The figures, in the order --mode=eval prints them.
FIGURES = ("fid", "kid", "kid_std", "is", "is_std", "precision", "recall")
_NEED_FEATURES = ("kid", "pr")  # the metrics that need the reference's features, not its stats
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def parse_metrics(value: str) -> tuple[str, ...]:
  """`eval.metrics` ("fid,kid") as a tuple of names from METRICS; one-line ConfigError else."""
  names = tuple(n.strip() for n in str(value).split(",") if n.strip())
  unknown = [n for n in names if n not in METRICS]
  if not names or unknown:
    raise ConfigError(
      f"eval.metrics={value!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
      f"valid: {', '.join(METRICS)} (comma-separated)"
    )
  return names


class FeatureExtractor:
  """Inception pool features and bias-free logits of uint8 images, batch by batch.

  Args:
    weights: pytorch-fid's FID Inception weights file.
    batch_size: images per compiled call (global), a multiple of the device count.
    mesh: the devices to shard each batch over (default: all).
  """

  def __init__(self, weights: str, batch_size: int, mesh=None):
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    try:
      parallel.check_batch_size(batch_size, self.mesh, field="eval.batch_size")
    except ValueError as e:
      raise ConfigError(str(e)) from e
    model, params = load_fid_inception(weights)
    self.batch_size = batch_size
    self.params = jax.device_put(params, parallel.replicated(self.mesh))
    self.fc_kernel = np.asarray(params["fc"]["kernel"], np.float64)
    self._fn = _features_fn(model, self.mesh)

  def __call__(self, images, count: int, desc: str) -> dict[str, np.ndarray]:
    """{"pool": [N, 2048], "logits": [N, 1008]} float64 of images[0 .. count-1] (an array or a
    sequence of uint8 [H, W, 3]); the last batch is filled with repeats, dropped afterwards."""
    pools = []
    for start in tqdm.trange(0, count, self.batch_size, unit="batch", desc=desc):
      picks = np.minimum(np.arange(start, start + self.batch_size), count - 1)
      batch = np.stack([np.asarray(images[int(i)], np.uint8) for i in picks])
      if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ConfigError(f"{desc}: images must be RGB [H, W, 3], got a batch {batch.shape}")
      pool = self._fn(self.params, jax.device_put(batch, parallel.batch_sharded(self.mesh)))
      pools.append(np.asarray(pool, np.float64)[: count - start])
    pool = np.concatenate(pools)
    return {"pool": pool, "logits": pool @ self.fc_kernel}


@functools.lru_cache(maxsize=4)
def _features_fn(model, mesh):
  """(params, uint8 images) -> pool features, jitted once per network and mesh."""

  def features(params, images):
    return model.apply({"params": params}, images.astype(jnp.float32) / 255.0)

  return jax.jit(
    features,
    in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
    out_shardings=parallel.replicated(mesh),
  )


def read_images(path: str) -> np.ndarray:
  """uint8 [N, H, W, 3] from a .npz ("samples", "arr_0" or its only array) or a folder of
  same-sized pictures (sorted by name); one-line ConfigError naming the problem."""
  if not os.path.exists(path):
    raise ConfigError(f"eval.images={path}: no such file or folder")
  if os.path.isdir(path):
    files = sorted(
      f
      for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
      if f.lower().endswith(_IMAGE_EXTENSIONS)
    )
    if not files:
      raise ConfigError(f"eval.images={path}: no pictures ({', '.join(_IMAGE_EXTENSIONS)})")
    pictures = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    shapes = sorted({p.shape for p in pictures})
    if len(shapes) > 1:
      raise ConfigError(f"eval.images={path}: pictures of different sizes {shapes[:3]}")
    return np.stack(pictures)
  try:
    with np.load(path) as archive:
      keys = [k for k in ("samples", "arr_0") if k in archive] or list(archive)
      images = archive[keys[0]] if len(keys) == 1 or keys[0] in ("samples", "arr_0") else None
  except (OSError, ValueError) as e:
    raise ConfigError(f"eval.images={path}: not a readable .npz ({e})") from None
  if images is None or images.ndim != 4 or images.shape[-1] != 3:
    raise ConfigError(f"eval.images={path}: needs uint8 images [N, H, W, 3] under 'samples'")
  return images.astype(np.uint8)


def _reference_source(config: ml_collections.ConfigDict):
  """The data set of eval.reference (a folder) or else of the run (split eval.reference_split),
  at the run's image size, and its DataConfig (which names the cache file)."""
  data_config = settings.from_section(data.DataConfig, config.data, "data")
  if config.eval.reference:
    path = os.path.abspath(config.eval.reference)
    data_config = dataclasses.replace(data_config, dataset="folder", path=path)
  else:
    data_config = dataclasses.replace(data_config, split=config.eval.reference_split)
  return data.make_source(data_config), data_config


def reference_features(config, extractor: FeatureExtractor, cache_dir: str) -> dict:
  """{"mu", "sigma"} and, unless from a TTUR file, "pool" of the reference images."""
  reference = config.eval.reference
  if reference.endswith(".npz"):
    try:
      with np.load(reference) as archive:
        out = {k: archive[k] for k in ("mu", "sigma", "pool") if k in archive}
    except (OSError, ValueError) as e:
      raise ConfigError(f"eval.reference={reference}: not a readable .npz ({e})") from None
    if "mu" not in out or "sigma" not in out:
      raise ConfigError(f"eval.reference={reference}: no 'mu' and 'sigma' (TTUR statistics)")
    return out
  source, data_config = _reference_source(config)
  count = min(len(source), config.eval.num_reference)
  weights = os.path.abspath(config.eval.inception_weights)
  key = json.dumps([repr(data_config), count, weights, os.path.getsize(weights)])
  path = os.path.join(cache_dir, f"reference_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz")
  if os.path.isfile(path):
    logging.info("reference features from the cache %s", path)
    with np.load(path) as archive:
      return {k: archive[k] for k in ("mu", "sigma", "pool")}
  images = _ImagesOf(source)
  pool = extractor(images, count, f"reference features ({count} images)")["pool"]
  stats = feature_metrics.FeatureStats().update(pool)
  out = {"mu": stats.mean, "sigma": stats.cov, "pool": pool}
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path + ".tmp.npz", **out)
    os.replace(path + ".tmp.npz", path)
  return out


class _ImagesOf:
  """source[i]["image"] as images[i]."""

  def __init__(self, source):
    self.source = source

  def __getitem__(self, i):
    return self.source[i]["image"]


def _check_statistics_file(path: str, metrics) -> None:
  """A one-line error, before any work, for metrics that a statistics file cannot serve."""
  try:
    with np.load(path) as archive:
      has_features = "pool" in archive
  except (OSError, ValueError) as e:
    raise ConfigError(f"eval.reference={path}: not a readable .npz ({e})") from None
  missing = [m for m in metrics if m in _NEED_FEATURES]
  if missing and not has_features:
    raise ConfigError(
      f"eval.metrics={','.join(missing)} need the reference's features; eval.reference={path} "
      "holds only mu and sigma (use a folder or the run's data set)"
    )


def compute(metrics, generated: dict, reference: dict, config) -> dict[str, float]:
  """The figures of `metrics` from generated features and reference statistics/features."""
  missing = [m for m in metrics if m in _NEED_FEATURES and "pool" not in reference]
  if missing:
    raise ConfigError(
      f"eval.metrics={','.join(missing)} need the reference's features; eval.reference="
      f"{config.eval.reference} holds only mu and sigma (use a folder or the run's data set)"
    )
  stats = feature_metrics.FeatureStats().update(generated["pool"])
  out = {}
  if "fid" in metrics:
    out["fid"] = feature_metrics.frechet_distance(
      stats.mean, stats.cov, reference["mu"], reference["sigma"]
    )
  if "kid" in metrics:
    size = min(config.eval.kid_subset_size, len(generated["pool"]), len(reference["pool"]))
    out["kid"], out["kid_std"] = feature_metrics.kid(
      generated["pool"], reference["pool"], subset_size=size
    )
  if "is" in metrics:
    out["is"], out["is_std"] = feature_metrics.inception_score(generated["logits"])
  if "pr" in metrics:
    out["precision"], out["recall"] = feature_metrics.precision_recall(
      reference["pool"], generated["pool"]
    )
  return out


def figures_line(result: dict) -> str:
  """The figures of a result in FIGURES order: "fid 12.3 kid 0.0123 ..."."""
  return " ".join(f"{name} {result[name]:.6g}" for name in FIGURES if name in result)


def _setup(config: ml_collections.ConfigDict) -> tuple[list[str], FeatureExtractor]:
  """The metrics asked for (less bpd) and the feature extractor; one-line errors first."""
  metrics = [m for m in parse_metrics(config.eval.metrics) if m != "bpd"]
  if not config.eval.inception_weights:
    raise ConfigError(
      "eval.inception_weights is not set: pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
    )
  if config.eval.reference.endswith(".npz"):
    _check_statistics_file(config.eval.reference, metrics)
  try:
    return metrics, FeatureExtractor(config.eval.inception_weights, config.eval.batch_size)
  except WeightsError as e:
    raise ConfigError(f"eval.inception_weights: {e}") from None


def _write(result: dict, path: str, writer: MetricWriter | None) -> None:
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
  if writer is not None:
    writer.write(result["step"], {k: v for k, v in result.items() if k in FIGURES})


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, str]:
  """Scores eval.images, or samples of the run in `workdir`; writes the figures to a JSON file
  (WORKDIR/eval/metrics_<step>.json and a line of WORKDIR/eval_metrics.jsonl, or
  <images>_metrics.json). Returns (figures, path)."""
  metrics, extractor = _setup(config)
  step = None
  if config.eval.images:
    images = read_images(config.eval.images)
    base = os.path.normpath(config.eval.images)
    path = (os.path.splitext(base)[0] if base.endswith(".npz") else base) + "_metrics.json"
    cache_dir = os.path.join(os.path.dirname(os.path.abspath(base)), "eval_reference")
  else:
    images, step = sample_mode.draw(config, workdir, config.eval.num_samples)
    path = os.path.join(workdir, "eval", f"metrics_{step:07d}.json")
    cache_dir = os.path.join(workdir, "eval")
  start = time.time()
  generated = extractor(images, len(images), f"features of {len(images)} images")
  reference = reference_features(config, extractor, cache_dir)
  figures = compute(metrics, generated, reference, config)
  result = {**figures, "num_images": len(images), "step": step, "seconds": time.time() - start}
  writer = None if step is None else MetricWriter(workdir, "eval_metrics.jsonl", "eval/")
  _write(result, path, writer)
  if writer is not None:
    writer.close()
  return result, path


class DuringTraining:
  """The figures of eval.metrics on train.eval_samples samples of the EMA parameters, called
  every train.eval_every steps: WORKDIR/eval/metrics_<step>.json and WORKDIR/eval_metrics.jsonl.

  The samples of every call come from the same noise (`sample_mode.draw_with`), so the figures
  of two steps differ by the parameters only. The reference features are extracted (or read from
  the cache) here, before training goes on.
  """

  @classmethod
  def every(cls, run, workdir: str, study: bool) -> "DuringTraining | None":
    """The evaluator of a run with train.eval_every > 0, else None."""
    if not run.train.eval_every:
      return None
    if study or run.is_autoencoder:
      raise ConfigError("train.eval_every: sample quality is measured in single diffusion runs")
    return cls(run.config, run, workdir)

  def __init__(self, config: ml_collections.ConfigDict, run, workdir: str):
    self.config, self.run, self.workdir = config, run, workdir
    self.metrics, self.extractor = _setup(config)
    if not self.metrics:
      raise ConfigError("train.eval_every > 0 needs eval.metrics with fid, kid, is or pr")
    self.reference = reference_features(config, self.extractor, os.path.join(workdir, "eval"))
    self.sample_fn = run.sample_fn()
    self.writer = MetricWriter(workdir, "eval_metrics.jsonl", "eval/")

  def __call__(self, step: int, ema_params) -> str:
    """Scores the samples of `ema_params` at `step`; returns the figures as one line."""
    count = self.config.train.eval_samples
    start = time.time()
    images = sample_mode.draw_with(self.run, self.sample_fn, ema_params, self.config, count)
    generated = self.extractor(images, count, f"features of {count} samples")
    figures = compute(self.metrics, generated, self.reference, self.config)
    result = {**figures, "num_images": count, "step": step, "seconds": time.time() - start}
    _write(result, os.path.join(self.workdir, "eval", f"metrics_{step:07d}.json"), self.writer)
    return figures_line(result)

  def close(self) -> None:
    self.writer.close()
