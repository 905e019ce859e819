"""The training loop: the only impure code. It resumes by itself from the latest checkpoint in
WORKDIR; a single run is one member, a seed study K members trained in one program."""

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from diffusion_jax import data
from diffusion_jax.core import rng
from diffusion_jax.experiment import autoencoder, generate, latent, latent_cache, settings, studies
from diffusion_jax.experiment.quality_mode import DuringTraining
from diffusion_jax.experiment.run import Run, make_run, restore_or_init_seeds
from diffusion_jax.experiment.train_step import compile_train_step
from diffusion_jax.runtime import checkpoints, interrupts, parallel, plots
from diffusion_jax.runtime.errors import SamplingStopped, TrainingStopped
from diffusion_jax.runtime.metric_writer import MetricWriter

# WORKDIR/metrics.png is redrawn at a checkpoint when it is older than this, and at the end.
PLOT_EVERY_SECONDS = 60.0


@dataclasses.dataclass
class _Member:
  """One seed of a run: a single run is one member in WORKDIR; a seed study has K members,
  seed s in WORKDIR/seed_<s>, each with its own checkpoints, metrics, data order and keys."""

  seed: int
  workdir: str
  config: ml_collections.ConfigDict


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes training) until `config.train.num_steps`, writing into `workdir`.

  With `config.seeds` set, trains one model per seed in one program, seed s in
  WORKDIR/seed_<s>, and at the end writes WORKDIR/seed_summary.{json,md}.

  SIGTERM or SIGINT (Ctrl-C) during the loop stops it at the end of the current step, after a
  checkpoint of that step; the same call then resumes.

  Returns:
    The metrics of the last step that was run (empty if nothing was left to do); for a seed
    study, {seed: metrics}.

  Raises:
    TrainingStopped: stopped by a signal, after the checkpoint was saved.
    FloatingPointError: a non-finite metric; the checkpoints written before it are kept.
  """
  if settings.is_latent(config) and not config.latent.autoencoder_workdir:
    config = _train_first_stage(config, workdir)
  run = make_run(config)
  config, train_config = run.config, run.train  # "auto" settings resolved
  members = _members(config, workdir)
  study = settings.study_seeds(config) is not None
  num_seeds = len(members) if len(members) > 1 else None  # None: no seed axis
  source = data.make_source(run.data)  # Fails early, with a one-line error, on bad data.
  logging.info("data: %s with %d examples", config.data.dataset, len(source))
  _write_config(config, workdir)
  for member in members if study else []:
    _write_config(member.config, member.workdir)

  stores = [
    checkpoints.CheckpointStore(
      os.path.join(m.workdir, "checkpoints"),
      keep=train_config.keep_checkpoints,
      keep_every=train_config.keep_every,
    )
    for m in members
  ]
  states = restore_or_init_seeds(run, stores, [m.seed for m in members])
  start_step = int(states[0].step)
  state = _stack(*states) if num_seeds else states[0]
  del states
  num_params = sum(x.size for x in jax.tree.leaves(state.params)) // (num_seeds or 1)
  logging.info(
    "model: %s parameters%s; starting at step %d",
    f"{num_params:,}",
    f", {num_seeds} seeds trained together ({train_config.seed_batching})" if num_seeds else "",
    start_step,
  )

  steps_per_call = train_config.steps_per_call
  step_fn = compile_train_step(run, num_seeds, steps_per_call)
  train_keys = [rng.stream_key(m.seed, rng.TRAIN) for m in members]
  train_key = jnp.stack(train_keys) if num_seeds else train_keys[0]
  next_batch = _batches(run, members, start_step, num_seeds, workdir)
  writers = [MetricWriter(m.workdir) for m in members]
  progress = tqdm.tqdm(
    total=train_config.num_steps,
    initial=start_step,
    unit="step",
    dynamic_ncols=True,
    disable=not train_config.progress or jax.process_index() != 0,
    mininterval=1.0,
  )
  grids = _GridWriter(run, members, num_seeds, progress)
  last = [{} for _ in members]
  step = start_step
  previous_loss = None
  stopped_by = None
  plotted = time.monotonic()
  with contextlib.ExitStack() as cleanup:
    # Undone in reverse order, also on errors: pending checkpoint saves finish before the exit,
    # and the signal handlers stay until then.
    stop = cleanup.enter_context(interrupts.stop_on_signals())
    for writer, store in zip(writers, stores, strict=True):
      cleanup.callback(writer.close)
      cleanup.callback(store.close)
    cleanup.callback(progress.close)
    evaluator = DuringTraining.every(run, workdir, study)
    if evaluator is not None:
      cleanup.callback(evaluator.close)
    while step < train_config.num_steps:
      # Up to k steps in one call, ending at the next step that logs, saves or samples.
      n = min(steps_per_call, steps_to_event(step, train_config))
      if steps_per_call > 1:
        state, metrics = step_fn(state, next_batch(n), n, train_key)
      else:
        state, metrics = step_fn(state, next_batch(1), train_key)
      step += n
      # Wait for the previous call (not this one) so the progress bar shows the real rate while
      # the device still has the next call queued.
      if previous_loss is not None:
        previous_loss.block_until_ready()
      previous_loss = metrics["loss"]
      progress.update(n)
      is_last = step == train_config.num_steps
      log_now = step % train_config.log_every == 0 or is_last or step == start_step + n
      save_now = step % train_config.checkpoint_every == 0 or is_last
      sample_now = train_config.sample_every > 0 and step % train_config.sample_every == 0
      eval_now = evaluator is not None and step % train_config.eval_every == 0
      # Several processes agree on stopping only at steps where the host waits anyway.
      if jax.process_count() == 1 or log_now or save_now:
        stopped_by = None if is_last else interrupts.stop_agreed(stop)
      if stopped_by:
        # Finish this step: log it and save it (once), but skip its samples to exit quickly.
        log_now = save_now = True
        sample_now = eval_now = False
      if log_now or save_now:
        last = _host_metrics(metrics, num_seeds)
        _log(step, last, members, writers, stores[0], study)
        progress.set_postfix(loss=f"{np.mean([v['loss'] for v in last]):.4f}", refresh=False)
      if save_now:
        _save(step, state, members, stores, num_seeds)
        if is_last or stopped_by or time.monotonic() - plotted >= PLOT_EVERY_SECONDS:
          _plot_metrics(workdir, members, study)
          plotted = time.monotonic()
      if (sample_now or is_last) and train_config.num_grid_samples > 0:
        stopped_by = grids.write(step, state.ema_params, stop)
        if stopped_by and not save_now:
          _save(step, state, members, stores, num_seeds)
      if eval_now and not stopped_by:
        _say(progress, f"step {step}: {evaluator(step, state.ema_params)}")
      if stopped_by:
        break
  if stopped_by:
    raise TrainingStopped(stopped_by, step)
  if step == start_step:
    logging.info("nothing to do: the checkpoint is at step %d >= train.num_steps", start_step)
  if study and step == train_config.num_steps and jax.process_index() == 0:
    paths = write_study_summary(config, workdir, source)
    _say(progress, f"wrote the seed study summary {paths[1]}")
  if study:
    return {member.seed: values for member, values in zip(members, last, strict=True)}
  return last[0]


def _train_first_stage(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or resumes, or finds finished) the autoencoder of latent.autoencoder_config in
  WORKDIR/autoencoder; returns `config` pointing latent.autoencoder_workdir there."""
  ae_workdir = os.path.join(workdir, "autoencoder")
  ae_config = latent.load_config_file(config.latent.autoencoder_config)
  logging.info(
    "first stage: the autoencoder %s in %s", config.latent.autoencoder_config, ae_workdir
  )
  train_and_evaluate(ae_config, ae_workdir)
  config = copy.deepcopy(config)
  config.latent.autoencoder_workdir = ae_workdir
  return config


def _members(config: ml_collections.ConfigDict, workdir: str) -> list[_Member]:
  seeds = settings.study_seeds(config)
  if seeds is None:
    return [_Member(config.seed, workdir, config)]
  return [
    _Member(s, studies.member_workdir(workdir, s), studies.member_config(config, s)) for s in seeds
  ]


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=list)


def _batches(
  run: Run, members: list[_Member], start_step: int, num_seeds: int | None, workdir: str
):
  """next_batch(n): the device batch of the next step (n = 1), or of the next n steps on a
  leading axis of train.steps_per_call batches (the rest repeat the first)."""
  iterators = [
    data.make_train_iterator(
      run.data,
      global_batch_size=run.train.batch_size,
      seed=m.seed,
      start_step=start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      tokenizer=run.tokenizer,
    )
    for m in members
  ]
  # What a step feeds the model: the images, and the labels or captions of a conditional model.
  fields = ("image",) + {"class": ("label",), "text": ("tokens",)}.get(run.cond_kind, ())
  k = run.train.steps_per_call
  if run.latent is not None:
    return _latent_batches(run, iterators[0], fields, members[0].seed, start_step, workdir)

  def next_batch(n: int):
    if k > 1:
      rows = [next(iterators[0]) for _ in range(n)]
      rows += rows[:1] * (k - n)
      batch = {f: np.stack([row[f] for row in rows]) for f in fields}
      return parallel.put_batch(batch, run.mesh, axis=1)
    batches = [next(it) for it in iterators]
    batch = {f: np.stack([b[f] for b in batches]) if num_seeds else batches[0][f] for f in fields}
    return parallel.put_batch(batch, run.mesh, axis=1 if num_seeds else 0)

  return next_batch


def _latent_batches(run: Run, iterator, fields, seed: int, start_step: int, workdir: str):
  """next_batch(1) of a latent run: the step's latents, image j of step s drawn from its
  posterior with fold_in(fold_in(LATENT stream, s), j); the posterior is the encoder's on the
  devices, or with latent.cache the same one read from the encoded training set."""
  root = rng.stream_key(seed, latent.LATENT)
  step = start_step
  cache = None
  if run.config.latent.cache:
    cache = latent_cache.load_or_encode(run.config, run.latent, workdir)
    fields = tuple(f for f in fields if f != "image")

  def next_batch(n: int):
    nonlocal step
    row = next(iterator)
    key = jax.random.fold_in(root, step)
    step += 1
    if cache is None:
      batch = parallel.put_batch({f: row[f] for f in fields}, run.mesh)
      batch["latent"] = run.latent.encode(batch.pop("image"), key)
      return batch
    mean, std = cache.rows(row["source"], row["flipped"])
    batch = parallel.put_batch({**{f: row[f] for f in fields}, "mean": mean, "std": std}, run.mesh)
    batch["latent"] = run.latent.draw(batch.pop("mean"), batch.pop("std"), key)
    return batch

  return next_batch


def _plot_metrics(workdir: str, members: list[_Member], study: bool) -> None:
  """WORKDIR/metrics.png: the loss curves so far (a seed study's seeds overlaid)."""
  if jax.process_index() != 0:
    return
  runs = {f"seed {m.seed}": m.workdir for m in members} if study else workdir
  try:
    plots.write_metrics_plot(runs, os.path.join(workdir, "metrics.png"))
  except OSError as e:  # a picture is not worth stopping a run for
    logging.warning("could not write %s: %s", os.path.join(workdir, "metrics.png"), e)


def _log(step: int, values_per_seed, members, writers, store, study: bool) -> None:
  """Writes each member's metrics; stops the run on a non-finite one."""
  for member, values, writer in zip(members, values_per_seed, writers, strict=True):
    if not all(math.isfinite(v) for v in values.values()):
      raise FloatingPointError(
        f"non-finite training metrics at step {step}"
        f"{f' of seed {member.seed}' if study else ''}: {values}; the last checkpoint "
        f"(step {store.latest_step()}) is kept. Lower train.learning_rate or check the data."
      )
    writer.write(step, values)


class _GridWriter:
  """Training-time sample grids of each member, from its EMA parameters (compiled on first use)."""

  def __init__(self, run: Run, members: list[_Member], num_seeds: int | None, progress):
    self.run, self.members, self.num_seeds, self.progress = run, members, num_seeds, progress
    self.sample_fn = None

  def write(self, step: int, ema_params: Any, stop: interrupts.StopRequest) -> str | None:
    """Writes each member's grid of `step`. With one process, SIGTERM or SIGINT stops the
    sampling within a network call (a second one exits at once): returns the signal's name,
    else None. With several, a signal waits for the loop's next agreed stop. An autoencoder's
    grid shows held-out images above their reconstructions."""
    run = self.run
    if run.is_autoencoder:
      self.sample_fn = self.sample_fn or autoencoder.ReconstructionGrids(
        run, run.train.num_grid_samples
      )
      for i, member in enumerate(self.members):
        params = _take_seed(ema_params, i) if self.num_seeds else ema_params
        png = self.sample_fn.write(member.workdir, grid_name(step, run.config), params)
        _say(self.progress, f"wrote {png}")
      return None
    options, _ = run.grid_sampler()
    bar = generate.SampleProgress(show=run.train.progress, leave=False)
    self.sample_fn = self.sample_fn or run.sample_fn(progress=bar, **options)
    prompts, condition, count = run.grid_prompts(run.train.num_grid_samples)
    single = jax.process_count() == 1
    for i, member in enumerate(self.members):
      params = _take_seed(ema_params, i) if self.num_seeds else ema_params
      key = rng.stream_key(member.seed, rng.SAMPLE)
      try:
        with interrupts.stop_sampling_on_signals(stop) if single else contextlib.nullcontext():
          samples = generate.generate(
            self.sample_fn, params, key, count, run.sample.batch_size, condition
          )
      except SamplingStopped as e:
        _say(self.progress, f"{e.signal_name}: the grid of step {step} is skipped")
        return e.signal_name
      name = grid_name(step, run.config)
      low_res = (condition or {}).get("low_res")  # a super-resolution model's inputs
      png, _ = generate.write_samples(
        member.workdir, name, samples, prompts=prompts, low_res=low_res
      )
      _say(self.progress, f"wrote {png}")
    return None


def _save(step: int, state, members: list[_Member], stores, num_seeds: int | None) -> None:
  for i, (member, store) in enumerate(zip(members, stores, strict=True)):
    member_state = _take_seed(state, i) if num_seeds else state
    store.save(step, flax.serialization.to_state_dict(member_state), _meta(member.config, step))


def grid_name(step: int, config: ml_collections.ConfigDict) -> str:
  """The file name (no extension) of the training-time grid at `step`: it names the sampler."""
  train = config.train
  if config.model.name == settings.AUTOENCODER:
    return f"step_{step:07d}_reconstructions"
  _, suffix = settings.grid_sampler(
    train.grid_sampler, train.grid_num_steps, config.diffusion.num_timesteps
  )
  return f"step_{step:07d}{suffix}"


def _host_metrics(metrics: dict[str, jax.Array], num_seeds: int | None) -> list[dict[str, float]]:
  """One dict of floats per seed (metrics with a leading seed axis when `num_seeds`)."""
  values = jax.device_get(metrics)
  if not num_seeds:
    return [{k: float(v) for k, v in values.items()}]
  return [{k: float(v[i]) for k, v in values.items()} for i in range(num_seeds)]


# The states of K seeds as one pytree with a leading seed axis, and seed i's slice of it (a copy,
# since the stacked state is donated to the next step). Inputs are replicated, and so are outputs.
_stack = jax.jit(lambda *states: jax.tree.map(lambda *x: jnp.stack(x), *states))
_take_seed = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree))


def write_study_summary(
  config: ml_collections.ConfigDict, workdir: str, source=None
) -> tuple[str, str]:
  """WORKDIR/seed_summary.{json,md} of a finished training seed study.

  Per seed: the final loss, the mean loss of the last 10% of the steps and, where the seed's
  final sample grid exists, the figures of `studies.sample_figures` against the first images of
  the data set (the same images and projection directions for every seed).
  """
  seeds = settings.study_seeds(config)
  num_steps = config.train.num_steps
  source = source or data.make_source(config.data)
  key = rng.stream_key(config.seed, rng.EVAL)
  per_seed = {}
  for seed in seeds:
    member = studies.member_workdir(workdir, seed)
    figures = studies.training_figures(member, num_steps)
    npz = os.path.join(member, "samples", f"{grid_name(num_steps, config)}.npz")
    if os.path.exists(npz):
      with np.load(npz) as f:
        samples = f["samples"]
      reference = np.stack([source[i]["image"] for i in range(min(len(samples), len(source)))])
      figures.update(studies.sample_figures(samples, reference, key))
    per_seed[seed] = figures
  return studies.write_summary(workdir, studies.summarize(studies.common_figures(per_seed)))


def _say(progress: tqdm.tqdm, message: str) -> None:
  """Prints a line above the progress bar, on process 0 only."""
  if jax.process_index() == 0:
    progress.write(message)


def _meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
  # The data iterator's position is a pure function of the step: batch s holds stream
  # positions [s * B, (s + 1) * B), so restoring the step restores the data order.
  return {"step": step, "data_start_step": step, "config": json.loads(config.to_json_best_effort())}


def steps_to_event(step: int, train_config: settings.TrainSettings) -> int:
  """Steps from `step` to the next one that logs, saves, samples, evaluates or ends (>= 1)."""
  periods = [
    train_config.log_every,
    train_config.checkpoint_every,
    train_config.sample_every,
    train_config.eval_every,
  ]
  gaps = [p - step % p for p in periods if p > 0]
  return max(1, min([*gaps, train_config.num_steps - step]))
