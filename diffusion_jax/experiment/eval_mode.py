"""--mode=eval: the variational bound on the negative log-likelihood, in bits per dimension.

The bound of `likelihood.bits_per_dim` (every one of the T terms plus the prior) with the EMA
parameters of the latest checkpoint, over the first `eval.num_examples` images of the split
`eval.split` of the data set. The noise of image i depends only on (eval.seed, i): the figure is
the same for any batch size or device count, up to float rounding. A conditional model is
evaluated unconditionally (its null label or empty prompt).

A latent run's figure is a bound on its latents, not on pixels: x0 = scale * z with z drawn from
image i's posterior with its own key, and the decoder term a Gaussian density (latents are not
8-bit data), so the figure depends on the latent scale and compares only with other latent models
of the same autoencoder. The autoencoder's reconstruction figures go with it (`cli`).
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

from diffusion_jax import data, models
from diffusion_jax.core import likelihood, rng, super_resolution
from diffusion_jax.experiment import latent, settings
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime import checkpoints, parallel
from diffusion_jax.runtime.errors import ConfigError

FIGURES = ("bits_per_dim", "prior", "decoder", "kl")


def _eval_source(config: ml_collections.ConfigDict):
  data_config = settings.from_section(data.DataConfig, config.data, "data")
  return data.make_source(dataclasses.replace(data_config, split=config.eval.split))


def make_eval_fn(run: run_lib.Run, batch_size: int):
  """Compiles (ema params, x0 float32 [batch_size, H, W, C] (images in [-1, 1], or a latent
  run's scaled latents), key data [batch_size, 2] uint32 of per-image threefry keys) -> the
  figures of `likelihood.bits_per_dim`, each [batch_size]."""
  config = run.config
  parallel.check_batch_size(batch_size, run.mesh, field="eval.batch_size")

  # A conditional model is evaluated as the unconditional model it also is (the null condition).
  null = run.prompt_condition([""]) if run.cond_kind != "none" else {}

  def eval_fn(params, x0, key_data):
    keys = jax.random.wrap_key_data(key_data)
    image = {}
    if run.low_res_size:
      # A super-resolution model's bound is conditional on the image's clean low-resolution one.
      low_res = super_resolution.downsample(x0, x0.shape[1] // run.low_res_size)
      image = {"low_res": low_res, "aug_level": jnp.zeros(x0.shape[:1], jnp.float32)}

    def apply_fn(x_t, t, **image):
      cond = {k: jnp.broadcast_to(v, (x_t.shape[0], *v.shape[1:])) for k, v in null.items()}
      return run.model.apply({"params": params}, x_t, t, train=False, **cond, **image)

    chunked = models.in_chunks(apply_fn, config.model.microbatch, run.mesh.size)

    def denoise_fn(x_t, t):
      # Several timesteps per call stack copies of the batch (`likelihood.bits_per_dim`).
      copies = x_t.shape[0] // x0.shape[0]
      return chunked(x_t, t, **{k: jnp.concatenate([v] * copies) for k, v in image.items()})

    out = likelihood.bits_per_dim(
      run.schedule,
      denoise_fn,
      x0,
      keys,
      variance=config.diffusion.variance,
      prediction=config.diffusion.prediction,
      clip_x0=config.eval.clip_x0 and run.latent is None,
      decoder="discretized" if run.latent is None else "continuous",
      timesteps_per_call=config.eval.timesteps_per_call,
    )
    return {name: out[name] for name in FIGURES}

  batch = parallel.batch_sharded(run.mesh)
  return jax.jit(
    eval_fn, in_shardings=(parallel.replicated(run.mesh), batch, batch), out_shardings=batch
  )


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, str]:
  """Bits/dim of the latest checkpoint in `workdir`; writes WORKDIR/eval/bits_per_dim_<step>.json.

  Returns:
    (result, path): result has the mean of each figure of FIGURES over the images, the standard
    error of the bits/dim mean ("bits_per_dim_stderr"), "step", "split" and "num_examples".
  """
  run = run_lib.make_run(config)
  eval_config = config.eval
  batch_size = eval_config.batch_size
  try:
    parallel.check_batch_size(batch_size, run.mesh, field="eval.batch_size")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  num_timesteps = run.schedule.num_timesteps
  if eval_config.timesteps_per_call < 1 or num_timesteps % eval_config.timesteps_per_call:
    raise ConfigError(
      f"eval.timesteps_per_call={eval_config.timesteps_per_call} must divide "
      f"diffusion.num_timesteps={num_timesteps}"
    )
  source = _eval_source(config)
  count = len(source) if eval_config.num_examples <= 0 else eval_config.num_examples
  count = min(count, len(source))
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise ConfigError(f"--workdir={workdir} has no checkpoint; train first (--mode=train)")
  store = checkpoints.CheckpointStore(directory)
  state = run_lib.restore_or_init(run, store)
  store.close()
  step = int(state.step)

  eval_fn = make_eval_fn(run, batch_size)
  key = rng.stream_key(eval_config.seed, rng.EVAL)
  latent_key = jax.random.fold_in(rng.stream_key(eval_config.seed, latent.LATENT), latent.EVAL)
  process, processes = jax.process_index(), jax.process_count()
  rows = batch_size // processes
  values = {name: [] for name in FIGURES}
  start = time.time()
  num_batches = -(-count // batch_size)
  for b in tqdm.trange(num_batches, unit="batch", disable=process != 0, desc="bits/dim"):
    # The last batch is filled up with repeats of its first image, dropped afterwards.
    indices = np.arange(b * batch_size, (b + 1) * batch_size)
    indices = np.where(indices < count, indices, b * batch_size)
    local = indices[process * rows : (process + 1) * rows]
    images = np.stack([source[int(i)]["image"] for i in local])
    keys = rng.example_keys(key, jnp.asarray(local, jnp.uint32))
    batch = parallel.put_batch(
      {"image": images, "keys": np.asarray(jax.random.key_data(keys))}, run.mesh
    )
    if run.latent is None:
      x0 = data.normalize_images(batch["image"])
    else:  # image i's latent drawn with fold_in(latent_key, i)
      x0 = run.latent.encode(batch["image"], latent_key, b * batch_size)
    out = eval_fn(state.ema_params, x0, batch["keys"])
    out = multihost_utils.process_allgather(out, tiled=True)
    keep = min(batch_size, count - b * batch_size)
    for name in FIGURES:
      values[name].append(np.asarray(out[name])[:keep])
  per_image = {name: np.concatenate(v).astype(np.float64) for name, v in values.items()}
  result = {name: float(per_image[name].mean()) for name in FIGURES}
  bpd = per_image["bits_per_dim"]
  result["bits_per_dim_stderr"] = float(bpd.std(ddof=1) / math.sqrt(len(bpd))) if count > 1 else 0.0
  result.update(step=step, split=eval_config.split, num_examples=count)
  if run.latent is not None:
    result.update(space="latent", latent_shape=list(run.image_shape))
    result["scale_factor"] = run.latent.scale_factor
  logging.info("bits/dim of %d images in %.1fs", count, time.time() - start)
  path = os.path.join(workdir, "eval", f"bits_per_dim_{step:07d}.json")
  if process == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
  return result, path
