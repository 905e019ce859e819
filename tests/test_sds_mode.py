"""Tests of --mode=sds (`experiment/sds_mode.py`): score distillation against a tiny prior run
(pixel or latent space) or a tiny Stable Diffusion folder, its outputs, exact resumption,
reproducibility and its one-line errors."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from run_files import write_run

from configs import shapes_autoencoder, shapes_sds
from diffusion_jax import pretrained
from diffusion_jax.experiment import latent, sds_mode, sds_prior
from diffusion_jax.models.autoencoder import Autoencoder
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime.errors import ConfigError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SD1 = FIXTURES / "sd_pipelines" / "sd1"
DDPM = FIXTURES / "diffusers_ddpm_unet" / "pipeline"


@pytest.fixture(scope="module")
def prior(tmp_path_factory, tiny_config):
  workdir = str(tmp_path_factory.mktemp("prior") / "run")
  write_run(tiny_config(text=True), workdir)  # a text-conditional prior at 8x8
  return workdir


def _config(prior, **sds):
  config = shapes_sds.get_config()
  config.sds.prior_workdir = prior
  config.sds.num_steps = 4
  config.sds.batch_size = 2
  config.sds.grid_size = 6
  config.sds.num_ray_samples = 6
  config.sds.num_views = 4
  config.sds.log_every = 1
  config.sds.checkpoint_every = 2
  config.train.progress = False
  for name, value in sds.items():
    config.sds[name] = value
  return config


def _views(workdir):
  with np.load(os.path.join(workdir, "sds", "views.npz")) as f:
    return f["views"]


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_sds_writes_its_views_and_resumes_exactly(prior, tmp_path, mode):
  config = _config(prior, mode=mode)
  straight = str(tmp_path / "straight")
  paths = sds_mode.run_sds(config, straight)
  views = _views(straight)
  assert views.shape == (4, 8, 8, 3) and views.dtype == np.uint8
  for name in ("png", "gif", "plot"):
    assert os.path.isfile(paths[name]), name
  with open(os.path.join(straight, "sds", "metrics.jsonl")) as f:
    assert len(f.readlines()) == 4
  # The parameters moved: the views are not the starting ones.
  assert len(np.unique(views)) > 1
  if mode == "3d":  # a scene: the views of the ring differ (resuming is the same code as 2d's)
    assert not np.array_equal(views[0], views[1])
    return
  assert all(np.array_equal(v, views[0]) for v in views)  # one image, seen from every view
  # Stopped after 2 steps (its checkpoint at step 2), then resumed: the same views, bitwise.
  parts = str(tmp_path / "parts")
  sds_mode.run_sds(_config(prior, mode=mode, num_steps=2), parts)
  sds_mode.run_sds(config, parts)
  np.testing.assert_array_equal(_views(parts), views)


def test_another_seed_draws_other_noise(prior, tmp_path):
  first, second = _config(prior, mode="2d", num_steps=2), _config(prior, mode="2d", num_steps=2)
  second.seed = 1
  sds_mode.run_sds(first, str(tmp_path / "seed0"))
  sds_mode.run_sds(second, str(tmp_path / "seed1"))
  assert not np.array_equal(_views(str(tmp_path / "seed0")), _views(str(tmp_path / "seed1")))


def test_the_ring_goes_round_the_object():
  settings = sds_mode.read_settings(_config("unused"))
  azimuth, elevation, distance = (np.asarray(c) for c in sds_mode.ring_cameras(settings))
  np.testing.assert_allclose(azimuth, [0, 90, 180, 270])
  np.testing.assert_allclose(elevation, 10.0)
  np.testing.assert_allclose(distance, 3.25)


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("mode", "4d", "sds.mode='4d' is unknown; valid: 3d, 2d"),
    ("num_steps", 0, "sds.num_steps=0 must be a positive integer"),
    ("t_max", 1.5, "need 0 <= t_min <= t_max <= 1"),
    ("shading", "phong", "sds.shading='phong'"),
  ],
)
def test_bad_settings_are_one_line_errors(field, value, message):
  with pytest.raises(ConfigError, match=message):
    sds_mode.read_settings(_config("unused", **{field: value}))


def test_the_prior_must_exist_and_be_conditional(tmp_path, tiny_config):
  with pytest.raises(ConfigError, match="holds no trained run"):
    sds_mode.run_sds(_config(str(tmp_path / "missing")), str(tmp_path / "out"))
  unconditional = str(tmp_path / "unconditional")
  write_run(tiny_config(), unconditional)
  with pytest.raises(ConfigError, match="text- or class-conditional"):
    sds_mode.run_sds(_config(unconditional), str(tmp_path / "out"))


# ------------------------------------------------------------ latent and Stable Diffusion priors


@pytest.fixture(scope="module")
def latent_prior(tmp_path_factory, tiny_config):
  """A text-conditional latent run (random weights) on a 16x16 -> 4x4x4 autoencoder's latents."""
  root = tmp_path_factory.mktemp("latent_prior")
  ae_config = shapes_autoencoder.get_config()
  for name, value in {
    "data.image_size": 16,
    "autoencoder.channels": 8,
    "autoencoder.channel_mult": (1, 2, 2),
    "autoencoder.num_res_blocks": 1,
    "autoencoder.num_groups": 4,
  }.items():
    section, field = name.split(".")
    ae_config[section][field] = value
  write_run(ae_config, str(root / "autoencoder"))
  overrides = {
    "data.image_size": 16,
    "model.out_channels": 4,
    "model.cross_attn_resolutions": (4,),
    "latent.autoencoder_workdir": str(root / "autoencoder"),
    "latent.scale_factor": 0.8,
  }
  write_run(tiny_config(overrides, text=True), str(root / "run"))
  return str(root / "run"), str(root / "autoencoder")


def test_a_latent_prior_sees_the_renders_through_its_encoder(latent_prior, tmp_path):
  workdir, ae_workdir = latent_prior
  config = _config(workdir, mode="2d", num_steps=2, tv_weight=100.0)
  s = sds_mode.read_settings(config)
  prior = sds_mode.load_prior(config, s)
  assert prior.kind == "latent" and prior.image_size == 16
  # Its inputs are 0.8 times the posterior means of the autoencoder read back on its own.
  model, params, _ = latent.load_autoencoder(ae_workdir, parallel.make_mesh())
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
  mean = jax.jit(lambda x: model.apply({"params": params}, x, method=Autoencoder.encode).mean)
  np.testing.assert_allclose(
    jax.jit(prior.encode)(prior.params, images), 0.8 * mean(images), rtol=1e-6, atol=1e-7
  )
  sds_mode.run_sds(config, str(tmp_path))
  views = _views(str(tmp_path))
  assert views.shape == (4, 16, 16, 3) and len(np.unique(views)) > 1
  with open(tmp_path / "sds" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records[0]["tv"] == 0.0 < records[1]["tv"]  # the grey start is flat; step 1 is not


def test_the_stable_diffusion_prior_guides_away_from_the_negative_prompt(monkeypatch):
  """Its denoiser is the pipeline's guided U-Net (`StableDiffusion.denoiser`, which the pipeline
  tests hold to diffusers) on context [prompt × B; negative prompt × B]."""
  sd = pretrained.load_stable_diffusion(str(SD1))
  seen = {}

  def denoiser(unet_params, context, scale):
    seen.update(unet=unet_params, context=context, scale=scale)
    return lambda x, t: x

  monkeypatch.setattr(sd, "denoiser", denoiser)
  prior = sds_prior.from_stable_diffusion(sd, "a red circle", "blurry", 3.0)
  assert prior.image_size == 16 and prior.prediction == sd.scheduler.prediction
  prior.denoiser(prior.params, 2)
  want = sd.encode_prompt(["a red circle"] * 2 + ["blurry"] * 2)
  np.testing.assert_allclose(seen["context"], want, rtol=1e-6, atol=1e-6)
  assert seen["scale"] == 3.0 and seen["unet"] is prior.params["unet"]


def test_stable_diffusion_from_disk_distils_renders_of_another_size(tmp_path):
  config = _config("unused", mode="3d", num_steps=2, render_size=8)
  config.pretrained = str(SD1)
  sds_mode.run_sds(config, str(tmp_path))
  views = _views(str(tmp_path))  # rendered at 8x8, resized to the prior's 16x16 in each step
  assert views.shape == (4, 8, 8, 3) and not np.array_equal(views[0], views[1])


def test_a_pipeline_without_prompts_is_no_prior(tmp_path):
  config = _config("unused", mode="2d")
  config.pretrained = str(DDPM)
  with pytest.raises(ConfigError, match="not a text-to-image pipeline"):
    sds_mode.run_sds(config, str(tmp_path))
