"""--mode=sample: images from the EMA parameters of a run's latest checkpoint, and sampling seed
studies (several disjoint sample sets of one model, or one set per seed of a training study)."""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import data, text
from diffusion_jax.core import rng
from diffusion_jax.experiment import generate, settings, studies
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime import checkpoints, images
from diffusion_jax.runtime.errors import ConfigError


def sample_from_checkpoint(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[str, str, np.ndarray]:
  """--mode=sample: EMA params of the latest checkpoint -> samples/samples_<step>_seed<seed>.*

  A conditional model draws `sample.num_samples` images for each prompt (`prompts`) with
  guidance `sample.guidance_scale`; the files then end in _w<scale> and the grid has one
  labelled row per prompt.

  Returns:
    (png path, npz path, uint8 samples [N, H, W, C]).
  """
  run = run_lib.make_run(config)
  return _sample_run(run, run.sample_fn(progress=_progress(config)), config, workdir)


def _progress(config: ml_collections.ConfigDict) -> generate.SampleProgress:
  # A bar over every network call (train.progress: whether to draw it on the terminal), and the
  # per-step stop check of `interrupts.stop_sampling_on_signals`.
  return generate.SampleProgress(show=config.train.progress)


def restore(run: run_lib.Run, workdir: str):
  """The train state of the latest checkpoint in `workdir` (a ConfigError when it has none)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise ConfigError(f"--workdir={workdir} has no checkpoint; train first (--mode=train)")
  store = checkpoints.CheckpointStore(directory)
  state = run_lib.restore_or_init(run, store)
  store.close()
  return state


def draw(config: ml_collections.ConfigDict, workdir: str, count: int) -> tuple[np.ndarray, int]:
  """`count` samples of the latest checkpoint with the sample.* settings, nothing written: a
  conditional model draws its prompts (`prompts`) in turn, with guidance sample.guidance_scale.

  Returns:
    (uint8 samples [count, H, W, C], the checkpoint's step).
  """
  run = run_lib.make_run(config)
  state = restore(run, workdir)
  sample_fn = run.sample_fn(progress=_progress(config))
  return draw_with(run, sample_fn, state.ema_params, config, count), int(state.step)


def draw_with(run: run_lib.Run, sample_fn, params, config, count: int) -> np.ndarray:
  """`draw`'s samples from given parameters: uint8 [count, H, W, C]; image i depends only on
  (seed, sample.seed, i) and the parameters."""
  key = jax.random.fold_in(rng.stream_key(config.seed, rng.SAMPLE), config.sample.seed + 1)
  prompt_list = prompts(run, config)
  condition = None
  if prompt_list is not None:
    picks = np.arange(count) % len(prompt_list)
    condition = {k: np.asarray(v)[picks] for k, v in run.prompt_condition(prompt_list).items()}
  listed = prompt_list or [None]
  condition = run.with_low_res(condition, [listed[i % len(listed)] for i in range(count)])
  return generate.generate(sample_fn, params, key, count, config.sample.batch_size, condition)


def _sample_run(run: run_lib.Run, sample_fn, config: ml_collections.ConfigDict, workdir: str):
  state = restore(run, workdir)
  step = int(state.step)
  key = jax.random.fold_in(rng.stream_key(config.seed, rng.SAMPLE), config.sample.seed + 1)
  prompt_list = prompts(run, config)
  name = f"samples_{step:07d}_seed{config.sample.seed}"
  condition, extra = None, {}
  count = config.sample.num_samples
  if prompt_list is not None:
    condition = run.prompt_condition(prompt_list)
    condition = {k: np.repeat(v, count, axis=0) for k, v in condition.items()}
    count *= len(prompt_list)
    scale = float(config.sample.guidance_scale)
    name += f"_w{scale:g}"
    extra["guidance_scale"] = np.float32(scale)
  # A super-resolution model enlarges training images (shown and kept with the samples).
  listed = [p for p in prompt_list or [None] for _ in range(config.sample.num_samples)]
  condition = run.with_low_res(condition, listed)
  if run.low_res_size:
    extra["low_res"] = condition["low_res"]
  start = time.time()
  samples = generate.generate(
    sample_fn, state.ema_params, key, count, config.sample.batch_size, condition
  )
  logging.info("sampled %d images in %.1fs", len(samples), time.time() - start)
  png, npz = generate.write_samples(workdir, name, samples, prompts=prompt_list, **extra)
  if config.sample.save_images and jax.process_index() == 0:
    folder = os.path.join(workdir, "samples", name)
    images.save_pngs(folder, samples)
    logging.info("wrote %d PNG files to %s", len(samples), folder)
  return png, npz, samples


def prompts(run: run_lib.Run, config: ml_collections.ConfigDict) -> list[str] | None:
  """The prompts --mode=sample draws for: sample.prompt, else the lines of sample.prompts_file,
  else one per class; None for an unconditional model (which takes no prompt).

  Raises:
    ConfigError: a prompt for an unconditional model, or a prompts file that cannot be read or
      holds no prompt.
  """
  prompt, path = config.sample.prompt, config.sample.prompts_file
  if run.cond_kind == "none":
    if prompt or path:
      raise ConfigError(
        "sample.prompt / sample.prompts_file: this model is unconditional and takes no prompt"
      )
    return None
  if prompt is not None:
    return [prompt]
  if path:
    try:
      with open(path) as f:
        lines = [line.strip() for line in f]
    except OSError as e:
      raise ConfigError(f"sample.prompts_file={path!r} cannot be read: {e.strerror}") from e
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
      raise ConfigError(f"sample.prompts_file={path!r} holds no prompt (one per line)")
    return lines
  return [text.class_caption(name) for name in run.class_names]


def sample_study(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[list[tuple[str, str]], tuple[str, str]]:
  """--mode=sample for a seed study, compiled once for all of its sample sets.

  With `sample.seeds`: num_samples images of the one model in WORKDIR for each sample seed (the
  sets come from disjoint random streams). With `seeds` (a training study's WORKDIR): num_samples
  images of each seed's model, with `sample.seed`. Each set is written like --mode=sample writes
  it; WORKDIR/sample_seed_summary.{json,md} gets the figures of `studies.sample_figures` per seed
  against the first num_samples images of the data set.

  Returns:
    ([(png, npz) per seed], (summary json, summary markdown)).
  """
  train_seeds, sample_seed_list = settings.study_seeds(config), settings.sample_seeds(config)
  if train_seeds and sample_seed_list:
    raise ConfigError(
      "set either seeds (one sample set per trained seed) or sample.seeds (several sample sets "
      "of one model), not both"
    )
  if train_seeds:
    runs = {
      s: (studies.member_config(config, s), studies.member_workdir(workdir, s)) for s in train_seeds
    }
  else:
    runs = {}
    for s in sample_seed_list:
      member = ml_collections.ConfigDict(config.to_dict())
      member.sample.seed, member.sample.seeds = s, ""
      runs[s] = (member, workdir)
  run = run_lib.make_run(config)
  sample_fn = run.sample_fn(progress=_progress(config))
  source = data.make_source(config.data)
  count = min(config.sample.num_samples, len(source))
  reference = np.stack([source[i]["image"] for i in range(count)])
  key = rng.stream_key(config.seed, rng.EVAL)
  written, per_seed = [], {}
  for seed, (member_config, member_workdir) in runs.items():
    png, npz, samples = _sample_run(run, sample_fn, member_config, member_workdir)
    written.append((png, npz))
    per_seed[seed] = studies.sample_figures(samples[:count], reference, key)
  paths = ("", "")
  if jax.process_index() == 0:
    summary = studies.summarize(per_seed)
    paths = studies.write_summary(workdir, summary, name="sample_seed_summary")
  return written, paths
