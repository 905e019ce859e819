"""CLIP's text Transformer, the text encoder of Stable Diffusion 1.x and 2.x, as a flax module.

The same function as transformers' `CLIPTextModel`: token + learned position embeddings, pre-
LayerNorm encoder layers (causal multi-head self-attention with biased q, k, v and output
projections, scale head_dim ** -0.5; MLP fc1 -> activation -> fc2), a final LayerNorm. No padding
mask: every token attends to itself and all tokens before it, padding included, as Stable
Diffusion runs it. The weights come from published files through `diffusion_jax.pretrained.clip`.

Parameters are float32; the compute dtype is `ClipTextConfig.dtype`, with the LayerNorm statistics
and the attention's logits and softmax in float32.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """The hyper-parameters of a CLIP text encoder (transformers' `CLIPTextConfig` fields).

  The defaults are Stable Diffusion 1.x's encoder (OpenAI's CLIP ViT-L/14); 2.x's is
  hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
  hidden_act="gelu".

  Attributes:
    vocab_size: rows of the token embedding table.
    hidden_size: width D of the token features.
    intermediate_size: hidden width of each layer's MLP.
    num_hidden_layers: encoder layers.
    num_attention_heads: attention heads; must divide hidden_size.
    max_position_embeddings: rows of the position table, the longest input.
    hidden_act: the MLP's activation: "quick_gelu" (x * sigmoid(1.702 x)) or "gelu" (exact, erf).
    layer_norm_eps: the LayerNorms' epsilon.
    eos_token_id: where the pooled output is read: 2 (transformers' value in older configs,
      Stable Diffusion's included) means at the largest token id, as OpenAI's CLIP did; any other
      id at the first occurrence of that id (at position 0 in a row without it).
    dtype: compute dtype name ("float32", "bfloat16", "float16"); parameters stay float32.
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  dtype: str = "float32"

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"ClipTextConfig.dtype={self.dtype!r} is not one of {_DTYPES}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
        f"ClipTextConfig.hidden_act={self.hidden_act!r} is not one of {ACTIVATIONS}."
      )
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"ClipTextConfig.{name}={getattr(self, name)} must be positive.")
    if self.num_hidden_layers < 0 or self.max_position_embeddings < 1:
      raise ValueError(
        f"ClipTextConfig: num_hidden_layers={self.num_hidden_layers} must be >= 0 and "
        f"max_position_embeddings={self.max_position_embeddings} positive."
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"ClipTextConfig.num_attention_heads={self.num_attention_heads} does not divide "
        f"hidden_size={self.hidden_size}."
      )


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, dtype) -> jax.Array:
  """softmax(q k^T / sqrt(d) + causal mask) v per head: query i sees keys 0..i.

  Args:
    q, k, v: [B, L, N, D] queries, keys and values of N heads.
    dtype: dtype of the output; the logits and the softmax are float32.

  Returns:
    [B, L, N, D].
  """
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  length = q.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  logits = jnp.where(causal, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bnqk,bknd->bqnd", weights, v.astype(dtype))


def _layer_norm(config: ClipTextConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=config.layer_norm_eps,
    dtype=jnp.dtype(config.dtype),
    use_fast_variance=False,
    name=name,
  )


class ClipAttention(nn.Module):
  """Causal multi-head self-attention with transformers' q_proj, k_proj, v_proj, out_proj."""

  config: ClipTextConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, D] in the compute dtype."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    b, length, width = x.shape
    heads = cfg.num_attention_heads

    def project(name):
      y = nn.Dense(width, dtype=dtype, name=name)(x)
      return y.reshape(b, length, heads, width // heads)

    out = causal_attention(project("q_proj"), project("k_proj"), project("v_proj"), dtype)
    return nn.Dense(width, dtype=dtype, name="out_proj")(out.reshape(b, length, width))


class ClipEncoderLayer(nn.Module):
  """x + attn(LayerNorm(x)), then h + MLP(LayerNorm(h)): transformers' `CLIPEncoderLayer`."""

  config: ClipTextConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, D] in the compute dtype."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = x + ClipAttention(cfg, name="self_attn")(_layer_norm(cfg, "layer_norm1")(x))
    y = _layer_norm(cfg, "layer_norm2")(h)
    y = nn.Dense(cfg.intermediate_size, dtype=dtype, name="fc1")(y)
    y = quick_gelu(y) if cfg.hidden_act == "quick_gelu" else jax.nn.gelu(y, approximate=False)
    return h + nn.Dense(cfg.hidden_size, dtype=dtype, name="fc2")(y)


class ClipTextModel(nn.Module):
  """transformers' `CLIPTextModel`: token ids -> the token features Stable Diffusion attends to.

  Parameters: `token_embedding/embedding` [V, D], `position_embedding/embedding` [P, D],
  `layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, fc1, fc2}`,
  `final_layer_norm`.

  Attributes:
    config: the hyper-parameters.
  """

  config: ClipTextConfig

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, *, clip_skip: int = 0, pooled: bool = False
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Encodes token ids.

    Args:
      input_ids: [B, L] int token ids, L <= max_position_embeddings.
      clip_skip: skip this many last layers: the hidden state after layer
        num_hidden_layers - clip_skip, through final_layer_norm (diffusers' `clip_skip`; 0 is
        transformers' last_hidden_state).
      pooled: also return transformers' `pooler_output`.

    Returns:
      [B, L, D] float32 token features (transformers' last_hidden_state for clip_skip=0), and
      with `pooled` the [B, D] float32 pooled output: the full-depth last_hidden_state at the
      eos token (`ClipTextConfig.eos_token_id`), whatever clip_skip is.

    Raises:
      ValueError: an input longer than the position table, or clip_skip out of range.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(
        f"input_ids of length {length}: longer than max_position_embeddings="
        f"{cfg.max_position_embeddings}."
      )
    if not 0 <= clip_skip <= cfg.num_hidden_layers:
      raise ValueError(f"clip_skip={clip_skip} is not in [0, {cfg.num_hidden_layers}].")
    embed = lambda rows, name: nn.Embed(rows, cfg.hidden_size, dtype=dtype, name=name)
    h = embed(cfg.vocab_size, "token_embedding")(input_ids)
    h = h + embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(length))[None]
    final_norm = _layer_norm(cfg, "final_layer_norm")
    depth = cfg.num_hidden_layers if pooled else cfg.num_hidden_layers - clip_skip
    skipped = h
    for i in range(depth):
      h = ClipEncoderLayer(cfg, name=f"layers_{i}")(h)
      if i + 1 == cfg.num_hidden_layers - clip_skip:
        skipped = h
    states = final_norm(skipped).astype(jnp.float32)
    if not pooled:
      return states
    last = states if clip_skip == 0 else final_norm(h).astype(jnp.float32)
    return states, last[jnp.arange(last.shape[0]), self._eos_positions(input_ids)]

  def _eos_positions(self, input_ids: jax.Array) -> jax.Array:
    """[B] positions of the pooled tokens, by transformers' two rules."""
    if self.config.eos_token_id == 2:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
