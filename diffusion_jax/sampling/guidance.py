"""Conditions as model inputs: labels or prompt tokens, their dropout, and classifier-free guidance.

A condition is a dict of per-example arrays passed to the network as keyword arguments:
{"labels": [B] int32} for a class-conditional network, {"tokens": [B, L] int32} for a
text-conditional one, {} for an unconditional one. The "null" condition (label `num_classes`, or
the empty prompt [START, PAD, ...]) stands for "no condition": training puts it in place of the
real one with probability `cond.drop_prob`, and guidance (Ho & Salimans 2022) extrapolates from
it: out = out(x, ∅) + w (out(x, c) - out(x, ∅)).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import text
from diffusion_jax.models import CONDITIONING

Condition = dict[str, jax.Array]
# Inputs of a super-resolution model that are part of the image, not of the prompt.
IMAGE_INPUTS = ("low_res", "aug_level")

# Separates the condition-dropout draws from the other per-example draws of a train step.
_DROP_STREAM = 0xC0DD


def from_batch(kind: str, batch: dict) -> Condition:
  """The condition of a data batch ("label" -> labels, "tokens" -> tokens) for a `kind` network."""
  if kind not in CONDITIONING:
    raise ValueError(f"conditioning {kind!r} is unknown; valid: {', '.join(CONDITIONING)}")
  if kind == "class":
    return {"labels": jnp.asarray(batch["label"], jnp.int32)}
  if kind == "text":
    return {"tokens": jnp.asarray(batch["tokens"], jnp.int32)}
  return {}


def class_labels(prompts: list[str], class_names: list[str]) -> np.ndarray:
  """The label each prompt names: a class name ("cat") or its caption ("a cat"), any case; ""
  is the null label len(class_names).

  Raises:
    ValueError: a prompt names no class.
  """
  names = {n.lower(): i for i, n in enumerate(class_names)}
  names.update({text.class_caption(n).lower(): i for n, i in list(names.items())})
  labels = []
  for prompt in prompts:
    key = " ".join(prompt.lower().split())
    if key and key not in names:
      raise ValueError(
        f"{prompt!r} names no class of this class-conditional model; use one of: "
        f'{", ".join(class_names)} (or "" for an unconditional sample)'
      )
    labels.append(names.get(key, len(class_names)))
  return np.asarray(labels, np.int32)


def null_like(cond: Condition, num_classes: int = 0) -> Condition:
  """The "no condition" of the same shapes: label `num_classes`, or the empty prompt. A
  super-resolution model's image inputs ("low_res", "aug_level") stay: Imagen drops only the
  labels or the prompt, in training and in guidance."""
  out = {}
  for name, value in cond.items():
    if name == "labels":
      out[name] = jnp.full_like(value, num_classes)
    elif name == "tokens":
      out[name] = jnp.zeros_like(value).at[:, 0].set(text.START_ID)
    elif name in IMAGE_INPUTS:
      out[name] = value
    else:
      raise ValueError(f"unknown condition input {name!r}")
  return out


def drop(cond: Condition, keys: jax.Array, prob: float, num_classes: int = 0) -> Condition:
  """Replaces example j's condition by the null one with probability `prob`, drawn from keys[j].

  Args:
    cond: the batch's condition, arrays with leading axis B.
    keys: [B] per-example keys (the draw uses a stream of its own folded into each).
    prob: the dropout probability in [0, 1].
    num_classes: the null label.

  Returns:
    The condition with the dropped examples replaced.
  """
  if not cond or prob <= 0:
    return cond
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _DROP_STREAM)))(keys)
  dropped = u < prob
  null = null_like(cond, num_classes)

  def select(c, n):
    return jnp.where(dropped.reshape(-1, *([1] * (c.ndim - 1))), n, c)

  return jax.tree.map(select, cond, null)


def guided(
  apply_fn: Callable[..., jax.Array],
  cond: Condition,
  scale: float,
  *,
  num_classes: int = 0,
  data_channels: int = 3,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A denoise_fn(x_t, t) with classifier-free guidance of strength `scale`.

  Args:
    apply_fn: (x_t, t, **condition) -> the network's output [B, ..., C'] with C' = data_channels
      (the prediction) or 2 * data_channels (the prediction and the learned variance value).
    cond: the condition of the B examples; {} gives the unconditional model.
    scale: the guidance weight w (a Python float): 1 is the conditional model, 0 the
      unconditional one, > 1 extrapolates away from the unconditional prediction.
    num_classes: the null label of a class-conditional network.
    data_channels: C; only the first C output channels (the prediction) are guided, a learned
      variance comes from the conditional output.

  Returns:
    denoise_fn(x_t [B, ...], t [B]) -> [B, ..., C']. Scales 0 and 1 cost one network call per
    step; other scales one call on a batch of 2B (conditional and unconditional together).
  """
  if not cond or scale == 1.0:
    return lambda x_t, t: apply_fn(x_t, t, **cond)
  null = null_like(cond, num_classes)
  if scale == 0.0:
    return lambda x_t, t: apply_fn(x_t, t, **null)
  both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null)

  def denoise_fn(x_t, t):
    out = apply_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), **both)
    out_c, out_u = jnp.split(out, 2)
    return combine(out_c, out_u, scale, data_channels)

  return denoise_fn


def combine(out_c: jax.Array, out_u: jax.Array, scale: float, data_channels: int) -> jax.Array:
  """out_u + w (out_c - out_u) on the prediction channels; extra channels from out_c."""
  mean = out_u[..., :data_channels] + scale * (
    out_c[..., :data_channels] - out_u[..., :data_channels]
  )
  return jnp.concatenate([mean, out_c[..., data_channels:]], axis=-1)
