"""Text encoders: token ids -> token embeddings that the U-Net attends to.

The U-Net sees only `(context [B, L, D], context_mask [B, L])`; any encoder with the interface of
`TextEncoder.__call__` can produce them. The one here is a small Transformer trained jointly with
the U-Net. A frozen pretrained encoder (T5 or CLIP weights read from local files) plugs in as
another module with the same call, without touching the U-Net.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Hyper-parameters of the jointly trained text encoder (the config's `model.text` section).

  Attributes:
    vocab_size: rows of the token embedding table, >= the tokenizer's vocabulary; 0 means no
      text conditioning.
    width: embedding width D of the tokens (the context the U-Net attends to).
    num_layers: Transformer layers (pre-LayerNorm self-attention + MLP).
    num_heads: attention heads; must divide `width`.
    max_length: tokens per prompt L, padding included (the position table's length).
  """

  vocab_size: int = 0
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  max_length: int = 16


def text_config_from(text_config: Any) -> TextEncoderConfig:
  """The `model.text` section (ConfigDict, mapping or None) as a checked `TextEncoderConfig`.

  Raises:
    ValueError: a field has an invalid value (the message names it).
  """
  if isinstance(text_config, TextEncoderConfig):
    config = text_config
  elif text_config is None:
    config = TextEncoderConfig()
  else:
    defaults = TextEncoderConfig()
    get = (
      text_config.get
      if isinstance(text_config, Mapping) or hasattr(text_config, "get")
      else lambda name, default: getattr(text_config, name, default)
    )
    config = TextEncoderConfig(
      **{f.name: int(get(f.name, getattr(defaults, f.name))) for f in dataclasses.fields(defaults)}
    )
  if config.vocab_size < 0:
    raise ValueError(f"model.text.vocab_size={config.vocab_size} must be >= 0 (0: no text).")
  if config.vocab_size:
    for name in ("width", "num_heads", "max_length"):
      if getattr(config, name) < 1:
        raise ValueError(f"model.text.{name}={getattr(config, name)} must be a positive integer.")
    if config.num_layers < 0:
      raise ValueError(f"model.text.num_layers={config.num_layers} must be >= 0.")
    if config.width % config.num_heads:
      raise ValueError(
        f"model.text.num_heads={config.num_heads} does not divide model.text.width="
        f"{config.width}; choose a divisor."
      )
  return config


class TextEncoder(nn.Module):
  """A small pre-LayerNorm Transformer over token ids, trained with the U-Net.

  Token embedding + learned position embedding -> num_layers x (LayerNorm -> multi-head
  self-attention over the valid tokens -> residual; LayerNorm -> MLP (4x width, GELU) ->
  residual) -> LayerNorm. Padded tokens are masked out of every attention, so the embeddings of
  the valid tokens do not depend on what the padding holds.

  Attributes:
    config: the hyper-parameters.
  """

  config: TextEncoderConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
    """Encodes token ids.

    Args:
      tokens: [B, L] int32 token ids in [0, vocab_size), L <= max_length.
      mask: [B, L] bool, True for valid tokens; each row needs at least one.
      train: unused (no dropout); kept for the interface of encoders that have it.

    Returns:
      [B, L, width] float32 token embeddings (rows of padded tokens are meaningless).
    """
    del train
    cfg = self.config
    length = tokens.shape[1]
    h = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding")(tokens)
    positions = self.param(
      "position_embedding", nn.initializers.normal(0.02), (cfg.max_length, cfg.width)
    )
    h = h + positions[None, :length]
    attn_mask = nn.make_attention_mask(mask, mask)
    for i in range(cfg.num_layers):
      y = nn.LayerNorm(name=f"layer_{i}_norm1")(h)
      y = nn.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, kernel_init=layers.default_init, name=f"layer_{i}_attn"
      )(y, y, mask=attn_mask)
      h = h + y
      y = nn.LayerNorm(name=f"layer_{i}_norm2")(h)
      y = nn.Dense(4 * cfg.width, kernel_init=layers.default_init, name=f"layer_{i}_mlp_in")(y)
      y = nn.Dense(cfg.width, kernel_init=layers.default_init, name=f"layer_{i}_mlp_out")(
        nn.gelu(y)
      )
      h = h + y
    return nn.LayerNorm(name="norm_out")(h).astype(jnp.float32)
