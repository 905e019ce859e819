"""An autoencoder run (model.name="autoencoder"): its loss, training, resuming, grids and eval."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_autoencoder
from diffusion_jax import data
from diffusion_jax.core import likelihood, rng
from diffusion_jax.experiment import autoencoder, generate, latent_cache
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.experiment.train import train_and_evaluate
from diffusion_jax.models.autoencoder import Autoencoder

ROOT = pathlib.Path(__file__).resolve().parents[1]

# 16x16 images, f = 4 (latents 4x4x4), width 8: compiles in seconds.
TINY = {
  "data.image_size": 16,
  "data.num_examples": 64,
  "autoencoder.channels": 8,
  "autoencoder.channel_mult": (1, 2, 2),
  "autoencoder.num_res_blocks": 1,
  "autoencoder.num_groups": 4,
  "train.batch_size": 4,
  "train.num_steps": 4,
  "train.warmup_steps": 1,
  "train.cooldown_steps": 0,
  "train.log_every": 1,
  "train.checkpoint_every": 2,
  "train.sample_every": 2,
  "train.num_grid_samples": 16,
  "train.progress": False,
  "eval.num_examples": 12,
  "eval.batch_size": 8,
}


def ae_config(**overrides):
  """The tiny autoencoder run's config with `overrides`."""
  config = shapes_autoencoder.get_config()
  for name, value in {**TINY, **overrides}.items():
    section, field = name.split(".")
    config[section][field] = value
  return config


def test_the_loss_is_ldm_reconstruction_sum_plus_weighted_kl(fast_compile):
  overrides = {"autoencoder.channel_mult": (1, 2), "autoencoder.num_res_blocks": 0}
  config = ae_config(
    **overrides, **{"autoencoder.reconstruction": "l2", "autoencoder.kl_weight": 0.5}
  )
  run = run_lib.make_run(config)
  params = jax.jit(run.init_state)(jax.random.key(0)).params
  x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
  keys = jax.random.split(jax.random.key(2), 3)
  loss_fn = jax.jit(
    lambda p, x, k: autoencoder.loss_per_example(run.model, p, x, k, config.autoencoder)
  )
  loss, terms, _ = loss_fn(params, x, keys)

  apply = jax.jit(run.model.apply, static_argnames="method")
  posterior = apply({"params": params}, x, method=Autoencoder.encode)
  # Each image's latent drawn with its own key, then decoded.
  noise = jnp.stack([jax.random.normal(k, posterior.mean.shape[1:]) for k in keys])
  z = posterior.mean + posterior.std * noise
  out = apply({"params": params}, z, method=Autoencoder.decode)
  mean, logvar = np.float64(posterior.mean), np.float64(posterior.logvar)
  kls = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  err = (np.float64(out) - np.float64(x)) ** 2
  np.testing.assert_allclose(terms["kl"], kls, rtol=1e-4)
  np.testing.assert_allclose(terms["rec"], err.mean(axis=(1, 2, 3)), rtol=1e-4)
  np.testing.assert_allclose(loss, err.sum(axis=(1, 2, 3)) + 0.5 * np.array(kls), rtol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fast_compile):
  """4 steps, then resumed to 6 in the same workdir."""
  workdir = str(tmp_path_factory.mktemp("autoencoder") / "run")
  first = train_and_evaluate(ae_config(), workdir)
  resumed = train_and_evaluate(ae_config(**{"train.num_steps": 6}), workdir)
  return workdir, first, resumed


def test_training_logs_its_terms_saves_and_resumes(trained):
  workdir, first, resumed = trained
  assert {"loss", "rec", "kl", "grad_norm", "lr", "param_norm"} <= set(first)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4, 5, 6]  # The resumed run went on from step 4.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1].endswith("6")
  assert os.path.exists(os.path.join(workdir, "metrics.png"))


def test_grids_show_held_out_images_above_their_reconstructions(trained):
  workdir = trained[0]
  with np.load(os.path.join(workdir, "samples", "step_0000006_reconstructions.npz")) as f:
    originals, reconstructions = f["originals"], f["reconstructions"]
  source = autoencoder.held_out_source(ae_config())
  assert originals.shape == reconstructions.shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(originals, np.stack([source[i]["image"] for i in range(8)]))
  assert reconstructions.dtype == np.uint8


def test_eval_reports_psnr_ssim_and_kl(trained, fast_compile_env):
  workdir = trained[0]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **fast_compile_env}
  main = [sys.executable, str(ROOT / "main.py"), f"--workdir={workdir}"]
  evaluated = subprocess.run([*main, "--mode=eval"], env=env, capture_output=True, text=True)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in evaluated.stdout.splitlines()[1:])
  assert set(lines) == {"psnr", "ssim", "kl"}
  with open(os.path.join(workdir, "eval", "reconstruction_0000006.json")) as f:
    result = json.load(f)
  assert result["num_examples"] == 12 and result["split"] == "test"
  for name in autoencoder.FIGURES:
    assert abs(float(lines[name]) - result[name]) < 1e-3 and np.isfinite(result[name])
  assert -1 < result["ssim"] < 1 and result["kl"] > 0


# ---------------------------------------------------------------- latent diffusion on its latents


def latent_config(tiny_config, ae_workdir, **overrides):
  """A 3-step latent diffusion run on the trained autoencoder's 4x4x4 latents."""
  return tiny_config(
    {
      "data.image_size": 16,
      "data.num_examples": 256,
      "model.out_channels": 4,
      "train.num_steps": 3,
      "latent.autoencoder_workdir": ae_workdir,
      "latent.scale_examples": 64,
      **overrides,
    }
  )


@pytest.fixture(scope="module")
def latent_run(trained, tiny_config, tmp_path_factory):  # conftest's tiny diffusion setup
  """A 3-step latent diffusion run, its latents encoded batch by batch."""
  workdir = str(tmp_path_factory.mktemp("latent") / "run")
  metrics = train_and_evaluate(latent_config(tiny_config, trained[0]), workdir)
  return workdir, metrics


def test_a_latent_run_adopts_its_autoencoder_and_records_the_scale(latent_run, trained):
  workdir, metrics = latent_run
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["latent"]["scale_factor"] > 0 and np.isfinite(metrics["loss"])
  ae = ae_config().autoencoder
  assert saved["autoencoder"]["channel_mult"] == list(ae.channel_mult)
  assert saved["autoencoder"]["channels"] == ae.channels == 8  # the run's, not the default's


def test_the_scale_factor_makes_training_latents_unit_variance(latent_run):
  r, _ = run_lib.load(latent_run[0])
  source = data.make_source(r.data)
  # Training images the estimate did not see (it read the first 64).
  images = np.stack([source[i]["image"] for i in range(64, 256)])
  z = r.latent.encode(images, jax.random.key(7))
  assert r.latent.scale_factor == pytest.approx(
    json.load(open(f"{latent_run[0]}/config.json"))["latent"]["scale_factor"]
  )
  assert abs(float(np.std(np.asarray(z, np.float64))) - 1.0) < 0.05


def test_latent_samples_are_decoded_to_pixels(latent_run):
  r, state = run_lib.load(latent_run[0])
  assert r.image_shape == (4, 4, 4)
  fn = r.sample_fn(sampler="ddim", num_steps=3)
  images = generate.generate(fn, state.ema_params, jax.random.key(0), 4, 4)
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
  latents = generate.generate(
    r.sample_fn(sampler="ddim", num_steps=3, to_uint8=False),
    state.ema_params,
    jax.random.key(0),
    4,
    4,
  )
  np.testing.assert_array_equal(images, np.asarray(r.latent.decode(latents)))
  grids = sorted(f for f in os.listdir(os.path.join(latent_run[0], "samples")) if f.endswith("npz"))
  with np.load(os.path.join(latent_run[0], "samples", grids[-1])) as f:
    assert f["samples"].shape[1:] == (16, 16, 3)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_cached_and_on_the_fly_latents_train_alike(latent_run, trained, tiny_config, tmp_path):
  # The same run (flips on: both halves of the cache are read) from the encoded training set.
  config = latent_config(tiny_config, trained[0], **{"latent.cache": True})
  assert config.data.random_flip
  train_and_evaluate(config, str(tmp_path))
  moments = np.load(tmp_path / "latent_cache" / "moments.npy", mmap_mode="r")
  assert moments.shape == (256, 2, 4, 4, 8)  # [N, flip, h, w, mean | std]
  np.testing.assert_allclose(_losses(tmp_path), _losses(latent_run[0]), rtol=2e-5)
  # The cached rows are the encoder's posterior of each image, and of its mirror image.
  r, _ = run_lib.load(str(tmp_path))
  cache = latent_cache.load_or_encode(r.config, r.latent, str(tmp_path))
  source = data.make_source(r.data)
  images = np.stack([source[i]["image"] for i in (3, 200)])
  for flipped in (False, True):
    mean, std = r.latent.moments(images[:, :, ::-1] if flipped else images)
    got = cache.rows(np.array([3, 200]), np.array([flipped, flipped]))
    np.testing.assert_allclose(got[0], mean, atol=1e-5)
    np.testing.assert_allclose(got[1], std, rtol=1e-5)


def test_the_latent_cache_is_encoded_again_for_another_autoencoder(latent_run, tmp_path):
  r, _ = run_lib.load(latent_run[0])
  first = np.array(latent_cache.load_or_encode(r.config, r.latent, str(tmp_path)).moments)
  stamp = os.path.getmtime(tmp_path / "latent_cache" / "moments.npy")
  again = latent_cache.load_or_encode(r.config, r.latent, str(tmp_path))
  assert os.path.getmtime(tmp_path / "latent_cache" / "moments.npy") == stamp  # read, not encoded
  np.testing.assert_array_equal(again.moments, first)
  other = dataclasses.replace(r.latent, params=jax.tree.map(lambda p: p * 1.5, r.latent.params))
  changed = latent_cache.load_or_encode(r.config, other, str(tmp_path))
  assert not np.allclose(changed.moments, first)
  with open(tmp_path / "latent_cache" / "fingerprint.json") as f:
    assert json.load(f) == latent_cache.fingerprint(r.config, other)
  assert sorted(os.listdir(tmp_path / "latent_cache")) == ["fingerprint.json", "moments.npy"]


def test_latent_eval_bounds_the_latents_and_reports_the_autoencoder(latent_run, capsys):
  from diffusion_jax.experiment import cli, eval_mode, latent, saved_config

  workdir = latent_run[0]
  config = saved_config.load(workdir)
  config.eval.num_examples, config.eval.batch_size = 5, 4
  cli._evaluate(config, workdir)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("bits/dim on latents ") and "the 4x4x4 latents" in lines[0]
  assert lines[1].startswith("reconstructions of 5 images of test by the autoencoder at step 6")
  assert [line.split()[0] for line in lines[2:]] == list(autoencoder.FIGURES)
  with open(os.path.join(workdir, "eval", "bits_per_dim_0000003.json")) as f:
    result = json.load(f)
  with open(os.path.join(workdir, "eval", "reconstruction_0000006.json")) as f:
    assert json.load(f)["num_examples"] == 5
  # Directly: image i's latent drawn with fold_in(eval latent key, i), a Gaussian decoder term.
  r, state = run_lib.load(workdir)
  source = eval_mode._eval_source(config)
  images = np.stack([source[i]["image"] for i in range(5)])
  latent_key = rng.stream_key(config.eval.seed, latent.LATENT)
  x0 = r.latent.encode(images, jax.random.fold_in(latent_key, latent.EVAL))
  key = rng.stream_key(config.eval.seed, rng.EVAL)
  out = likelihood.bits_per_dim(
    r.schedule,
    lambda x_t, t: r.model.apply({"params": state.ema_params}, x_t, t, train=False),
    x0,
    rng.example_keys(key, jnp.arange(5)),
    variance=config.diffusion.variance,
    prediction=config.diffusion.prediction,
    clip_x0=False,
    decoder="continuous",
  )
  for name in eval_mode.FIGURES:
    assert result[name] == pytest.approx(float(np.mean(out[name])), rel=1e-5), name
  assert result["space"] == "latent" and result["latent_shape"] == [4, 4, 4]
