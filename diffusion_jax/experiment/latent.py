"""Latent diffusion's second stage: a diffusion model on the latents of a trained autoencoder.

A run is in latent space when its `latent` section names an autoencoder: a trained run
(`latent.autoencoder_workdir`), or a config that the same command first trains into
WORKDIR/autoencoder (`latent.autoencoder_config`, resumable like any run). The diffusion model
then sees x0 = scale_factor * z, z drawn from the posterior of the training image with the
example's own key (stream LATENT, step, global index); samples are decoded back to pixels.
`latent.scale_factor` 0 is estimated once from the data, as LDM: 1 / the standard deviation of
the latents of the first `latent.scale_examples` training images, and written into the run's
config.json.
"""

import copy
import dataclasses
import os
import runpy
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import data
from diffusion_jax.core import rng
from diffusion_jax.experiment import saved_config, settings
from diffusion_jax.models.autoencoder import Autoencoder
from diffusion_jax.runtime import checkpoints, parallel
from diffusion_jax.runtime.errors import ConfigError

# The random stream of the latents drawn from the posteriors (rng's streams end at EVAL = 3),
# and its indices reserved for the estimate of the scale factor and evaluation (steps never
# reach them).
LATENT = 4
_SCALE_ESTIMATE = 2**31 - 1
EVAL = 2**31 - 2  # the index of --mode=eval's draws


def autoencoder_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the run's autoencoder is: latent.autoencoder_workdir, or WORKDIR/autoencoder."""
  return config.latent.autoencoder_workdir or os.path.join(workdir, "autoencoder")


def load_config_file(name: str) -> ml_collections.ConfigDict:
  """The config `name` (a file in configs/, or a path to a .py file with get_config()).

  Raises:
    ConfigError: no such file.
  """
  import configs

  path = (
    name if name.endswith(".py") else os.path.join(os.path.dirname(configs.__file__), f"{name}.py")
  )
  if not os.path.isfile(path):
    raise ConfigError(f"latent.autoencoder_config={name!r}: no such config ({path})")
  return runpy.run_path(path)["get_config"]()


def adopt_autoencoder(config: ml_collections.ConfigDict, ae_config: ml_collections.ConfigDict):
  """A copy of `config` whose `autoencoder` section is the autoencoder run's (so the run's own
  config.json describes its whole network) and whose model reads its latent channels."""
  config = copy.deepcopy(config)
  if ae_config.model.name != settings.AUTOENCODER:
    raise ConfigError(
      f"latent.autoencoder_workdir holds a run of model.name={ae_config.model.name!r}, not an "
      f"autoencoder"
    )
  for name, value in ae_config.autoencoder.items():
    config.autoencoder[name] = value
  return config


@dataclasses.dataclass
class LatentSpace:
  """The frozen autoencoder of a latent run and what maps between pixels and latents."""

  model: Autoencoder
  params: Any  # the autoencoder's EMA parameters, replicated over the mesh
  scale_factor: float
  mesh: Any

  def __post_init__(self):
    batch = parallel.batch_sharded(self.mesh)
    replicated = parallel.replicated(self.mesh)
    self._encode = jax.jit(self._encode_fn, in_shardings=(replicated, batch, batch))
    self._moments = jax.jit(self._moments_fn, in_shardings=(replicated, batch))
    self._draw = jax.jit(self._draw_fn, in_shardings=(batch, batch, batch))
    self._decode = jax.jit(self._decode_fn, in_shardings=(replicated, batch), out_shardings=batch)

  def _moments_fn(self, params, images):
    posterior = self.model.apply(
      {"params": params}, data.normalize_images(images), method=Autoencoder.encode
    )
    return posterior.mean, posterior.std

  def _draw_fn(self, mean, std, key_data):
    keys = jax.random.wrap_key_data(key_data)
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
    return self.scale_factor * (mean + std * noise)

  def _encode_fn(self, params, images, key_data):
    return self._draw_fn(*self._moments_fn(params, images), key_data)

  def _decode_fn(self, params, latents):
    out = self.model.apply(
      {"params": params}, latents / self.scale_factor, method=Autoencoder.decode
    )
    return data.denormalize_images(out)

  def _key_data(self, key: jax.Array, first_index: int, count: int) -> jax.Array:
    keys = rng.example_keys(key, first_index + jnp.arange(count))
    return jax.device_put(jax.random.key_data(keys), parallel.batch_sharded(self.mesh))

  def encode(self, images: jax.Array, key: jax.Array, first_index: int = 0) -> jax.Array:
    """Scaled latents [B, h, w, z] of uint8 images [B, H, W, 3] (sharded over the batch); image
    j's latent is drawn with fold_in(key, first_index + j)."""
    key_data = self._key_data(key, first_index, images.shape[0])
    return self._encode(self.params, images, key_data)

  def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The posterior (mean, std), each [B, h, w, z] and unscaled, of uint8 images [B, H, W, 3]."""
    return self._moments(self.params, images)

  def draw(self, mean: jax.Array, std: jax.Array, key: jax.Array) -> jax.Array:
    """What `encode` returns for the images of these posterior moments: latent j drawn with
    fold_in(key, j)."""
    return self._draw(mean, std, self._key_data(key, 0, mean.shape[0]))

  def decode(self, latents: jax.Array) -> jax.Array:
    """uint8 images [B, H, W, 3] of scaled latents [B, h, w, z]."""
    return self._decode(self.params, latents)

  def decoding(self, sample_fn):
    """`sample_fn` (params, key, first_index, cond) -> latents, followed by the decoder."""

    def decoded(params, key, first_index, cond):
      return self.decode(sample_fn(params, key, first_index, cond))

    if hasattr(sample_fn, "progress"):
      decoded.progress = sample_fn.progress
    return decoded


def load_autoencoder(workdir: str, mesh) -> tuple[Autoencoder, Any, ml_collections.ConfigDict]:
  """(network, EMA parameters, config) of the trained autoencoder run in `workdir`.

  Raises:
    ConfigError: no such run, not an autoencoder, or no checkpoint.
  """
  from diffusion_jax.experiment import run as run_lib

  config = saved_config.load(workdir)
  if config is None:
    raise ConfigError(
      f"latent.autoencoder_workdir={workdir!r} has no config.json: train the autoencoder first "
      f"(e.g. --config=shapes_autoencoder --workdir={workdir})"
    )
  if config.model.name != settings.AUTOENCODER:
    raise ConfigError(f"latent.autoencoder_workdir={workdir!r} is not an autoencoder run")
  ae_run = run_lib.make_run(config)
  directory = os.path.join(workdir, "checkpoints")
  store = checkpoints.CheckpointStore(directory)
  try:
    if store.latest_step() is None:
      raise ConfigError(f"latent.autoencoder_workdir={workdir!r} has no checkpoint; train it first")
    state = run_lib.restore_or_init(ae_run, store)
  finally:
    store.close()
  params = jax.device_put(state.ema_params, parallel.replicated(mesh))
  return ae_run.model, params, config


def latent_space(config: ml_collections.ConfigDict, mesh) -> tuple[Any, LatentSpace]:
  """(the config with the autoencoder run's `autoencoder` section and, when it was 0, the
  estimated latent.scale_factor; the run's `LatentSpace`).

  Raises:
    ConfigError: no trained autoencoder at latent.autoencoder_workdir.
  """
  workdir = config.latent.autoencoder_workdir
  if settings.study_seeds(config) or config.train.steps_per_call > 1:
    raise ConfigError(
      "a latent run trains one seed, one step per call: set --config.seeds='' and "
      "--config.train.steps_per_call=1"
    )
  if not workdir:
    raise ConfigError(
      "latent.autoencoder_config is trained by --mode=train, which sets "
      "latent.autoencoder_workdir; train first"
    )
  model, params, ae_config = load_autoencoder(workdir, mesh)
  config = adopt_autoencoder(config, ae_config)
  scale = float(config.latent.scale_factor)
  if scale < 0:
    raise ConfigError(f"latent.scale_factor={scale} must be positive, or 0 to estimate it")
  space = LatentSpace(model, params, scale or 1.0, mesh)
  if not scale:
    config.latent.scale_factor = estimate_scale_factor(space, config, config.seed)
    space = dataclasses.replace(space, scale_factor=config.latent.scale_factor)
  return config, space


def estimate_scale_factor(space: LatentSpace, config, seed: int) -> float:
  """1 / the standard deviation of the latents of the first `latent.scale_examples` training
  images (unflipped), each drawn from its posterior with its own key, as LDM."""
  source = data.make_source(settings.from_section(data.DataConfig, config.data, "data"))
  count = min(int(config.latent.scale_examples), len(source))
  unit = dataclasses.replace(space, scale_factor=1.0)
  devices = space.mesh.size
  batch = max(devices, 64 // devices * devices)
  key = jax.random.fold_in(rng.stream_key(seed, LATENT), _SCALE_ESTIMATE)
  rows = batch // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  total, total_sq, n = 0.0, 0.0, 0
  for first in range(0, count, batch):
    indices = np.minimum(np.arange(first, first + batch), count - 1)[mine]
    images = np.stack([source[int(i)]["image"] for i in indices])
    images = parallel.put_batch({"image": images}, space.mesh)["image"]
    z = multihost_utils.process_allgather(unit.encode(images, key, first), tiled=True)
    z = np.asarray(z, np.float64)[: count - first]
    total, total_sq, n = total + z.sum(), total_sq + np.square(z).sum(), n + z.size
  std = float(np.sqrt(total_sq / n - (total / n) ** 2))
  logging.info("latent scale factor 1 / %.5f from %d images", std, count)
  return 1.0 / std
