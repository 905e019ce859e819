"""--mode=sds: score distillation (DreamFusion) with a frozen diffusion model as the prior.

The prior (`sds_prior`) is a trained text- or class-conditional run in `sds.prior_workdir`, in
pixel or latent space, or Stable Diffusion from `config.pretrained` when that is set; a latent
prior sees the renders through its autoencoder's encoder, and the gradient flows back through it.

Each step renders `sds.batch_size` views of the parameters (3d: a voxel grid seen from random
cameras on a sphere; 2d: one image, each view its own noise draw), noises them, and moves the
parameters along w(t) (ε̂ − ε) of the prior for the prompt, through the renderer (and encoder)
only (`core.sds.sds_loss`), plus the regularisers that keep a scene solid. Step s draws everything
from fold_in(stream_key(seed, SDS), s): a run is bitwise reproducible and resumes exactly.

WORKDIR/sds/ gets checkpoints/ (step, parameters, Adam state), metrics.jsonl and loss.png, and
at the end views.npz ("views": uint8 [V, H, W, 3], a ring of V = sds.num_views cameras; a 2d
run's image V times), views.png (the ring as a strip) and views.gif.
"""

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from PIL import Image

from diffusion_jax import data
from diffusion_jax.core import rendering, rng, scene, sds
from diffusion_jax.experiment import pretrained_mode, sample_mode, saved_config, sds_prior
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime import checkpoints, images, plots
from diffusion_jax.runtime.errors import ConfigError

MODES = ("3d", "2d")


@dataclasses.dataclass(frozen=True)
class SdsSettings:
  """The `sds` section (meanings in configs/default.py)."""

  prior_workdir: str
  prompt: str
  negative_prompt: str
  render_size: int
  mode: str
  num_steps: int
  batch_size: int
  learning_rate: float
  guidance_scale: float
  t_min: float
  t_max: float
  weighting: str
  grid_size: int
  blob_density: float
  blob_radius: float
  num_ray_samples: int
  fov: float
  elevation_range: tuple[float, float]
  distance_range: tuple[float, float]
  shading: str
  background: tuple[float, float, float]
  opacity_weight: float
  entropy_weight: float
  tv_weight: float
  num_views: int
  log_every: int
  checkpoint_every: int


def read_settings(config: ml_collections.ConfigDict) -> SdsSettings:
  """The `sds` section, checked: one-line ConfigErrors name the field."""
  from diffusion_jax.experiment import settings

  s = settings.from_section(SdsSettings, config.sds, "sds")
  if s.mode not in MODES:
    raise ConfigError(f"sds.mode={s.mode!r} is unknown; valid: {', '.join(MODES)}")
  if int(s.render_size) < 0:
    raise ConfigError(f"sds.render_size={s.render_size} must be 0 (the prior's size) or positive")
  for name in ("num_steps", "batch_size", "num_views", "log_every", "checkpoint_every"):
    if int(getattr(s, name)) < 1:
      raise ConfigError(f"sds.{name}={getattr(s, name)} must be a positive integer")
  if not 0.0 <= s.t_min <= s.t_max <= 1.0:
    raise ConfigError(f"sds.t_min={s.t_min}, sds.t_max={s.t_max}: need 0 <= t_min <= t_max <= 1")
  if s.weighting not in sds.WEIGHTINGS:
    raise ConfigError(f"sds.weighting={s.weighting!r}; valid: {', '.join(sds.WEIGHTINGS)}")
  if s.shading not in ("albedo", "lambertian"):
    raise ConfigError(f"sds.shading={s.shading!r}; valid: albedo, lambertian")
  if s.mode == "3d" and s.grid_size < 2:
    raise ConfigError(f"sds.grid_size={s.grid_size} must be at least 2")
  return s


def load_prior(config: ml_collections.ConfigDict, s: SdsSettings) -> sds_prior.Prior:
  """Stable Diffusion from config.pretrained when it is set, else the run in sds.prior_workdir."""
  if config.get("pretrained"):
    sd = pretrained_mode.load_pipeline(config)
    if not hasattr(sd, "encode_prompt"):
      raise ConfigError(
        f"config.pretrained={config.pretrained!r} is not a text-to-image pipeline; score "
        "distillation needs a prompt-conditional prior (Stable Diffusion)"
      )
    return sds_prior.from_stable_diffusion(sd, s.prompt, s.negative_prompt, s.guidance_scale)
  prior_config = saved_config.load(s.prior_workdir)
  if prior_config is None:
    raise ConfigError(
      f"sds.prior_workdir={s.prior_workdir!r} holds no trained run (no config.json); train one "
      "first, e.g. python main.py --config=shapes_text"
    )
  run = run_lib.make_run(prior_config)
  sds_prior.check_run(run, s.prior_workdir)
  params = sample_mode.restore(run, s.prior_workdir).ema_params
  return sds_prior.from_run(run, params, s.prompt, s.guidance_scale)


def init_params(s: SdsSettings, key: jax.Array, image_shape: tuple[int, int, int]):
  """The optimised parameters: a voxel grid (3d), or an image's pre-tanh values (2d, zeros)."""
  if s.mode == "2d":
    return {"image": jnp.zeros(image_shape, jnp.float32)}
  return scene.init_voxel_grid(key, s.grid_size)


def render(s: SdsSettings, params, cameras, size: int, key=None) -> tuple[jax.Array, jax.Array]:
  """Views [B, size, size, 3] in [-1, 1] and their opacity [B, size, size] (ones in 2d).

  cameras: (azimuth, elevation, distance), each [B]; key: stratified ray samples (None: midpoints).
  """
  count = cameras[0].shape[0]
  if s.mode == "2d":
    image = jnp.tanh(params["image"])
    return jnp.broadcast_to(image, (count, *image.shape)), jnp.ones((count, size, size))
  field = scene.voxel_field(params, blob_density=s.blob_density, blob_radius=s.blob_radius)
  distance = cameras[2]
  keys = None if key is None else jax.random.split(key, count)

  def one(azimuth, elevation, dist, k):
    # A light at the camera: the front of the object is lit, its silhouette shaded.
    light = rendering.camera_to_world(azimuth, elevation, 1.0)[:3, 3]
    out = rendering.render_view(
      field,
      azimuth,
      elevation,
      dist,
      height=size,
      width=size,
      fov_deg=s.fov,
      # The grid's cube [-1, 1]^3 lies within √3 of the origin.
      near=jnp.maximum(dist - 1.75, 0.0),
      far=dist + 1.75,
      num_samples=s.num_ray_samples,
      key=k,
      background=s.background,
      shading=s.shading,
      light_dir=light if s.shading != "albedo" else None,
      ambient=0.3,
    )
    return out["rgb"], out["opacity"]

  if keys is None:
    rgb, opacity = jax.vmap(lambda a, e, d: one(a, e, d, None))(*cameras[:2], distance)
  else:
    rgb, opacity = jax.vmap(one)(*cameras[:2], distance, keys)
  return 2.0 * rgb - 1.0, opacity


def random_cameras(s: SdsSettings, key: jax.Array, count: int):
  """(azimuth, elevation, distance) [count] each: azimuth uniform in [0, 360), the others uniform
  in their ranges."""
  ka, ke, kd = jax.random.split(key, 3)
  azimuth = jax.random.uniform(ka, (count,), maxval=360.0)
  elevation = jax.random.uniform(
    ke, (count,), minval=s.elevation_range[0], maxval=s.elevation_range[1]
  )
  distance = jax.random.uniform(
    kd, (count,), minval=s.distance_range[0], maxval=s.distance_range[1]
  )
  return azimuth, elevation, distance


def ring_cameras(s: SdsSettings):
  """The output ring: num_views azimuths, the middle elevation and distance."""
  v = s.num_views
  azimuth = jnp.arange(v, dtype=jnp.float32) * (360.0 / v)
  elevation = jnp.full((v,), sum(s.elevation_range) / 2, jnp.float32)
  distance = jnp.full((v,), sum(s.distance_range) / 2, jnp.float32)
  return azimuth, elevation, distance


def render_size(s: SdsSettings, prior: sds_prior.Prior) -> int:
  """The size of the renders: sds.render_size, or 0 for the prior's own."""
  return int(s.render_size) or prior.image_size


def make_step(s: SdsSettings, prior: sds_prior.Prior, tx):
  """The jitted step (params, opt_state, step, seed_key, prior_params) -> (params, opt_state,
  metrics), with seed_key = stream_key(seed, SDS) (an argument: another seed compiles nothing
  new) and the prior's weights `prior.params`. Renders of another size than the prior's are
  resized bilinearly before its encoder."""
  size = render_size(s, prior)

  def loss_fn(params, key, prior_params):
    k_cam, k_rays, k_sds = jax.random.split(key, 3)
    views, opacity = render(s, params, random_cameras(s, k_cam, s.batch_size), size, k_rays)
    if size != prior.image_size:
      shape = (s.batch_size, prior.image_size, prior.image_size, 3)
      views = jax.image.resize(views, shape, "linear")
    loss, aux = sds.sds_loss(
      prior.schedule,
      prior.denoiser(prior_params, s.batch_size),
      prior.encode(prior_params, views),
      k_sds,
      t_range=(s.t_min, s.t_max),
      weighting=s.weighting,
      prediction=prior.prediction,
      variance=prior.variance,
      reduction="mean",
    )
    metrics = {"sds": loss, "grad_norm_sds": jnp.mean(aux["grad_norm"])}
    total = loss
    if s.mode == "3d":
      terms = {
        "opacity": rendering.opacity_penalty(opacity),
        "entropy": rendering.entropy_penalty(opacity),
        "tv": scene.total_variation(params.density),
      }
      for name, value in terms.items():
        weight = getattr(s, f"{name}_weight")
        total = total + weight * value
        metrics[name] = value
      metrics["mean_opacity"] = jnp.mean(opacity)
    elif s.tv_weight:  # 2d: the image's own smoothness
      image = jnp.tanh(params["image"])
      metrics["tv"] = sum(jnp.mean(jnp.square(jnp.diff(image, axis=a))) for a in (0, 1))
      total = total + s.tv_weight * metrics["tv"]
    return total, metrics

  def step_fn(params, opt_state, step, seed_key, prior_params):
    key = jax.random.fold_in(seed_key, step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, key, prior_params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step_fn, donate_argnums=(0, 1))


def views_uint8(s: SdsSettings, params, size: int) -> np.ndarray:
  """The ring of views as uint8 [V, size, size, 3] (midpoint ray samples: no randomness)."""
  views, _ = jax.jit(lambda p: render(s, p, ring_cameras(s), size))(params)
  return data.denormalize_images(np.asarray(views))


def run_sds(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """--mode=sds: optimises (or resumes) until sds.num_steps and writes WORKDIR/sds/.

  Returns:
    {"npz", "png", "gif", "plot"}: the paths written.

  Raises:
    ConfigError: bad sds settings, or a prior that is missing or unconditional.
  """
  s = read_settings(config)
  prior = load_prior(config, s)
  size = render_size(s, prior)
  out = os.path.join(workdir, "sds")
  tx = optax.adam(s.learning_rate)
  params = init_params(s, rng.stream_key(config.seed, rng.INIT), (size, size, 3))
  state = {"step": 0, "params": params, "opt_state": tx.init(params)}
  store = checkpoints.CheckpointStore(os.path.join(out, "checkpoints"))
  try:
    abstract = flax.serialization.to_state_dict(jax.tree.map(np.asarray, state))
    restored = store.restore_latest(abstract)
    if restored is not None:
      state = flax.serialization.from_state_dict(state, restored[0])
      logging.info("sds: resumed at step %d", int(state["step"]))
    step_fn = make_step(s, prior, tx)
    seed_key = rng.stream_key(config.seed, rng.SDS)
    params, opt_state = state["params"], state["opt_state"]
    start = int(state["step"])
    os.makedirs(out, exist_ok=True)
    bar = tqdm.tqdm(
      total=s.num_steps, initial=start, desc=f"sds {s.prompt!r}", disable=not config.train.progress
    )
    with open(os.path.join(out, "metrics.jsonl"), "a") as log:
      for step in range(start, s.num_steps):
        params, opt_state, metrics = step_fn(
          params, opt_state, jnp.int32(step), seed_key, prior.params
        )
        bar.update()
        done = step + 1
        if done % s.log_every == 0 or done == s.num_steps:
          record = {k: float(v) for k, v in metrics.items()}
          if not all(np.isfinite(list(record.values()))):
            raise FloatingPointError(f"sds: a non-finite value at step {done}: {record}")
          record["loss"] = record["sds"]
          log.write(json.dumps({"step": done, **record}) + "\n")
          log.flush()
          bar.set_postfix(sds=f"{record['sds']:.3g}", refresh=False)
        if done % s.checkpoint_every == 0 or done == s.num_steps:
          saved = {"step": done, "params": params, "opt_state": opt_state}
          store.save(done, flax.serialization.to_state_dict(saved), {"prompt": s.prompt})
    bar.close()
  finally:
    store.close()
  return write_outputs(s, params, size, out)


def write_outputs(s: SdsSettings, params, size: int, out: str) -> dict[str, str]:
  """views.npz, views.png (a strip), views.gif and loss.png in `out`."""
  views = views_uint8(s, params, size)
  paths = {"npz": os.path.join(out, "views.npz")}
  np.savez(paths["npz"], views=views)
  paths["png"] = images.save_grid(os.path.join(out, "views.png"), views, columns=len(views))
  frames = [Image.fromarray(v) for v in images.upscale(views)]
  paths["gif"] = os.path.join(out, "views.gif")
  frames[0].save(paths["gif"], save_all=True, append_images=frames[1:], duration=120, loop=0)
  paths["plot"] = plots.write_metrics_plot(out, os.path.join(out, "loss.png"))
  return paths
