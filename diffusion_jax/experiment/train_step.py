"""The train state and the pure train step, jitted over the mesh (one step or several per call).

Every random number of step s for example j of the global batch comes from
fold_in(fold_in(train_key, s), j), so a resumed run repeats the uninterrupted one and the draws
do not depend on how the batch is split over devices.
"""

from typing import TYPE_CHECKING, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffusion_jax import data
from diffusion_jax.core import importance, losses, rng, super_resolution
from diffusion_jax.core.schedules import Schedule
from diffusion_jax.experiment.optim import flat_copy_and_norm, global_norm, learning_rate_schedule
from diffusion_jax.experiment.settings import TrainSettings
from diffusion_jax.runtime import parallel
from diffusion_jax.sampling import guidance

if TYPE_CHECKING:
  from diffusion_jax.experiment.run import Run


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, train steps taken
  params: Any  # model parameters, float32
  ema_params: Any  # exponential moving average of params, used for sampling
  opt_state: optax.OptState
  # diffusion.t_sampling="importance": the recent losses at each t (importance.LossHistory);
  # None for uniform t.
  t_history: Any = None
  # An autoencoder trained with a discriminator (`adversarial.py`): {"params", "opt_state"} of D.
  discriminator: Any = None


def init_state(
  model: nn.Module,
  tx,
  image_shape,
  key: jax.Array,
  *,
  t_history_size: int | None = None,
  example_condition: guidance.Condition | None = None,
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


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  train_key: jax.Array,
  *,
  model: nn.Module,
  schedule: Schedule,
  tx: optax.GradientTransformation,
  train_config: TrainSettings,
  prediction: str = "eps",
  loss_type: str = "simple",
  variance: str = "fixed_large",
  vlb_weight: float = 0.001,
  cond_kind: str = "none",
  cond_drop_prob: float = 0.0,
  num_classes: int = 0,
  low_res_size: int = 0,
  max_aug_level: float = 1.0,
  param_norm: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the training loss; pure.

  Args:
    state: the current state (donated by the caller). With `state.t_history`, t is drawn by
      importance sampling from it (and it records this step's losses); otherwise uniformly.
    batch: "image" uint8 [B, H, W, C], the global batch sharded over devices; a conditional
      model also reads "label" [B] int32 or "tokens" [B, L] int32 (see `guidance.from_batch`).
    train_key: the run's train stream key; this step uses fold_in(train_key, state.step).
    model, schedule, tx, train_config: static parts of the step.
    prediction: what the model predicts, one of diffusion.PREDICTIONS.
    loss_type, variance, vlb_weight: the loss (`losses.LOSS_TYPES`), the reverse variance it
      assumes and λ of the hybrid loss.
    cond_kind: what the model is conditioned on (`models.CONDITIONING`).
    cond_drop_prob: the probability that an example's condition is replaced by the null one
      (drawn from the example's key), which trains the unconditional model for guidance.
    num_classes: the null label of a class-conditional model.
    low_res_size: > 0 trains a super-resolution model (model.low_res_size): its low-resolution
      input is the batch's image averaged over blocks (`super_resolution.downsample`) and noised
      to a level s ~ U[0, max_aug_level] drawn from the example's key (`super_resolution.augment`).
    max_aug_level: the largest augmentation level drawn (sr.max_train_aug_level).
    param_norm: include the metric param_norm (one pass over the parameters); the jitted step
      of `compile_train_step` adds it once per call instead.

  Returns:
    (new state, metrics): metrics are float32 scalars loss, grad_norm, param_norm (the new
    parameters'), lr, and for the hybrid and vlb losses mse and/or vlb (bits/dim of the sampled
    term).
  """
  # A latent run's batch holds the scaled latents of its images (`latent.LatentSpace.encode`).
  x0 = batch["latent"] if "latent" in batch else data.normalize_images(batch["image"])
  step_key = jax.random.fold_in(train_key, state.step)
  # One key per example from its index in the global batch: t, eps and the dropout masks of
  # example j are the same whatever device it lands on, and the same as if the network ran on
  # example j alone (the U-Net draws each example's masks from its own key).
  keys = rng.example_keys(step_key, jnp.arange(x0.shape[0]))
  loss_keys, dropout_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  cond = guidance.from_batch(cond_kind, batch)
  cond = guidance.drop(cond, keys, cond_drop_prob, num_classes)
  if low_res_size:
    # Never dropped: the unconditional model of guidance still sees the low-resolution image.
    low_res = super_resolution.downsample(x0, x0.shape[1] // low_res_size)
    cond = {**cond, **super_resolution.augment(low_res, keys, max_level=max_aug_level)}
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
  new_state, metrics = apply_gradients(state, grads, tx, train_config, param_norm)
  if state.t_history is not None:
    t_history = importance.update(state.t_history, terms["t"], terms["loss"])
    new_state = new_state.replace(t_history=t_history)
  metrics = {"loss": loss, **metrics}
  if loss_type != "simple":
    metrics.update({name: jnp.mean(terms[name]) for name in ("mse", "vlb") if name in terms})
  return new_state, metrics


def apply_gradients(
  state: TrainState, grads, tx, train_config: TrainSettings, param_norm: bool = True
) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer and EMA update of a step from the loss gradients.

  Returns:
    (the state at step + 1, metrics grad_norm, lr and, with `param_norm`, param_norm).
  """
  grads, grad_norm = flat_copy_and_norm(grads)
  extra = {"grad_norm": grad_norm} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}
  updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  # EMA with the usual warm-up, min(decay, (1 + s) / (10 + s)), so early samples are usable.
  decay = jnp.minimum(train_config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
  new_state = state.replace(
    step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
  )
  metrics = {
    "grad_norm": grad_norm,
    "lr": jnp.asarray(learning_rate_schedule(train_config)(state.step), jnp.float32),
  }
  if param_norm:
    metrics["param_norm"] = global_norm(params)
  return new_state, metrics


def _uses_dropout(model: nn.Module) -> bool:
  """Whether `model` draws dropout masks in training (unknown models: assume it does)."""
  config = getattr(model, "config", None)
  return getattr(config, "dropout", 1.0) > 0


def compile_train_step(run: "Run", num_seeds: int | None = None, steps_per_call: int = 1):
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
    train_config=run.train,
    prediction=run.diffusion.prediction,
    loss_type=run.diffusion.loss,
    variance=run.diffusion.variance,
    vlb_weight=run.diffusion.vlb_weight,
    cond_kind=run.cond_kind,
    cond_drop_prob=run.train.cond_drop_prob,
    num_classes=run.num_classes,
    low_res_size=run.low_res_size,
    max_aug_level=run.sr.max_train_aug_level if run.low_res_size else 1.0,
    param_norm=False,
  )
  frozen = None  # inputs the step reads but never changes, passed as its last argument
  if run.pretrained is not None:
    from diffusion_jax.experiment import finetune  # It builds on this module.

    step, frozen = finetune.make_step(run)
  if run.is_autoencoder:
    from diffusion_jax.experiment import autoencoder  # It builds on this module.

    step, frozen = autoencoder.make_step(run)
  if frozen is not None:  # one seed, one step per call (autoencoder.check_config)
    replicated = parallel.replicated(run.mesh)
    jitted = jax.jit(
      _with_param_norm(step, None),
      donate_argnums=(0,),
      in_shardings=(replicated, parallel.batch_sharded(run.mesh), None, replicated),
      out_shardings=(replicated, replicated),
    )
    frozen = jax.device_put(frozen, replicated)
    return lambda state, batch, key: jitted(state, batch, key, frozen)
  if num_seeds:
    step = jax.vmap(step) if run.train.seed_batching == "vmap" else _unrolled(step, num_seeds)
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


def _unrolled(step, num_seeds: int):
  """`step` applied to each of the `num_seeds` slices of a leading seed axis, in one program."""

  def unrolled(*args):
    outputs = [step(*jax.tree.map(lambda x, i=i: x[i], args)) for i in range(num_seeds)]
    return jax.tree.map(lambda *x: jnp.stack(x), *outputs)

  return unrolled
