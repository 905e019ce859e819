"""Self- and cross-attention: the attention function and the blocks of the U-Net."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.fast import FastPaths
from diffusion_jax.models.fast.skips import residual
from diffusion_jax.models.layers import dense, group_norm

ATTENTION_IMPLS = ("plain", "fused")


def _cudnn_attention(q, k, v, mask) -> jax.Array | None:
  """cuDNN's flash attention of q, k, v ([B, T, N, D]), or None where cuDNN does not take them."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return None
  try:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  except (NotImplementedError, RuntimeError, ValueError):  # no cuDNN, or shapes it lacks
    return None


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  dtype,
  impl: str = "plain",
  flash: bool = False,
) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head.

  Args:
    q: [B, Q, N, D] queries of N heads; k, v: [B, K, N, D].
    mask: [B, K] bool, the keys each query may attend to (at least one per row), or None (all).
    dtype: dtype of the weights and the output; the logits and the softmax are float32, so that a
      bfloat16 compute dtype does not flatten the softmax.
    impl: "plain" spells the two products and the softmax out; "fused" calls
      `jax.nn.dot_product_attention`: cuDNN's flash attention with `flash`
      and cuDNN takes the inputs (16-bit, head dim at most 256 on Hopper and later, 128 before;
      it never writes the [Q, K] weights), XLA's implementation otherwise. All keep the logits
      in float32; they agree up to float rounding.
    flash: with impl="fused", ask for cuDNN's flash attention (`FastPaths.flash_attention`).

  Returns:
    [B, Q, N, D].
  """
  if impl == "fused":
    mask = None if mask is None else mask[:, None, None, :]
    out = _cudnn_attention(q, k, v, mask) if flash else None
    if out is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return out.astype(dtype)
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bnqk,bknd->bqnd", weights, v)


class AttnBlock(nn.Module):
  """Multi-head self-attention over all spatial positions, with a residual connection.

  GroupNorm -> q, k, v (1x1 projections) -> softmax(q k^T / sqrt(d_head)) v per head ->
  1x1 output projection (zero-initialised) -> added to the input. With one head this is the
  original DDPM attention block.

  Attributes:
    num_heads: attention heads; must divide the channel count.
    num_groups: GroupNorm groups; must divide the channel count.
    dtype: compute dtype; the softmax runs in float32.
    attention_impl: "plain" or "fused" (`attention`).
    fast: the speed paths (`FastPaths`: GroupNorm, flash attention, the residual's gradient).
  """

  num_heads: int = 1
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "plain"
  fast: FastPaths = FastPaths()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C] activations.

    Returns:
      [B, H, W, C] activations in `dtype`.
    """
    b, height, width, c = x.shape
    head_dim = c // self.num_heads
    h = group_norm(self.num_groups, self.dtype, "norm", fast=self.fast)(x)

    def project(name):
      y = dense(c, self.dtype, name)(h)
      return y.reshape(b, height * width, self.num_heads, head_dim)

    q, k, v = project("q"), project("k"), project("v")
    out = attention(q, k, v, None, self.dtype, self.attention_impl, self.fast.flash_attention)
    out = out.reshape(b, height, width, c)
    out = dense(c, self.dtype, "proj_out", zero=True)(out)
    return residual(x, out, self.fast.hold_branch_gradient)


class CrossAttnBlock(nn.Module):
  """Multi-head attention from every spatial position to a sequence of context embeddings.

  GroupNorm -> q (1x1 projection of the image features); k, v (projections of the context) ->
  softmax(q k^T / sqrt(d_head)) v per head over the valid context tokens only -> output projection
  (zero-initialised) -> added to the input. Padded tokens are masked out of the softmax, so their
  values change nothing.

  Attributes:
    num_heads: attention heads; must divide the channel count.
    num_groups: GroupNorm groups; must divide the channel count.
    dtype: compute dtype; the softmax runs in float32.
    attention_impl: "plain" or "fused" (`attention`).
    fast: the speed paths (`FastPaths`: GroupNorm, flash attention, the residual's gradient).
  """

  num_heads: int = 1
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "plain"
  fast: FastPaths = FastPaths()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C] activations.
      context: [B, L, D] context embeddings (e.g. a text encoder's token embeddings).
      mask: [B, L] bool, True for the tokens to attend to; every row needs at least one.

    Returns:
      [B, H, W, C] activations in `dtype`.
    """
    b, height, width, c = x.shape
    head_dim = c // self.num_heads
    h = group_norm(self.num_groups, self.dtype, "norm", fast=self.fast)(x)
    q = dense(c, self.dtype, "q")(h).reshape(b, height * width, self.num_heads, head_dim)
    context = context.astype(self.dtype)
    k = dense(c, self.dtype, "k")(context).reshape(b, -1, self.num_heads, head_dim)
    v = dense(c, self.dtype, "v")(context).reshape(b, -1, self.num_heads, head_dim)
    out = attention(q, k, v, mask, self.dtype, self.attention_impl, self.fast.flash_attention)
    out = out.reshape(b, height, width, c)
    out = dense(c, self.dtype, "proj_out", zero=True)(out)
    return residual(x, out, self.fast.hold_branch_gradient)
