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

from diffusion_jax.models.attention import attention
from diffusion_jax.models.layers import group_norm

# diffusers' Transformer2DModel: GroupNorm epsilon 1e-6, LayerNorm epsilon 1e-5.
_GROUPNORM_EPS = 1e-6
_LAYERNORM_EPS = 1e-5


def _dense(features: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(_LAYERNORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
  """Multi-head attention of queries x to keys and values from `context` (x itself when None):
  bias-free q, k, v projections, softmax(q k^T / sqrt(d)) v, and an output projection with bias.

  Attributes:
    num_heads: heads; must divide the width of x.
    dtype: compute dtype; the softmax runs in float32.
    impl: "plain" or "fused" (`attention.attention`).
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
    out = attention(q, k, v, None, self.dtype, self.impl).reshape(b, length, c)
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
