"""Drawing images from a trained model: compiled, batch-sharded calls of a sampler.

Image i of a request depends only on fold_in(key, i), so the images are the same for any
`batch_size` or device count (up to float tolerance) and a request can be split freely.
"""

import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diffusion_jax import data, models
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.runtime import images, parallel
from diffusion_jax.sampling import guidance, samplers


def make_sample_fn(
  model: nn.Module,
  schedule: Schedule,
  image_shape: tuple[int, int, int],
  batch_size: int,
  mesh: Mesh,
  *,
  to_uint8: bool = True,
  guidance_scale: float = 1.0,
  num_classes: int = 0,
  microbatch: int = 0,
  **sampler_options,
):
  """Compiles one sampling call: (params, key, first_index, condition) -> images.

  Args:
    model: the noise-prediction network.
    schedule: the schedule it was trained with.
    image_shape: (H, W, C).
    batch_size: images per call; a multiple of the device count.
    mesh: the device mesh; the batch is sharded over its "data" axis.
    to_uint8: return pixels; False returns the sampler's float32 x0 (for exact comparisons).
    guidance_scale: classifier-free guidance weight w for a conditional model (1: the plain
      conditional model, 0: the unconditional one); see `guidance.guided`.
    num_classes: the null label of a class-conditional model.
    microbatch: examples per network call on each device (`models.in_chunks`; the config's
      `model.microbatch`); 0 runs the whole batch at once.
    **sampler_options: sampler, num_steps and the sampler's options (prediction, clip_x0,
      variance, eta, skip, ...; see `samplers.sample`).

  Returns:
    A jitted function (params, key, first_index, condition) returning uint8 [batch_size, H, W,
    C] in [0, 255] (float32 in about [-1, 1] if not `to_uint8`), sharded over the batch.
    `condition` is {} for an unconditional model, else a dict of [batch_size, ...] arrays
    (labels or tokens).
  """
  parallel.check_batch_size(batch_size, mesh, field="sample.batch_size")

  def sample_fn(params, key, first_index, cond):
    apply_fn = lambda x_t, t, **c: model.apply({"params": params}, x_t, t, train=False, **c)
    apply_fn = models.in_chunks(apply_fn, microbatch, mesh.size)
    denoise_fn = guidance.guided(
      apply_fn,
      cond,
      guidance_scale,
      num_classes=num_classes,
      data_channels=image_shape[-1],
    )
    x0 = samplers.sample(
      denoise_fn,
      schedule,
      (batch_size, *image_shape),
      key,
      first_index=first_index,
      **sampler_options,
    )
    return data.denormalize_images(x0) if to_uint8 else x0

  return jax.jit(
    sample_fn,
    # The condition comes from the host, the same on every process: replicated (it is small).
    in_shardings=(parallel.replicated(mesh), None, None, parallel.replicated(mesh)),
    out_shardings=parallel.batch_sharded(mesh),
  )


def generate(
  sample_fn,
  params,
  key: jax.Array,
  num_samples: int,
  batch_size: int,
  condition: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
  """Runs `sample_fn` over ceil(num_samples / batch_size) batches.

  Args:
    condition: for a conditional model, arrays [num_samples, ...]: image i's condition.

  Returns:
    [num_samples, H, W, C] on the host, of `sample_fn`'s dtype (every process gets all of them).
  """
  outputs = []
  num_batches = -(-num_samples // batch_size)
  for b in range(num_batches):
    start = time.time()
    cond = {}
    if condition:
      # The last batch is filled up with copies of the last condition; its extra images are
      # dropped below.
      picks = np.minimum(np.arange(b * batch_size, (b + 1) * batch_size), num_samples - 1)
      cond = {name: np.asarray(value)[picks] for name, value in condition.items()}
    batch = sample_fn(params, key, np.int32(b * batch_size), cond)
    outputs.append(np.asarray(multihost_utils.process_allgather(batch, tiled=True)))
    logging.info("sampled batch %d/%d in %.1fs", b + 1, num_batches, time.time() - start)
  return np.concatenate(outputs)[:num_samples]


def write_samples(
  workdir: str, name: str, samples: np.ndarray, prompts: list[str] | None = None, **extra
) -> tuple[str, str]:
  """Writes samples/<name>.png (a grid) and samples/<name>.npz (uint8 samples) on process 0.

  Args:
    prompts: P prompts when the samples are P equal groups, one per prompt: the grid has a row
      per prompt, labelled with it, and the npz gets "prompts" (str [P]).
    **extra: more arrays for the npz.
  """
  png = f"{workdir}/samples/{name}.png"
  npz = f"{workdir}/samples/{name}.npz"
  if jax.process_index() == 0:
    if prompts is not None:
      images.save_labelled_grid(png, samples.reshape(len(prompts), -1, *samples.shape[1:]), prompts)
      extra["prompts"] = np.asarray(prompts)
    else:
      images.save_grid(png, samples)
    images.save_npz(npz, samples, **extra)
  return png, npz
