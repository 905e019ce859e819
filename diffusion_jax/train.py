"""Training: the train state, the pure train step, and the (only impure) training loop.

The loop resumes by itself from the latest checkpoint in WORKDIR. Every random number of step s
for example j of the global batch comes from fold_in(fold_in(train_key, s), j), so a resumed run
repeats the uninterrupted one and the draws do not depend on how the batch is split over devices.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from diffusion_jax import checkpoints, data, diffusion, parallel, rng, samplers, sampling
from diffusion_jax.errors import ConfigError, TrainingStopped
from diffusion_jax.metric_writer import MetricWriter
from diffusion_jax.models import check_model_config, make_model
from diffusion_jax.schedules import Schedule, make_schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, train steps taken
  params: Any  # model parameters, float32
  ema_params: Any  # exponential moving average of params, used for sampling
  opt_state: optax.OptState


# ---------------------------------------------------------------- construction from the config


def schedule_from_config(diffusion_config: ml_collections.ConfigDict) -> Schedule:
  """The noise schedule named by the config's `diffusion` section."""
  kwargs = {}
  if diffusion_config.schedule == "linear":
    kwargs = dict(beta_start=diffusion_config.beta_start, beta_end=diffusion_config.beta_end)
  elif diffusion_config.schedule == "cosine":
    kwargs = dict(s=diffusion_config.cosine_s)
  try:
    return make_schedule(diffusion_config.schedule, diffusion_config.num_timesteps, **kwargs)
  except ValueError as e:
    raise ConfigError(f"diffusion.schedule / diffusion.num_timesteps: {e}") from e


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """step (0-based) -> learning rate: linear warm-up from 0, constant, optional linear cool-down.

  The cool-down (train.cooldown_steps > 0) ends at 0 at step train.num_steps, so it depends on
  num_steps: a run resumed with a larger num_steps follows the new schedule from there on.
  """
  lr = train_config.learning_rate
  warmup = max(train_config.warmup_steps, 0)
  cooldown = min(max(train_config.get("cooldown_steps", 0), 0), train_config.num_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    value = jnp.asarray(lr, jnp.float32)
    if warmup > 0:
      value = value * jnp.minimum(step / warmup, 1.0)
    if cooldown > 0:
      value = value * jnp.clip((train_config.num_steps - step) / cooldown, 0.0, 1.0)
    return value

  return schedule


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on `learning_rate_schedule`, after global-norm clipping."""
  lr = learning_rate_schedule(train_config)
  adam = optax.adam(lr, b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps)
  if train_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adam)
  return adam


def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Validates the config before anything is compiled; raises ConfigError (one line)."""
  try:
    check_model_config(config.model, config.data.image_size)
    parallel.check_batch_size(config.train.batch_size, mesh)
    parallel.check_batch_size(config.sample.batch_size, mesh, field="sample.batch_size")
    samplers.check_sampler(
      config.sample.sampler,
      config.sample.num_steps,
      config.diffusion.num_timesteps,
      skip=config.sample.skip,
      eta=config.sample.eta,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if config.train.num_steps < 0:
    raise ConfigError(f"train.num_steps={config.train.num_steps} must be >= 0")
  if config.diffusion.variance not in diffusion.VARIANCES:
    raise ConfigError(
      f"diffusion.variance={config.diffusion.variance!r} is unknown; "
      f"valid: {', '.join(diffusion.VARIANCES)}"
    )
  if config.diffusion.prediction not in diffusion.PREDICTIONS:
    raise ConfigError(
      f"diffusion.prediction={config.diffusion.prediction!r} is unknown; "
      f"valid: {', '.join(diffusion.PREDICTIONS)}"
    )


def init_state(model: nn.Module, tx, image_shape, key: jax.Array) -> TrainState:
  """A fresh TrainState at step 0 (EMA params start equal to params)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(key, x, jnp.zeros((1,), jnp.int32))["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params)
  )


# ---------------------------------------------------------------- the train step


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  train_key: jax.Array,
  *,
  model: nn.Module,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  train_config: ml_collections.ConfigDict,
  prediction: str = "eps",
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on L_simple; pure.

  Args:
    state: the current state (donated by the caller).
    batch: "image" uint8 [B, H, W, C], the global batch sharded over devices.
    train_key: the run's train stream key; this step uses fold_in(train_key, state.step).
    model, schedule, tx, train_config: static parts of the step.
    prediction: what the model predicts, one of diffusion.PREDICTIONS.

  Returns:
    (new state, metrics): metrics are float32 scalars loss, grad_norm, param_norm, lr.
  """
  x0 = data.normalize_images(batch["image"])
  step_key = jax.random.fold_in(train_key, state.step)
  # One key per example from its index in the global batch: t, eps and the dropout masks of
  # example j are the same whatever device it lands on. With dropout, the model is applied per
  # example under vmap (it has no cross-example layers, so this is the same network on the whole
  # batch) so that each example's dropout mask comes from its own key. Without dropout, one call
  # on the whole batch gives the same loss and is faster (about 25% for the shapes network on a
  # CPU), since XLA does not fully recover the batched program from the vmapped one.
  keys = jax.vmap(lambda j: jax.random.fold_in(step_key, j))(jnp.arange(x0.shape[0]))
  loss_keys, dropout_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)

  def example_loss(params, x0_i, loss_key, dropout_key):
    denoise_fn = lambda x_t, t: model.apply(
      {"params": params}, x_t, t, train=True, rngs={"dropout": dropout_key}
    )
    return diffusion.simple_loss(schedule, denoise_fn, x0_i[None], loss_key, prediction=prediction)[
      0
    ]

  def loss_fn(params):
    if _uses_dropout(model):
      losses = jax.vmap(example_loss, in_axes=(None, 0, 0, 0))(params, x0, loss_keys, dropout_keys)
    else:
      denoise_fn = lambda x_t, t: model.apply({"params": params}, x_t, t, train=True)
      losses = diffusion.simple_loss_per_example_keys(
        schedule, denoise_fn, x0, loss_keys, prediction=prediction
      )
    return jnp.mean(losses)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # EMA with the usual warm-up, min(decay, (1 + s) / (10 + s)), so early samples are usable.
  decay = jnp.minimum(train_config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
  new_state = TrainState(
    step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
  )
  metrics = {
    "loss": loss,
    "grad_norm": optax.tree.norm(grads),
    "param_norm": optax.tree.norm(params),
    "lr": jnp.asarray(learning_rate_schedule(train_config)(state.step), jnp.float32),
  }
  return new_state, metrics


def _uses_dropout(model: nn.Module) -> bool:
  """Whether `model` draws dropout masks in training (unknown models: assume it does)."""
  config = getattr(model, "config", None)
  return getattr(config, "dropout", 1.0) > 0


# ---------------------------------------------------------------- the training loop


@dataclasses.dataclass
class Run:
  """What the loop and the sample mode share: the model, schedule, mesh and compiled functions."""

  config: ml_collections.ConfigDict
  model: nn.Module
  schedule: Schedule
  mesh: Any
  tx: optax.GradientTransformation
  image_shape: tuple[int, int, int]

  def abstract_state(self) -> TrainState:
    """The state's shapes and dtypes, replicated over the mesh, without computing anything."""
    init = lambda key: init_state(self.model, self.tx, self.image_shape, key)
    shapes = jax.eval_shape(init, jax.random.key(0))
    sharding = parallel.replicated(self.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

  def sample_fn(self, **options):
    """`sampling.make_sample_fn` for the config's sample section, plus `options` (to_uint8)."""
    sample = self.config.sample
    return sampling.make_sample_fn(
      self.model,
      self.schedule,
      self.image_shape,
      sample.batch_size,
      self.mesh,
      sampler=sample.sampler,
      num_steps=sample.num_steps,
      eta=sample.eta,
      skip=sample.skip,
      variance=self.config.diffusion.variance,
      clip_x0=self.config.diffusion.clip_x0,
      prediction=self.config.diffusion.prediction,
      **options,
    )


def compile_train_step(run: Run):
  """`train_step` jitted over the mesh: (state, batch, train_key) -> (state, metrics).

  The state is donated and replicated, the batch sharded over the "data" axis, the metrics
  replicated.
  """
  return jax.jit(
    lambda state, batch, key: train_step(
      state,
      batch,
      key,
      model=run.model,
      schedule=run.schedule,
      tx=run.tx,
      train_config=run.config.train,
      prediction=run.config.diffusion.prediction,
    ),
    donate_argnums=(0,),
    in_shardings=(parallel.replicated(run.mesh), parallel.batch_sharded(run.mesh), None),
    out_shardings=(parallel.replicated(run.mesh), parallel.replicated(run.mesh)),
  )


def make_run(config: ml_collections.ConfigDict) -> Run:
  """Validates `config` and builds everything that does not depend on the data or the state."""
  mesh = parallel.make_mesh()
  check_config(config, mesh)
  image_size = config.data.image_size
  return Run(
    config=config,
    model=make_model(config.model),
    schedule=schedule_from_config(config.diffusion),
    mesh=mesh,
    tx=make_optimizer(config.train),
    image_shape=(image_size, image_size, 3),
  )


def restore_or_init(run: Run, store: checkpoints.CheckpointStore) -> TrainState:
  """The latest readable checkpoint's state, or a fresh one from the init stream."""
  abstract = run.abstract_state()
  target = flax.serialization.to_state_dict(abstract)
  restored = store.restore_latest(target)
  if restored is not None:
    state_dict, _ = restored
    state = flax.serialization.from_state_dict(abstract, state_dict)
    logging.info("resumed from the checkpoint at step %d", int(state.step))
    return state
  init = jax.jit(
    lambda key: init_state(run.model, run.tx, run.image_shape, key),
    out_shardings=parallel.replicated(run.mesh),
  )
  return init(rng.stream_key(run.config.seed, rng.INIT))


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass
class _StopRequest:
  signal_name: str | None = None  # set by the handler; read once per step by the loop


@contextlib.contextmanager
def _stop_on_signals(signums=(signal.SIGTERM, signal.SIGINT)):
  """Within the block, SIGTERM and SIGINT only set `.signal_name` of the yielded request.

  The loop checks the request at each step boundary. A second signal while a stop is pending
  gets the previous handler (Ctrl-C twice: KeyboardInterrupt). The previous handlers come back
  on exit. Outside the main thread, where Python cannot install handlers, nothing changes.
  """
  request = _StopRequest()
  previous = {}

  def handler(signum, frame):
    if request.signal_name is None:
      request.signal_name = signal.Signals(signum).name
      return
    for s, h in previous.items():
      signal.signal(s, h)
    signal.raise_signal(signum)

  if threading.current_thread() is threading.main_thread():
    previous = {s: signal.signal(s, handler) for s in signums}
  try:
    yield request
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _stop_agreed(request: _StopRequest) -> str | None:
  """The signal that stops every process at this step, or None.

  With several processes the checkpoint is written by all of them together, so they must stop at
  the same step: the first process that got a signal decides for all (a small all-gather).
  """
  if jax.process_count() == 1:
    return request.signal_name
  from jax.experimental import multihost_utils

  code = {None: 0, "SIGTERM": 1, "SIGINT": 2}.get(request.signal_name, 1)
  codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
  return {1: "SIGTERM", 2: "SIGINT"}.get(int(codes.max()))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes training) until `config.train.num_steps`, writing into `workdir`.

  SIGTERM or SIGINT (Ctrl-C) during the loop stops it at the end of the current step, after a
  checkpoint of that step; the same call then resumes.

  Returns:
    The metrics of the last step that was run (empty if nothing was left to do).

  Raises:
    TrainingStopped: stopped by a signal, after the checkpoint was saved.
    FloatingPointError: a non-finite metric; the checkpoints written before it are kept.
  """
  run = make_run(config)
  train_config = config.train
  source = data.make_source(config.data)  # Fails early, with a one-line error, on bad data.
  logging.info("data: %s with %d examples", config.data.dataset, len(source))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=list)

  store = checkpoints.CheckpointStore(
    os.path.join(workdir, "checkpoints"), keep=train_config.keep_checkpoints
  )
  state = restore_or_init(run, store)
  start_step = int(state.step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("model: %s parameters; starting at step %d", f"{num_params:,}", start_step)

  step_fn = compile_train_step(run)
  train_key = rng.stream_key(config.seed, rng.TRAIN)
  sample_key = rng.stream_key(config.seed, rng.SAMPLE)
  sample_fn = None
  batches = data.make_train_iterator(
    config.data,
    global_batch_size=train_config.batch_size,
    seed=config.seed,
    start_step=start_step,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  writer = MetricWriter(workdir)
  progress = tqdm.tqdm(
    total=train_config.num_steps,
    initial=start_step,
    unit="step",
    dynamic_ncols=True,
    disable=not train_config.progress or jax.process_index() != 0,
    mininterval=1.0,
  )
  last = {}
  step = start_step
  previous_loss = None
  stopped_by = None
  with contextlib.ExitStack() as cleanup:
    # Undone in reverse order, also on errors: pending checkpoint saves finish before the exit,
    # and the signal handlers stay until then.
    stop = cleanup.enter_context(_stop_on_signals())
    cleanup.callback(writer.close)
    cleanup.callback(store.close)
    cleanup.callback(progress.close)
    for step in range(start_step + 1, train_config.num_steps + 1):
      batch = parallel.put_batch({"image": next(batches)["image"]}, run.mesh)
      state, metrics = step_fn(state, batch, train_key)
      # Wait for the previous step (not this one) so the progress bar shows the real rate while
      # the device still has the next step queued.
      if previous_loss is not None:
        previous_loss.block_until_ready()
      previous_loss = metrics["loss"]
      progress.update(1)
      is_last = step == train_config.num_steps
      log_now = step % train_config.log_every == 0 or is_last or step == start_step + 1
      save_now = step % train_config.checkpoint_every == 0 or is_last
      sample_now = train_config.sample_every > 0 and step % train_config.sample_every == 0
      # Several processes agree on stopping only at steps where the host waits anyway.
      if jax.process_count() == 1 or log_now or save_now:
        stopped_by = None if is_last else _stop_agreed(stop)
      if stopped_by:
        # Finish this step: log it and save it (once), but skip its samples to exit quickly.
        log_now = save_now = True
        sample_now = False
      if log_now or save_now:
        last = _host_metrics(metrics)
        if not all(math.isfinite(v) for v in last.values()):
          raise FloatingPointError(
            f"non-finite training metrics at step {step}: {last}; the last checkpoint "
            f"(step {store.latest_step()}) is kept. Lower train.learning_rate or check the data."
          )
        writer.write(step, last)
        progress.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
      if save_now:
        store.save(step, flax.serialization.to_state_dict(state), _meta(config, step))
      if (sample_now or is_last) and train_config.num_grid_samples > 0:
        sample_fn = sample_fn or run.sample_fn()
        _say(progress, f"sampling {train_config.num_grid_samples} images at step {step}")
        samples = sampling.generate(
          sample_fn,
          state.ema_params,
          sample_key,
          train_config.num_grid_samples,
          config.sample.batch_size,
        )
        png, _ = sampling.write_samples(workdir, f"step_{step:07d}", samples)
        _say(progress, f"wrote {png}")
      if stopped_by:
        break
  if stopped_by:
    raise TrainingStopped(stopped_by, step)
  if step == start_step:
    logging.info("nothing to do: the checkpoint is at step %d >= train.num_steps", start_step)
  return last


def _say(progress: tqdm.tqdm, message: str) -> None:
  """Prints a line above the progress bar, on process 0 only."""
  if jax.process_index() == 0:
    progress.write(message)


def _meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
  # The data iterator's position is a pure function of the step: batch s holds stream
  # positions [s * B, (s + 1) * B), so restoring the step restores the data order.
  return {"step": step, "data_start_step": step, "config": json.loads(config.to_json_best_effort())}


def sample_from_checkpoint(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[str, str, np.ndarray]:
  """--mode=sample: EMA params of the latest checkpoint -> samples/samples_<step>_seed<seed>.*

  Returns:
    (png path, npz path, uint8 samples [N, H, W, C]).
  """
  run = make_run(config)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise ConfigError(f"--workdir={workdir} has no checkpoint; train first (--mode=train)")
  store = checkpoints.CheckpointStore(directory)
  state = restore_or_init(run, store)
  store.close()
  step = int(state.step)
  key = jax.random.fold_in(rng.stream_key(config.seed, rng.SAMPLE), config.sample.seed + 1)
  start = time.time()
  samples = sampling.generate(
    run.sample_fn(), state.ema_params, key, config.sample.num_samples, config.sample.batch_size
  )
  logging.info("sampled %d images in %.1fs", len(samples), time.time() - start)
  png, npz = sampling.write_samples(
    workdir, f"samples_{step:07d}_seed{config.sample.seed}", samples
  )
  return png, npz, samples
