"""Prompts as token ids: the shared special tokens, the word tokenizer and captions."""

from diffusion_jax.text.tokenizer import (
  Tokenizer,
  article,
  caption_words,
  class_caption,
  default_prompts,
  make_captioner,
  split_words,
  tokenizer_for,
)
from diffusion_jax.text.tokens import PAD, PAD_ID, START, START_ID, UNK, UNK_ID

__all__ = [
  "PAD",
  "PAD_ID",
  "START",
  "START_ID",
  "UNK",
  "UNK_ID",
  "Tokenizer",
  "article",
  "caption_words",
  "class_caption",
  "default_prompts",
  "make_captioner",
  "split_words",
  "tokenizer_for",
]
