"""The autoencoder of latent diffusion as a run of its own (model.name="autoencoder").

Its loss is LDM's without the optional discriminator: per image, the reconstruction error summed
over pixels (L1 or L2) plus kl_weight times the KL of the posterior to N(0, I), averaged over the
batch. The latent decoded in training is drawn from the posterior with the example's own key;
grids and evaluation decode the posterior's mean. Training, checkpoints, resuming and metrics are
the diffusion models' (`train.py`); this module holds what differs.
"""

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import data
from diffusion_jax.core import rng
from diffusion_jax.evaluation import reconstruction
from diffusion_jax.experiment import adversarial, perceptual, settings
from diffusion_jax.experiment.train_step import TrainState, apply_gradients
from diffusion_jax.models.autoencoder import Autoencoder, AutoencoderConfig
from diffusion_jax.runtime import checkpoints, images, parallel
from diffusion_jax.runtime.errors import ConfigError

RECONSTRUCTION_LOSSES = ("l1", "l2")
# The config's `autoencoder` fields that describe the network (the rest describe its loss).
ARCHITECTURE_FIELDS = (
  "channels",
  "channel_mult",
  "num_res_blocks",
  "z_channels",
  "attn_resolutions",
  "num_groups",
)
FIGURES = ("psnr", "ssim", "kl")


def autoencoder_config(section, model=None) -> AutoencoderConfig:
  """The network of the config's `autoencoder` section, computed as the `model` section says
  (dtype, conv, subpixel_upsample; None: float32 and XLA's convolutions).

  Raises:
    ConfigError: an invalid field, named in the one-line message.
  """
  try:
    speed = {}
    if model is not None:
      conv = "xla" if model.conv == "auto" else model.conv
      speed = dict(dtype=model.dtype, conv=conv, subpixel_upsample=model.subpixel_upsample)
    return AutoencoderConfig(**{name: section[name] for name in ARCHITECTURE_FIELDS}, **speed)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e).replace("AutoencoderConfig.", "autoencoder.")) from None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Validates the `autoencoder` section against the image size, before anything compiles."""
  section = config.autoencoder
  if section.reconstruction not in RECONSTRUCTION_LOSSES:
    raise ConfigError(
      f"autoencoder.reconstruction={section.reconstruction!r} is not one of {RECONSTRUCTION_LOSSES}"
    )
  if section.kl_weight < 0:
    raise ConfigError(f"autoencoder.kl_weight={section.kl_weight} must be >= 0")
  adversarial.check(section, int(config.data.image_size))
  perceptual.check(section)
  if perceptual.enabled(section) and (
    settings.study_seeds(config) or config.train.steps_per_call > 1
  ):
    raise ConfigError(
      "autoencoder.lpips_weights trains one seed, one step per call: set --config.seeds='' and "
      "--config.train.steps_per_call=1"
    )
  try:
    autoencoder_config(section).latent_shape(int(config.data.image_size))
  except ValueError as e:
    raise ConfigError(f"data.image_size: {e}") from None


def init_params(model: Autoencoder, image_shape, key: jax.Array):
  return model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]


def loss_per_example(model, params, x: jax.Array, keys: jax.Array, section, perceptual=None):
  """(the loss [B], terms): LDM's reconstruction + kl_weight * KL of each image.

  Args:
    x: [B, H, W, C] images in [-1, 1].
    keys: [B] keys; image j's latent is drawn from the posterior with keys[j].
    section: the `autoencoder` settings (reconstruction, kl_weight, perceptual_weight).
    perceptual: (x, x̂) -> LPIPS [B], or None; each pixel's error gains perceptual_weight times
      its image's LPIPS (LDM's weighting).

  Returns:
    loss [B]; terms: "rec" [B] (the mean absolute or squared error per pixel), "kl" [B], with
    `perceptual` "lpips" [B]; and the reconstructions [B, H, W, C].
  """
  posterior = model.apply({"params": params}, x, method=Autoencoder.encode)
  noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:]))(keys)
  z = posterior.mean + posterior.std * noise
  out = model.apply({"params": params}, z, method=Autoencoder.decode)
  diff = out - x
  error = jnp.abs(diff) if section.reconstruction == "l1" else jnp.square(diff)
  axes = tuple(range(1, x.ndim))
  kl = posterior.kl()
  terms = {"rec": jnp.mean(error, axes), "kl": kl}
  rec = jnp.sum(error, axes)
  if perceptual is not None:
    terms["lpips"] = perceptual(x, out)
    rec = rec + section.perceptual_weight * terms["lpips"] * math.prod(x.shape[1:])
  return rec + section.kl_weight * kl, terms, out


def make_step(run):
  """The pure train step (state, batch, train_key[, frozen]) -> (state, metrics) of an
  autoencoder run, and the frozen inputs it takes as a fourth argument (the LPIPS network's
  parameters; None without autoencoder.lpips_weights, and then the step takes three)."""
  section = run.config.autoencoder
  lpips = perceptual.load(section)
  adversary = adversarial.Adversary(section, run.train) if adversarial.enabled(section) else None

  def step(state: TrainState, batch, train_key, frozen=None):
    x = data.normalize_images(batch["image"])
    keys = rng.example_keys(jax.random.fold_in(train_key, state.step), jnp.arange(x.shape[0]))
    distance = None if lpips is None else (lambda a, b: lpips.model.apply(frozen, a, b))

    def loss_fn(params):
      loss, terms, out = loss_per_example(run.model, params, x, keys, section, distance)
      losses = (jnp.mean(loss),)
      if adversary is not None:
        losses += (adversary.generator_loss(state.discriminator["params"], out),)
      return losses, (terms, out)

    # One forward pass; one backward pass per loss (the adaptive weight needs both gradients).
    losses, vjp, (terms, out) = jax.vjp(loss_fn, state.params, has_aux=True)
    loss = losses[0]
    one, zero = jnp.ones_like(loss), jnp.zeros_like(loss)
    (grads,) = vjp((one,) + (zero,) * (len(losses) - 1))
    extra = {}
    if adversary is not None:
      (g_grads,) = vjp((zero, one))
      weight = adversary.adaptive_weight(grads, g_grads, state.step)
      grads = jax.tree.map(lambda a, b: a + weight * b, grads, g_grads)
      loss = loss + weight * losses[1]
      extra = {"g_loss": losses[1], "d_weight": weight}
    new_state, metrics = apply_gradients(state, grads, run.tx, run.train, param_norm=False)
    if adversary is not None:
      disc, d_metrics = adversary.update(state.discriminator, x, out, state.step)
      new_state = new_state.replace(discriminator=disc)
      extra.update(d_metrics)
    terms = {name: jnp.mean(value) for name, value in terms.items()}
    return new_state, {"loss": loss, **metrics, **terms, **extra}

  return step, (None if lpips is None else lpips.variables)


def make_reconstruct_fn(run):
  """Compiles (params, images uint8 [B, H, W, C]) -> (reconstructions uint8, KL [B]): the
  posterior's mean decoded. B must split over the mesh's devices."""

  def fn(params, batch):
    x = data.normalize_images(batch)
    posterior = run.model.apply({"params": params}, x, method=Autoencoder.encode)
    out = run.model.apply({"params": params}, posterior.mode(), method=Autoencoder.decode)
    return data.denormalize_images(out), posterior.kl()

  sharded = parallel.batch_sharded(run.mesh)
  return jax.jit(fn, in_shardings=(parallel.replicated(run.mesh), sharded))


def held_out_source(config: ml_collections.ConfigDict):
  """The images grids and evaluation reconstruct: the split `eval.split` of the data set."""
  data_config = settings.from_section(data.DataConfig, config.data, "data")
  return data.make_source(dataclasses.replace(data_config, split=config.eval.split))


class ReconstructionGrids:
  """Training-time grids: held-out images (odd rows) above their reconstructions (even rows)."""

  COLUMNS = 8

  def __init__(self, run, count: int):
    source = held_out_source(run.config)
    # Half the grid's images are originals: whole rows of them, at least one, at most the split.
    count = min(max(self.COLUMNS, count // 2 // self.COLUMNS * self.COLUMNS), len(source))
    self.originals = np.stack([source[i]["image"] for i in range(count)])
    self.run = run
    self.fn = None

  def write(self, workdir: str, name: str, params) -> str:
    """Writes samples/<name>.png and .npz (keys originals, reconstructions); returns the png."""
    self.fn = self.fn or make_reconstruct_fn(self.run)
    out, _ = reconstruct(self.run, self.fn, params, self.originals)
    columns = min(self.COLUMNS, len(out))
    rows = []
    for start in range(0, len(out), columns):
      rows += [self.originals[start : start + columns], out[start : start + columns]]
    png = os.path.join(workdir, "samples", f"{name}.png")
    if jax.process_index() == 0:
      images.save_grid(png, np.concatenate(rows), columns=columns)
      npz = os.path.join(workdir, "samples", f"{name}.npz")
      images.save_npz(npz, out, originals=self.originals, reconstructions=out)
    return png


def reconstruct(run, fn, params, originals: np.ndarray, batch_size: int | None = None):
  """Reconstructions uint8 and KL of `originals`, in batches padded to split over the mesh."""
  devices, process, processes = run.mesh.size, jax.process_index(), jax.process_count()
  batch_size = batch_size or -(-len(originals) // devices) * devices
  rows = batch_size // processes
  outs, kls = [], []
  for start in range(0, len(originals), batch_size):
    chunk = originals[start : start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)])
    local = padded[process * rows : (process + 1) * rows]
    out, kl = fn(params, parallel.put_batch({"image": local}, run.mesh)["image"])
    out, kl = multihost_utils.process_allgather((out, kl), tiled=True)
    outs.append(np.asarray(out)[: len(chunk)])
    kls.append(np.asarray(kl)[: len(chunk)])
  return np.concatenate(outs), np.concatenate(kls)


def evaluate(config: ml_collections.ConfigDict, workdir: str, run, state: TrainState):
  """PSNR, SSIM and KL of the reconstructions of `eval.num_examples` held-out images.

  Writes WORKDIR/eval/reconstruction_<step>.json.

  Returns:
    (result, path): the mean of each of FIGURES, "step", "split", "num_examples".
  """
  source = held_out_source(config)
  count = len(source) if config.eval.num_examples <= 0 else config.eval.num_examples
  count = min(count, len(source))
  batch_size = config.eval.batch_size
  try:
    parallel.check_batch_size(batch_size, run.mesh, field="eval.batch_size")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  fn = make_reconstruct_fn(run)
  metrics = jax.jit(lambda a, b: (reconstruction.psnr(a, b), reconstruction.ssim(a, b)))
  values = {name: [] for name in FIGURES}
  start = time.time()
  steps = range(0, count, batch_size)
  for first in tqdm.tqdm(steps, unit="batch", disable=jax.process_index() != 0, desc="eval"):
    originals = np.stack([source[i]["image"] for i in range(first, min(first + batch_size, count))])
    out, kl = reconstruct(run, fn, state.ema_params, originals, batch_size)
    psnr, ssim = metrics(out, originals)
    values["psnr"].append(np.asarray(psnr))
    values["ssim"].append(np.asarray(ssim))
    values["kl"].append(kl)
  per_image = {name: np.concatenate(v).astype(np.float64) for name, v in values.items()}
  result = {name: float(per_image[name].mean()) for name in FIGURES}
  step = int(state.step)
  result.update(step=step, split=config.eval.split, num_examples=count)
  logging.info("reconstructed %d images in %.1fs", count, time.time() - start)
  path = os.path.join(workdir, "eval", f"reconstruction_{step:07d}.json")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
  return result, path


def restore(run, workdir: str) -> TrainState:
  """The latest checkpoint's state of the autoencoder run in `workdir`.

  Raises:
    ConfigError: no checkpoint.
  """
  from diffusion_jax.experiment import run as run_lib

  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise ConfigError(f"--workdir={workdir} has no checkpoint; train first (--mode=train)")
  store = checkpoints.CheckpointStore(directory)
  try:
    return run_lib.restore_or_init(run, store)
  finally:
    store.close()
