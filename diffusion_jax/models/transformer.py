"""The spatial Transformer of Stable Diffusion's U-Net (LDM's SpatialTransformer, diffusers'
Transformer2DModel with its BasicTransformerBlock).

GroupNorm -> 1x1 projection in -> per position: LayerNorm -> self-attention, LayerNorm ->
cross-attention to the context, LayerNorm -> GEGLU feed-forward, each added back -> 1x1
projection out -> added to the input. Module names are diffusers' (`attn1`, `to_out_0`,
`ff/net_0/proj`), so the weight map of `pretrained/` is a respelling.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models.layers import group_norm

# diffusers' Transformer2DModel: GroupNorm epsilon 1e-6, LayerNorm epsilon 1e-5.
_GROUPNORM_EPS = 1e-6
_LAYERNORM_EPS = 1e-5
# The attentions of the spatial Transformer: `attention.attention`'s, and `chunked_attention`.
ATTENTION_IMPLS = (*attention_lib.ATTENTION_IMPLS, "chunked")
# Logits per block of `chunked_attention` (8 MiB in float32: 512 queries against 4096 keys).
_BLOCK_LOGITS = 2**21


def _dense(features: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(_LAYERNORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def chunked_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, dtype, block_logits: int = _BLOCK_LOGITS
) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v, one head and one block of queries at a time.

  A loop over the heads (`lax.map`) and, within a head, over blocks of queries: only one block's
  [block, K] logits exist at a time, never a layer's [B, N, Q, K]. Each block's weights are
  exp(logits - max), normalised after the product with v. The same function as
  `attention.attention` up to float rounding (logits, softmax and sums in float32). On a CPU it
  is the fastest of the three at Stable Diffusion's 4096-token self-attention, where a block's
  logits stay in cache (benchmarks/results/pretrained_speed.md).

  Args:
    q: [B, Q, N, D] queries of N heads; k, v: [B, K, N, D].
    dtype: dtype of the weights and the output.
    block_logits: logits per block; a block has block_logits // K queries (at least one).

  Returns:
    [B, Q, N, D].
  """
  b, length, n, d = q.shape
  block = max(1, block_logits // k.shape[1])
  by_head = lambda y: jnp.moveaxis(y, 2, 1).reshape(b * n, y.shape[1], d)

  def one_head(qkv):
    q, k, v = qkv
    outs = []
    for start in range(0, length, block):
      logits = jnp.einsum(
        "qd,kd->qk", q[start : start + block], k, preferred_element_type=jnp.float32
      )
      logits = logits * d**-0.5
      weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
      out = jnp.einsum("qk,kd->qd", weights.astype(dtype), v, preferred_element_type=jnp.float32)
      outs.append(out / weights.sum(-1, keepdims=True))
    return jnp.concatenate(outs).astype(dtype)

  out = jax.lax.map(one_head, (by_head(q), by_head(k), by_head(v)))
  return jnp.moveaxis(out.reshape(b, n, length, d), 1, 2)


class Attention(nn.Module):
  """Multi-head attention of queries x to keys and values from `context` (x itself when None):
  bias-free q, k, v projections, softmax(q k^T / sqrt(d)) v, and an output projection with bias.

  Attributes:
    num_heads: heads; must divide the width of x.
    dtype: compute dtype; the softmax runs in float32.
    impl: "plain" or "fused" (`attention.attention`), or "chunked" (`chunked_attention`).
  """

  num_heads: int
  dtype: jnp.dtype = jnp.float32
  impl: str = "plain"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x: [B, Q, C]; context: [B, K, D] or None -> [B, Q, C]."""
    b, length, c = x.shape
    context = x if context is None else context.astype(self.dtype)
    split = lambda y: y.reshape(b, y.shape[1], self.num_heads, c // self.num_heads)
    q = split(_dense(c, self.dtype, "to_q", use_bias=False)(x))
    k = split(_dense(c, self.dtype, "to_k", use_bias=False)(context))
    v = split(_dense(c, self.dtype, "to_v", use_bias=False)(context))
    if self.impl == "chunked":
      out = chunked_attention(q, k, v, self.dtype)
    else:
      out = attention_lib.attention(q, k, v, None, self.dtype, self.impl)
    out = out.reshape(b, length, c)
    return _dense(c, self.dtype, "to_out_0")(out)


class GEGLU(nn.Module):
  """A projection to 2 x `features`, one half gating the other through the exact (erf) GELU."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., features]."""
    hidden, gate = jnp.split(_dense(2 * self.features, self.dtype, "proj")(x), 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """The feed-forward of the Transformer blocks: GEGLU to 4C, then a projection back to C."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C]."""
    c = x.shape[-1]
    return _dense(c, self.dtype, "net_2")(GEGLU(4 * c, self.dtype, name="net_0")(x))


class TransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU, each with a residual.

  Attributes:
    num_heads: attention heads of both attentions.
    dtype: compute dtype.
    impl: the attention's implementation.
  """

  num_heads: int
  dtype: jnp.dtype = jnp.float32
  impl: str = "plain"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, L, C]; context: [B, K, D] -> [B, L, C]."""
    attn = lambda name: Attention(self.num_heads, self.dtype, self.impl, name=name)
    x = x + attn("attn1")(_layer_norm(self.dtype, "norm1")(x))
    x = x + attn("attn2")(_layer_norm(self.dtype, "norm2")(x), context)
    return x + FeedForward(self.dtype, name="ff")(_layer_norm(self.dtype, "norm3")(x))


class SpatialTransformer(nn.Module):
  """Transformer blocks over the positions of a feature map, conditioned on a context sequence.

  Attributes:
    num_heads: attention heads; must divide the channels.
    num_layers: Transformer blocks.
    num_groups: groups of the input GroupNorm.
    dtype: compute dtype.
    impl: the attention's implementation.
  """

  num_heads: int
  num_layers: int = 1
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  impl: str = "plain"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, H, W, C]; context: [B, K, D] -> [B, H, W, C] in `dtype`."""
    b, height, width, c = x.shape
    h = group_norm(self.num_groups, self.dtype, "norm", epsilon=_GROUPNORM_EPS)(x)
    h = _dense(c, self.dtype, "proj_in")(h).reshape(b, height * width, c)
    for i in range(self.num_layers):
      block = TransformerBlock(
        self.num_heads, self.dtype, self.impl, name=f"transformer_blocks_{i}"
      )
      h = block(h, context)
    h = _dense(c, self.dtype, "proj_out")(h).reshape(b, height, width, c)
    return (x + h).astype(self.dtype)
