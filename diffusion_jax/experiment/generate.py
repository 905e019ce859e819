"""Drawing images from a trained model: compiled, batch-sharded calls of a sampler.

Image i of a request depends only on fold_in(key, i), so the images are the same for any
`batch_size` or device count (up to float tolerance) and a request can be split freely.

With `SampleProgress`, a compiled call reports every network call to the host (a callback
inside the sampler's scan): `generate` shows a progress bar and stops within a step when
`runtime.interrupts.stop_sampling_on_signals` records a signal.
"""

import dataclasses
import logging as std_logging
import math
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from diffusion_jax import data, models
from diffusion_jax.core import super_resolution
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.runtime import images, interrupts, parallel
from diffusion_jax.runtime.errors import SamplingStopped
from diffusion_jax.sampling import guidance, samplers


@dataclasses.dataclass(frozen=True)
class SampleProgress:
  """How a sampling function made by `make_sample_fn(progress=...)` reports its network calls.

  Attributes:
    show: draw `generate`'s bar (on process 0 only); False keeps only the stop check.
    leave: keep the finished bar on the terminal (False for bars under another one).
    file: the bar's stream; None is tqdm's default, stderr.
  """

  show: bool = True
  leave: bool = True
  file: Any = None


class _Stop(Exception):
  """Raised in the host callback to abort a compiled sampling call."""


class _DropStopTracebacks(std_logging.Filter):
  # jax logs every exception of a callback with its traceback; a requested stop is no error.
  def filter(self, record):
    return not (record.exc_info and isinstance(record.exc_info[1], _Stop))


_DROP_STOP_TRACEBACKS = _DropStopTracebacks()


class _Reporter:
  """The host side of one sampling function's callbacks: the bar and the stop check."""

  def __init__(self, options: SampleProgress, calls_per_batch: int):
    self.options, self.calls_per_batch = options, calls_per_batch
    self.bar = None  # the bar of the running `generate`
    self.stopped = None  # the signal that aborted the running call

  def tick(self):
    """Called once per network call on each process (from its first device)."""
    self.check()
    if self.bar is not None:
      self.bar.update()

  def check(self):
    """Called once per network call by each of the process's other devices."""
    name = interrupts.sampling_stop()
    if name:
      self.stopped = name
      raise _Stop(name)


def _reporting(denoise_fn, reporter: _Reporter, mesh: Mesh):
  """`denoise_fn` that first reports to `reporter` on the host, once per network call.

  Every device runs a callback (`reporter.check`, the first device of each process
  `reporter.tick`), so that a stop aborts each device's part of the call at once and the bar
  counts each call once. The callbacks take no operands (no transfers) and return nothing, so
  the samples stay bitwise the same.
  """
  processes = [d.process_index for d in mesh.devices.flat]
  first = np.array([p not in processes[:i] for i, p in enumerate(processes)])

  def report(is_first):
    jax.lax.cond(
      is_first[0],
      lambda: jax.debug.callback(reporter.tick),
      lambda: jax.debug.callback(reporter.check),
    )
    return ()

  # One shard of `first` per device. (Its operand also keeps XLA's partitioner from treating the
  # callbacks as replicated, which it rejects for side effects.)
  report_each = jax.shard_map(
    report, mesh=mesh, in_specs=PartitionSpec(mesh.axis_names), out_specs=()
  )

  def fn(x_t, t):
    report_each(first)
    return denoise_fn(x_t, t)

  return fn


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
  aug_level: float = 0.0,
  progress: SampleProgress | None = None,
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
    aug_level: a super-resolution model's noise-augmentation level s in [0, 1] (sr.aug_level):
      image i's condition["low_res"] is noised to it (or to condition["aug_level"][i] where the
      condition has levels) with noise from fold_in(key, first_index + i)
      (`super_resolution.augment`); 0 leaves it as it is.
    progress: report every network call to the host, for `generate`'s progress bar and its stop
      on a signal; None compiles the plain sampler.
    **sampler_options: sampler, num_steps and the sampler's options (prediction, clip_x0,
      variance, eta, skip, ...; see `samplers.sample`).

  Returns:
    A jitted function (params, key, first_index, condition) returning uint8 [batch_size, H, W,
    C] in [0, 255] (float32 in about [-1, 1] if not `to_uint8`), sharded over the batch.
    `condition` is {} for an unconditional model, else a dict of [batch_size, ...] arrays
    (labels or tokens; a super-resolution model's clean "low_res" [batch_size, h, w, C] float32
    in [-1, 1] and optionally "aug_level" [batch_size], kept in both halves of guidance). With
    `progress`, its attribute `progress` is the host side `generate` uses.
  """
  parallel.check_batch_size(batch_size, mesh, field="sample.batch_size")
  reporter = None
  if progress is not None:
    sampler = sampler_options.get("sampler", "ddpm")
    num_steps = sampler_options.get("num_steps") or samplers.DEFAULT_NUM_STEPS.get(
      sampler, schedule.num_timesteps
    )
    reporter = _Reporter(progress, samplers.num_function_evaluations(sampler, num_steps))
    if _DROP_STOP_TRACEBACKS not in std_logging.getLogger("jax._src.debugging").filters:
      std_logging.getLogger("jax._src.debugging").addFilter(_DROP_STOP_TRACEBACKS)

  def sample_fn(params, key, first_index, cond):
    apply_fn = lambda x_t, t, **c: model.apply({"params": params}, x_t, t, train=False, **c)
    apply_fn = models.in_chunks(apply_fn, microbatch, mesh.size)
    if "low_res" in cond:
      keys = samplers.per_sample_keys(key, batch_size, first_index)
      level = cond.get("aug_level", aug_level)  # per image, if the caller gives levels
      cond = {**cond, **super_resolution.augment(cond["low_res"], keys, level=level)}
    denoise_fn = guidance.guided(
      apply_fn,
      cond,
      guidance_scale,
      num_classes=num_classes,
      data_channels=image_shape[-1],
    )
    if reporter is not None:
      denoise_fn = _reporting(denoise_fn, reporter, mesh)
    x0 = samplers.sample(
      denoise_fn,
      schedule,
      (batch_size, *image_shape),
      key,
      first_index=first_index,
      **sampler_options,
    )
    return data.denormalize_images(x0) if to_uint8 else x0

  jitted = jax.jit(
    sample_fn,
    # The condition comes from the host, the same on every process: replicated (it is small).
    in_shardings=(parallel.replicated(mesh), None, None, parallel.replicated(mesh)),
    out_shardings=parallel.batch_sharded(mesh),
  )
  if reporter is not None:
    jitted.progress = reporter
  return jitted


def generate(
  sample_fn,
  params,
  key: jax.Array,
  num_samples: int,
  batch_size: int,
  condition: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
  """Runs `sample_fn` over ceil(num_samples / batch_size) batches.

  A `sample_fn` made with `progress` shows a bar over all batches' network calls and is aborted
  within a network call of a stop request (`interrupts.stop_sampling_on_signals`); without it,
  a request stops at the next batch.

  Args:
    condition: for a conditional model, arrays [num_samples, ...]: image i's condition.

  Returns:
    [num_samples, H, W, C] on the host, of `sample_fn`'s dtype (every process gets all of them).

  Raises:
    SamplingStopped: a stop was requested.
  """
  outputs = []
  num_batches = -(-num_samples // batch_size)
  reporter = getattr(sample_fn, "progress", None)
  if reporter is not None:
    options = reporter.options
    reporter.stopped = None
    reporter.bar = tqdm.tqdm(
      total=num_batches * reporter.calls_per_batch,
      desc=f"sampling {num_samples} images",
      unit="step",
      leave=options.leave,
      file=options.file,
      disable=not options.show or jax.process_index() != 0,
    )
  try:
    for b in range(num_batches):
      stop = interrupts.sampling_stop()
      if stop:
        raise SamplingStopped(stop)
      if reporter is not None and num_batches > 1:
        reporter.bar.set_postfix_str(f"batch {b + 1}/{num_batches}", refresh=False)
      start = time.time()
      cond = {}
      if condition:
        # The last batch is filled up with copies of the last condition; its extra images are
        # dropped below.
        picks = np.minimum(np.arange(b * batch_size, (b + 1) * batch_size), num_samples - 1)
        cond = {name: np.asarray(value)[picks] for name, value in condition.items()}
      try:
        batch = sample_fn(params, key, np.int32(b * batch_size), cond)
        outputs.append(np.asarray(multihost_utils.process_allgather(batch, tiled=True)))
      except jax.errors.JaxRuntimeError:
        if reporter is None or reporter.stopped is None:
          raise
        _forget_aborted_call()
        raise SamplingStopped(reporter.stopped) from None
      logging.info("sampled batch %d/%d in %.1fs", b + 1, num_batches, time.time() - start)
  finally:
    if reporter is not None:
      reporter.bar.close()
      reporter.bar = None
  return np.concatenate(outputs)[:num_samples]


def _forget_aborted_call() -> None:
  """Drops jax's record of the aborted call, which it would otherwise wait for at exit and report
  the abort of as an error (jax 0.10's `dispatch.runtime_tokens`)."""
  try:
    from jax._src import dispatch

    dispatch.runtime_tokens.clear()
  except (ImportError, AttributeError):
    pass


def write_samples(
  workdir: str,
  name: str,
  samples: np.ndarray,
  prompts: list[str] | None = None,
  low_res: np.ndarray | None = None,
  **extra,
) -> tuple[str, str]:
  """Writes samples/<name>.png (a grid) and samples/<name>.npz (uint8 samples) on process 0.

  Args:
    prompts: P prompts when the samples are P equal groups, one per prompt: the grid has a row
      per prompt, labelled with it, and the npz gets "prompts" (str [P]).
    low_res: a super-resolution model's inputs, [N, h, w, C] float32 in [-1, 1]: the grid shows
      each one (enlarged, nearest) left of its sample, and the npz gets "low_res" (uint8).
    **extra: more arrays for the npz.
  """
  png = f"{workdir}/samples/{name}.png"
  npz = f"{workdir}/samples/{name}.npz"
  if jax.process_index() == 0:
    grid, columns = samples, None
    if low_res is not None:
      extra["low_res"] = data.denormalize_images(np.asarray(low_res))
      f = samples.shape[1] // low_res.shape[1]
      inputs = np.repeat(np.repeat(extra["low_res"], f, axis=1), f, axis=2)
      grid = np.stack([inputs, samples], axis=1).reshape(-1, *samples.shape[1:])
      columns = 2 * math.ceil(math.sqrt(len(samples)))
    if prompts is not None:
      images.save_labelled_grid(png, grid.reshape(len(prompts), -1, *grid.shape[1:]), prompts)
      extra["prompts"] = np.asarray(prompts)
    else:
      images.save_grid(png, grid, columns)
    images.save_npz(npz, samples, **extra)
  return png, npz
