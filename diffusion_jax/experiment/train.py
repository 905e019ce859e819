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

from diffusion_jax import (
  checkpoints,
  conditioning,
  data,
  diffusion,
  importance,
  interrupts,
  losses,
  parallel,
  rng,
  samplers,
  sampling,
  studies,
  text,
)
from diffusion_jax.errors import ConfigError, TrainingStopped
from diffusion_jax.metric_writer import MetricWriter
from diffusion_jax.models import check_model_config, condition_kind, make_model
from diffusion_jax.schedules import Schedule, make_schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, train steps taken
  params: Any  # model parameters, float32
  ema_params: Any  # exponential moving average of params, used for sampling
  opt_state: optax.OptState
  # diffusion.t_sampling="importance": the recent losses at each t (importance.LossHistory);
  # None for uniform t.
  t_history: Any = None


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


def global_norm(tree: Any) -> jax.Array:
  """The float32 l2 norm of all the leaves of `tree` together, as optax.tree.norm."""
  return flat_copy_and_norm(tree)[1]


def flat_copy_and_norm(tree: Any) -> tuple[Any, jax.Array]:
  """(`tree` read back from one flat float32 copy of its leaves, their global l2 norm).

  The leaves are concatenated into one vector, kept whole by an optimization barrier, and summed
  in one reduction. Summed leaf by leaf, XLA makes a reduction kernel (large leaves: two) for each
  of the U-Net's 328 parameters: about 550 of the 2,600 kernels of the CIFAR-10 step on a GPU,
  each a few microseconds for a few kilobytes of data. The copy is in the leaves' own index
  order, which lets the optimizer update read the convolutions' gradients without transposing
  them (cuDNN returns them in [out, h, w, in] order).
  """
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree, jnp.zeros((), jnp.float32)
  flat = jax.lax.optimization_barrier(
    jnp.concatenate([x.astype(jnp.float32).reshape(-1) for x in leaves])
  )
  pieces = jnp.split(flat, np.cumsum([x.size for x in leaves])[:-1])
  copy = [p.reshape(x.shape).astype(x.dtype) for p, x in zip(pieces, leaves, strict=True)]
  return treedef.unflatten(copy), jnp.sqrt(jnp.sum(jnp.square(flat)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (the same state and result) with the norm from `global_norm`.

  `update(..., grad_norm=n)` takes the gradients' norm when the caller has it already.
  """

  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = global_norm(updates) if grad_norm is None else grad_norm
    clip = lambda g: jax.lax.select(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on `learning_rate_schedule`, after global-norm clipping.

  `update` takes the keyword `grad_norm`: the gradients' global norm, when the caller has it.
  """
  lr = learning_rate_schedule(train_config)
  adam = optax.adam(lr, b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps)
  if train_config.grad_clip > 0:
    return optax.chain(clip_by_global_norm(train_config.grad_clip), adam)
  return optax.with_extra_args_support(adam)


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
  study_seeds(config)
  sample_seeds(config)
  seed_batching(config)
  if config.train.num_steps < 0:
    raise ConfigError(f"train.num_steps={config.train.num_steps} must be >= 0")
  if config.diffusion.variance not in diffusion.VARIANCES:
    raise ConfigError(
      f"diffusion.variance={config.diffusion.variance!r} is unknown; "
      f"valid: {', '.join(diffusion.VARIANCES)}"
    )
  loss_type = config.diffusion.get("loss", "simple")
  if loss_type not in losses.LOSS_TYPES:
    raise ConfigError(
      f"diffusion.loss={loss_type!r} is unknown; valid: {', '.join(losses.LOSS_TYPES)}"
    )
  try:
    losses.check_loss(loss_type, config.diffusion.variance)
  except ValueError as e:
    raise ConfigError(f"diffusion.loss={loss_type!r}: {e}") from e
  channels = diffusion.output_channels(3, config.diffusion.variance)
  if config.model.out_channels != channels:
    raise ConfigError(
      f"model.out_channels={config.model.out_channels} does not fit "
      f"diffusion.variance={config.diffusion.variance!r}; set it to {channels}"
    )
  if config.diffusion.get("t_sampling", "uniform") not in T_SAMPLING:
    raise ConfigError(
      f"diffusion.t_sampling={config.diffusion.t_sampling!r} is unknown; "
      f"valid: {', '.join(T_SAMPLING)}"
    )
  drop_prob = config.train.get("cond_drop_prob", 0.0)
  if not 0.0 <= drop_prob <= 1.0:
    raise ConfigError(f"train.cond_drop_prob={drop_prob} must be a probability in [0, 1]")
  scale = config.sample.get("guidance_scale", 1.0)
  if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
    raise ConfigError(f"sample.guidance_scale={scale!r} must be a finite number (e.g. 3)")
  if config.diffusion.prediction not in diffusion.PREDICTIONS:
    raise ConfigError(
      f"diffusion.prediction={config.diffusion.prediction!r} is unknown; "
      f"valid: {', '.join(diffusion.PREDICTIONS)}"
    )
  chunk = config.model.get("microbatch", 0)
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise ConfigError(
      f"model.microbatch={chunk!r} must be an integer >= 0 (examples per network call on each "
      "device; 0: the whole batch)"
    )
  k = config.train.get("steps_per_call", 1)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"train.steps_per_call={k!r} must be a positive integer (1: one step)")
  if k > 1 and study_seeds(config) is not None:
    raise ConfigError(
      f"train.steps_per_call={k} cannot be combined with a seed study (seeds="
      f"{config.seeds!r}); set train.steps_per_call=1"
    )


def study_seeds(config: ml_collections.ConfigDict) -> list[int] | None:
  """The seeds of a training seed study (`config.seeds`), or None for a single run."""
  try:
    return studies.parse_seeds(config.get("seeds", "")) or None
  except ValueError as e:
    raise ConfigError(str(e)) from e


SEED_BATCHING = ("auto", "vmap", "unroll")
T_SAMPLING = ("uniform", "importance")


def seed_batching(config: ml_collections.ConfigDict) -> str:
  """How the seeds of a study share the program: "vmap" or "unroll" (see configs/default.py)."""
  mode = config.train.get("seed_batching", "auto")
  if mode not in SEED_BATCHING:
    raise ConfigError(f"train.seed_batching={mode!r} is unknown; valid: {', '.join(SEED_BATCHING)}")
  if mode == "auto":
    return "unroll" if jax.default_backend() == "cpu" else "vmap"
  return mode


def sample_seeds(config: ml_collections.ConfigDict) -> list[int] | None:
  """The sample seeds of a sampling seed study (`config.sample.seeds`), or None."""
  try:
    return studies.parse_seeds(config.sample.get("seeds", ""), field="sample.seeds") or None
  except ValueError as e:
    raise ConfigError(str(e)) from e


def init_state(
  model: nn.Module,
  tx,
  image_shape,
  key: jax.Array,
  *,
  t_history_size: int | None = None,
  example_condition: conditioning.Condition | None = None,
) -> TrainState:
  """A fresh TrainState at step 0 (EMA params start equal to params).

  Args:
    t_history_size: T, for importance sampling of t (an empty `importance.LossHistory`); None
      for uniform t.
    example_condition: the condition of one example (arrays with a leading axis of 1) for a
      conditional model; None for an unconditional one.
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = model.init(key, x, jnp.zeros((1,), jnp.int32), **(example_condition or {}))["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=params,
    opt_state=tx.init(params),
    t_history=None if t_history_size is None else importance.init(t_history_size),
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
  loss_type: str = "simple",
  variance: str = "fixed_large",
  vlb_weight: float = 0.001,
  cond_kind: str = "none",
  cond_drop_prob: float = 0.0,
  num_classes: int = 0,
  param_norm: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the training loss; pure.

  Args:
    state: the current state (donated by the caller). With `state.t_history`, t is drawn by
      importance sampling from it (and it records this step's losses); otherwise uniformly.
    batch: "image" uint8 [B, H, W, C], the global batch sharded over devices; a conditional
      model also reads "label" [B] int32 or "tokens" [B, L] int32 (see `conditioning.from_batch`).
    train_key: the run's train stream key; this step uses fold_in(train_key, state.step).
    model, schedule, tx, train_config: static parts of the step.
    prediction: what the model predicts, one of diffusion.PREDICTIONS.
    loss_type, variance, vlb_weight: the loss (`losses.LOSS_TYPES`), the reverse variance it
      assumes and λ of the hybrid loss.
    cond_kind: what the model is conditioned on (`models.CONDITIONING`).
    cond_drop_prob: the probability that an example's condition is replaced by the null one
      (drawn from the example's key), which trains the unconditional model for guidance.
    num_classes: the null label of a class-conditional model.
    param_norm: include the metric param_norm (one pass over the parameters); the jitted step
      of `compile_train_step` adds it once per call instead.

  Returns:
    (new state, metrics): metrics are float32 scalars loss, grad_norm, param_norm (the new
    parameters'), lr, and for the hybrid and vlb losses mse and/or vlb (bits/dim of the sampled
    term).
  """
  x0 = data.normalize_images(batch["image"])
  step_key = jax.random.fold_in(train_key, state.step)
  # One key per example from its index in the global batch: t, eps and the dropout masks of
  # example j are the same whatever device it lands on, and the same as if the network ran on
  # example j alone (the U-Net draws each example's masks from its own key).
  keys = jax.vmap(lambda j: jax.random.fold_in(step_key, j))(jnp.arange(x0.shape[0]))
  loss_keys, dropout_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  cond = conditioning.from_batch(cond_kind, batch)
  cond = conditioning.drop(cond, keys, cond_drop_prob, num_classes)
  t_probs = None if state.t_history is None else importance.probabilities(state.t_history)
  loss_options = dict(
    loss_type=loss_type,
    prediction=prediction,
    variance=variance,
    vlb_weight=vlb_weight,
    t_probs=t_probs,
  )

  dropout = {"dropout_keys": dropout_keys} if _uses_dropout(model) else {}

  def loss_fn(params):
    denoise_fn = lambda x_t, t: model.apply(
      {"params": params}, x_t, t, train=True, **dropout, **cond
    )
    per_example, terms = losses.loss_per_example_keys(
      schedule, denoise_fn, x0, loss_keys, **loss_options
    )
    return jnp.mean(per_example), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads, grad_norm = flat_copy_and_norm(grads)
  extra = {"grad_norm": grad_norm} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  # EMA with the usual warm-up, min(decay, (1 + s) / (10 + s)), so early samples are usable.
  decay = jnp.minimum(train_config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
  t_history = state.t_history
  if t_history is not None:
    t_history = importance.update(t_history, terms["t"], terms["loss"])
  new_state = TrainState(
    step=state.step + 1,
    params=params,
    ema_params=ema_params,
    opt_state=opt_state,
    t_history=t_history,
  )
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "lr": jnp.asarray(learning_rate_schedule(train_config)(state.step), jnp.float32),
  }
  if param_norm:
    metrics["param_norm"] = global_norm(params)
  if loss_type != "simple":
    metrics.update({name: jnp.mean(terms[name]) for name in ("mse", "vlb") if name in terms})
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
  # What the model is conditioned on (`models.CONDITIONING`), the null label of a
  # class-conditional model, and the prompt tokenizer of a text-conditional one.
  cond_kind: str = "none"
  num_classes: int = 0
  tokenizer: text.Tokenizer | None = None
  class_names: tuple[str, ...] = ()

  def init_state(self, key: jax.Array) -> TrainState:
    """`init_state` for this run's model, optimizer and t sampling."""
    importance_sampling = self.config.diffusion.get("t_sampling", "uniform") == "importance"
    return init_state(
      self.model,
      self.tx,
      self.image_shape,
      key,
      t_history_size=self.schedule.num_timesteps if importance_sampling else None,
      example_condition=self.prompt_condition([""]) if self.cond_kind != "none" else None,
    )

  def grid_prompts(self, num_images: int):
    """What a training-time sample grid shows: (prompts or None, condition or None, count).

    An unconditional model draws `num_images` images; a conditional one about as many, spread
    evenly over one prompt per class (at least one image each), with guidance as configured.
    """
    if self.cond_kind == "none":
      return None, None, num_images
    prompts = [text.class_caption(name) for name in self.class_names]
    per_prompt = max(1, num_images // len(prompts))
    condition = self.prompt_condition(prompts)
    condition = {k: np.repeat(v, per_prompt, axis=0) for k, v in condition.items()}
    return prompts, condition, per_prompt * len(prompts)

  def prompt_condition(self, prompts: list[str]) -> dict[str, np.ndarray]:
    """The condition of each prompt: token ids (text), or the label of the class it names.

    An empty prompt is the null condition (an unconditional sample). A text prompt with
    unknown words is used with a warning (`text.Tokenizer.encode`).

    Raises:
      ConfigError: a class-conditional model is given a prompt that names no class.
    """
    if self.cond_kind == "text":
      return {"tokens": self.tokenizer.encode(prompts)}
    if self.cond_kind == "class":
      try:
        return {"labels": conditioning.class_labels(prompts, self.class_names)}
      except ValueError as e:
        raise ConfigError(f"sample.prompt: {e}") from e
    if any(prompts):
      raise ConfigError("sample.prompt: this model is unconditional; it takes no prompt")
    return {}

  def abstract_state(self) -> TrainState:
    """The state's shapes and dtypes, replicated over the mesh, without computing anything."""
    shapes = jax.eval_shape(self.init_state, jax.random.key(0))
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
      guidance_scale=float(sample.get("guidance_scale", 1.0)),
      num_classes=self.num_classes,
      microbatch=self.config.model.get("microbatch", 0),
      **options,
    )


def compile_train_step(run: Run, num_seeds: int | None = None, steps_per_call: int = 1):
  """`train_step` jitted over the mesh: (state, batch, train_key) -> (state, metrics).

  With `steps_per_call` = k > 1 the function is (state, batches, n, train_key) -> (state,
  metrics): it runs n <= k steps in one dispatch (a loop on the device), on batches[:n] of a
  leading axis of k batches, and returns the metrics of the last. Its result does not depend on
  how the steps are split into calls: n = 1 k times is bitwise n = k once (one executable runs
  every step). Against the plain step (k = 1), which XLA compiles as a program of its own, it
  agrees up to float rounding.

  The state is donated and replicated, the batch sharded over the "data" axis, the metrics
  replicated. With `num_seeds` = K, the step is vmapped over a leading seed axis of the state,
  the batch ([K, B, ...], sharded on axis 1), the train key ([K]) and the metrics: K models
  train in one program, each exactly as its own single-seed run would up to float rounding.
  `train.seed_batching` says whether the seed axis is vmapped or unrolled (K copies of the step;
  lax.map, the loop XLA would not unroll, runs the step about 9x slower per seed on a CPU).
  """
  step = lambda state, batch, key: train_step(
    state,
    batch,
    key,
    model=run.model,
    schedule=run.schedule,
    tx=run.tx,
    train_config=run.config.train,
    prediction=run.config.diffusion.prediction,
    loss_type=run.config.diffusion.get("loss", "simple"),
    variance=run.config.diffusion.variance,
    vlb_weight=run.config.diffusion.get("vlb_weight", 0.001),
    cond_kind=run.cond_kind,
    cond_drop_prob=run.config.train.get("cond_drop_prob", 0.0),
    num_classes=run.num_classes,
    param_norm=False,
  )
  if num_seeds:
    step = jax.vmap(step) if seed_batching(run.config) == "vmap" else _unrolled(step, num_seeds)
  batch_sharding = parallel.batch_sharded(run.mesh, axis=1 if num_seeds else 0)
  in_shardings = (parallel.replicated(run.mesh), batch_sharding, None)
  if steps_per_call > 1:
    step = _looped(step)
    batch_sharding = parallel.batch_sharded(run.mesh, axis=2 if num_seeds else 1)
    in_shardings = (parallel.replicated(run.mesh), batch_sharding, None, None)
  return jax.jit(
    _with_param_norm(step, num_seeds),
    donate_argnums=(0,),
    in_shardings=in_shardings,
    out_shardings=(parallel.replicated(run.mesh), parallel.replicated(run.mesh)),
  )


def _with_param_norm(step, num_seeds: int | None):
  """`step` with the metric param_norm of the state it returns (per seed with `num_seeds`).

  Computed once per call: in a loop of k steps, only the last step's metrics are returned.
  """
  norm = jax.vmap(global_norm) if num_seeds else global_norm

  def with_norm(*args):
    state, metrics = step(*args)
    return state, {**metrics, "param_norm": norm(state.params)}

  return with_norm


def _looped(step):
  """(state, [k] batches, n, key) -> `step` applied to batches[0], ..., batches[n - 1]."""

  def looped(state, batches, num_steps, train_key):
    def body(i, carry):
      batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), batches)
      return step(carry[0], batch, train_key)

    first = jax.tree.map(lambda x: x[0], batches)
    metrics = jax.tree.map(
      lambda m: jnp.zeros(m.shape, m.dtype), jax.eval_shape(step, state, first, train_key)[1]
    )
    return jax.lax.fori_loop(0, num_steps, body, (state, metrics))

  return looped


def steps_to_event(step: int, train_config: ml_collections.ConfigDict) -> int:
  """Steps from `step` to the next one that logs, saves, samples or ends (>= 1)."""
  periods = [train_config.log_every, train_config.checkpoint_every, train_config.sample_every]
  gaps = [p - step % p for p in periods if p > 0]
  return max(1, min([*gaps, train_config.num_steps - step]))


def _unrolled(step, num_seeds: int):
  """`step` applied to each of the `num_seeds` slices of a leading seed axis, in one program."""

  def unrolled(*args):
    outputs = [step(*jax.tree.map(lambda x, i=i: x[i], args)) for i in range(num_seeds)]
    return jax.tree.map(lambda *x: jnp.stack(x), *outputs)

  return unrolled


def make_run(config: ml_collections.ConfigDict) -> Run:
  """Validates `config` and builds everything that does not depend on the data or the state."""
  mesh = parallel.make_mesh()
  check_config(config, mesh)
  image_size = config.data.image_size
  cond_kind = condition_kind(config.model)
  if config.train.get("steps_per_call", 1) > 1 and jax.default_backend() == "cpu":
    logging.warning(
      "train.steps_per_call=%d on a CPU: XLA:CPU runs the convolution gradients inside the "
      "step loop on a slow path (about 15x slower steps, benchmarks/RESULTS.md); it pays off "
      "on GPUs and TPUs only. Set --config.train.steps_per_call=1 here.",
      config.train.steps_per_call,
    )
  tokenizer, class_names = None, ()
  if cond_kind != "none":
    source = data.make_source(config.data)
    class_names = tuple(source.class_names)
    if cond_kind == "class" and config.model.num_classes != source.num_classes:
      raise ConfigError(
        f"model.num_classes={config.model.num_classes} but data.dataset="
        f"{config.data.dataset!r} has {source.num_classes} classes; set model.num_classes="
        f"{source.num_classes}"
      )
    if cond_kind == "text":
      if config.data.random_flip and hasattr(source, "caption"):
        logging.warning(
          "data.random_flip=True with captions that name positions: a flipped image keeps the "
          "caption of the unflipped one, so 'left' and 'right' are wrong for half of them; set "
          "--config.data.random_flip=false"
        )
      tokenizer = text.tokenizer_for(source, config.model.text.max_length)
      if len(tokenizer) > config.model.text.vocab_size:
        raise ConfigError(
          f"model.text.vocab_size={config.model.text.vocab_size} is smaller than the "
          f"{len(tokenizer)} tokens of the captions of data.dataset={config.data.dataset!r}; "
          f"set it to at least {len(tokenizer)}"
        )
  return Run(
    config=config,
    model=make_model(config.model),
    schedule=schedule_from_config(config.diffusion),
    mesh=mesh,
    tx=make_optimizer(config.train),
    image_shape=(image_size, image_size, 3),
    cond_kind=cond_kind,
    num_classes=int(config.model.get("num_classes", 0)),
    tokenizer=tokenizer,
    class_names=class_names,
  )


def restore_or_init(run: Run, store: checkpoints.CheckpointStore) -> TrainState:
  """The latest readable checkpoint's state, or a fresh one from the init stream."""
  return restore_or_init_seeds(run, [store], [run.config.seed])[0]


def restore_or_init_seeds(
  run: Run, stores: list[checkpoints.CheckpointStore], seeds: list[int]
) -> list[TrainState]:
  """One state per seed: all from the newest step every store holds, or all fresh.

  Raises:
    ConfigError: some seeds have checkpoints and others none.
  """
  abstract = run.abstract_state()
  try:
    restored = checkpoints.restore_latest_common(stores, flax.serialization.to_state_dict(abstract))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if restored is not None:
    step, state_dicts, _ = restored
    logging.info("resumed from the checkpoint at step %d", step)
    return [flax.serialization.from_state_dict(abstract, d) for d in state_dicts]
  init = jax.jit(
    run.init_state,
    out_shardings=parallel.replicated(run.mesh),
  )
  return [init(rng.stream_key(seed, rng.INIT)) for seed in seeds]


def _host_metrics(metrics: dict[str, jax.Array], num_seeds: int | None) -> list[dict[str, float]]:
  """One dict of floats per seed (metrics with a leading seed axis when `num_seeds`)."""
  values = jax.device_get(metrics)
  if not num_seeds:
    return [{k: float(v) for k, v in values.items()}]
  return [{k: float(v[i]) for k, v in values.items()} for i in range(num_seeds)]


@dataclasses.dataclass
class _Member:
  """One seed of a run: a single run is one member in WORKDIR; a seed study has K members,
  seed s in WORKDIR/seed_<s>, each with its own checkpoints, metrics, data order and keys."""

  seed: int
  workdir: str
  config: ml_collections.ConfigDict


def _members(config: ml_collections.ConfigDict, workdir: str) -> list[_Member]:
  seeds = study_seeds(config)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes training) until `config.train.num_steps`, writing into `workdir`.

  With `config.seeds` set, trains one model per seed in one vmapped program, seed s in
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
  run = make_run(config)
  train_config = config.train
  members = _members(config, workdir)
  study = study_seeds(config) is not None
  num_seeds = len(members) if len(members) > 1 else None  # None: no seed axis
  source = data.make_source(config.data)  # Fails early, with a one-line error, on bad data.
  logging.info("data: %s with %d examples", config.data.dataset, len(source))
  _write_config(config, workdir)
  for member in members if study else []:
    _write_config(member.config, member.workdir)

  stores = [
    checkpoints.CheckpointStore(
      os.path.join(m.workdir, "checkpoints"), keep=train_config.keep_checkpoints
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
    f", {num_seeds} seeds trained together ({seed_batching(config)})" if num_seeds else "",
    start_step,
  )

  steps_per_call = train_config.get("steps_per_call", 1)
  step_fn = compile_train_step(run, num_seeds, steps_per_call)
  train_keys = [rng.stream_key(m.seed, rng.TRAIN) for m in members]
  train_key = jnp.stack(train_keys) if num_seeds else train_keys[0]
  sample_fn = None
  iterators = [
    data.make_train_iterator(
      config.data,
      global_batch_size=train_config.batch_size,
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
  writers = [MetricWriter(m.workdir) for m in members]
  progress = tqdm.tqdm(
    total=train_config.num_steps,
    initial=start_step,
    unit="step",
    dynamic_ncols=True,
    disable=not train_config.progress or jax.process_index() != 0,
    mininterval=1.0,
  )
  last = [{} for _ in members]
  step = start_step
  previous_loss = None
  stopped_by = None
  with contextlib.ExitStack() as cleanup:
    # Undone in reverse order, also on errors: pending checkpoint saves finish before the exit,
    # and the signal handlers stay until then.
    stop = cleanup.enter_context(interrupts.stop_on_signals())
    for writer, store in zip(writers, stores, strict=True):
      cleanup.callback(writer.close)
      cleanup.callback(store.close)
    cleanup.callback(progress.close)
    while step < train_config.num_steps:
      # Up to k steps in one call, ending at the next step that logs, saves or samples.
      n = min(steps_per_call, steps_to_event(step, train_config))
      if steps_per_call > 1:
        # k batches on a leading axis; the call runs the first n (the rest repeat the first).
        rows = [next(iterators[0]) for _ in range(n)]
        rows += rows[:1] * (steps_per_call - n)
        batch = {f: np.stack([row[f] for row in rows]) for f in fields}
        batch = parallel.put_batch(batch, run.mesh, axis=1)
        state, metrics = step_fn(state, batch, n, train_key)
      else:
        batches = [next(it) for it in iterators]
        batch = {
          f: np.stack([b[f] for b in batches]) if num_seeds else batches[0][f] for f in fields
        }
        batch = parallel.put_batch(batch, run.mesh, axis=1 if num_seeds else 0)
        state, metrics = step_fn(state, batch, train_key)
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
      # Several processes agree on stopping only at steps where the host waits anyway.
      if jax.process_count() == 1 or log_now or save_now:
        stopped_by = None if is_last else interrupts.stop_agreed(stop)
      if stopped_by:
        # Finish this step: log it and save it (once), but skip its samples to exit quickly.
        log_now = save_now = True
        sample_now = False
      if log_now or save_now:
        last = _host_metrics(metrics, num_seeds)
        for member, values, writer in zip(members, last, writers, strict=True):
          if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(
              f"non-finite training metrics at step {step}"
              f"{f' of seed {member.seed}' if study else ''}: {values}; the last checkpoint "
              f"(step {stores[0].latest_step()}) is kept. Lower train.learning_rate or check "
              f"the data."
            )
          writer.write(step, values)
        losses = [values["loss"] for values in last]
        progress.set_postfix(loss=f"{np.mean(losses):.4f}", refresh=False)
      if save_now:
        for i, (member, store) in enumerate(zip(members, stores, strict=True)):
          member_state = _take_seed(state, i) if num_seeds else state
          store.save(
            step, flax.serialization.to_state_dict(member_state), _meta(member.config, step)
          )
      if (sample_now or is_last) and train_config.num_grid_samples > 0:
        sample_fn = sample_fn or run.sample_fn()
        prompts, condition, count = run.grid_prompts(train_config.num_grid_samples)
        for i, member in enumerate(members):
          _say(progress, f"sampling {count} images at step {step}")
          ema_params = _take_seed(state.ema_params, i) if num_seeds else state.ema_params
          samples = sampling.generate(
            sample_fn,
            ema_params,
            rng.stream_key(member.seed, rng.SAMPLE),
            count,
            config.sample.batch_size,
            condition,
          )
          png, _ = sampling.write_samples(
            member.workdir, f"step_{step:07d}", samples, prompts=prompts
          )
          _say(progress, f"wrote {png}")
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
  seeds = study_seeds(config)
  num_steps = config.train.num_steps
  source = source or data.make_source(config.data)
  key = rng.stream_key(config.seed, rng.EVAL)
  per_seed = {}
  for seed in seeds:
    member = studies.member_workdir(workdir, seed)
    figures = studies.training_figures(member, num_steps)
    npz = os.path.join(member, "samples", f"step_{num_steps:07d}.npz")
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
