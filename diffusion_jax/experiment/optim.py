"""The optimizer: Adam after global-norm clipping, on a warm-up / cool-down learning rate."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.experiment.settings import TrainSettings


def learning_rate_schedule(train_config: TrainSettings) -> optax.Schedule:
  """step (0-based) -> learning rate: linear warm-up from 0, constant, optional linear cool-down.

  The cool-down (train.cooldown_steps > 0) ends at 0 at step train.num_steps, so it depends on
  num_steps: a run resumed with a larger num_steps follows the new schedule from there on.
  """
  lr = train_config.learning_rate
  warmup = max(train_config.warmup_steps, 0)
  cooldown = min(max(train_config.cooldown_steps, 0), train_config.num_steps)

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

  One concatenation summed in one reduction, rather than a reduction per leaf (hundreds of tiny
  kernels on a GPU); the update then reads the gradients from the copy, in the leaves' own order.
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


def make_optimizer(train_config: TrainSettings) -> optax.GradientTransformation:
  """Adam on `learning_rate_schedule`, after global-norm clipping.

  `update` takes the keyword `grad_norm`: the gradients' global norm, when the caller has it.
  """
  lr = learning_rate_schedule(train_config)
  adam = optax.adam(lr, b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps)
  if train_config.grad_clip > 0:
    return optax.chain(clip_by_global_norm(train_config.grad_clip), adam)
  return optax.with_extra_args_support(adam)
