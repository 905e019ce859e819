"""Prompts as token ids: a word-level tokenizer built from a data set's captions, and the captions.

No download: the vocabulary is every word the data set's captions can contain (for the shapes set,
its caption grammar; for CIFAR-10 and image folders, "a"/"an" and the words of the class names),
sorted, after three special tokens. A prompt becomes [START, its words..., PAD, ...]; the empty
prompt is [START] alone, which is also what training puts in place of a dropped caption, so an
empty prompt asks the model for an unconditional sample.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from absl import logging

from diffusion_jax.text.tokens import PAD, PAD_ID, START, START_ID, UNK, UNK_ID

_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
  """Lower-cased runs of letters and digits: "A Red-circle!" -> ["a", "red", "circle"]."""
  return _WORD.findall(text.lower())


class Tokenizer:
  """Word-level tokenizer over a fixed vocabulary.

  Attributes:
    vocabulary: the tokens, id = position: PAD, START, UNK, then the sorted words.
    max_length: L, tokens per encoded prompt (START and padding included).
  """

  def __init__(self, words: Iterable[str], max_length: int):
    """Builds the tokenizer.

    Args:
      words: the known words (any order, repeats allowed); they are lower-cased and split.
      max_length: tokens per prompt, >= 2.
    """
    if max_length < 2:
      raise ValueError(f"model.text.max_length={max_length} must be >= 2 (START and a word)")
    known = sorted({w for word in words for w in split_words(word)})
    self.vocabulary = [PAD, START, UNK, *known]
    self.max_length = int(max_length)
    self._ids = {w: i for i, w in enumerate(self.vocabulary)}
    assert self._ids[PAD] == PAD_ID and self._ids[START] == START_ID and self._ids[UNK] == UNK_ID

  def __len__(self) -> int:
    return len(self.vocabulary)

  def unknown_words(self, prompt: str) -> list[str]:
    """The words of `prompt` that are not in the vocabulary, in order."""
    return [w for w in split_words(prompt) if w not in self._ids]

  def encode_one(self, prompt: str) -> np.ndarray:
    """[START, word ids..., PAD...] as int32 [max_length]; unknown words become UNK, words past
    max_length - 1 are dropped (`encode` warns about both)."""
    ids = [START_ID] + [self._ids.get(w, UNK_ID) for w in split_words(prompt)]
    out = np.zeros(self.max_length, np.int32)
    ids = ids[: self.max_length]
    out[: len(ids)] = ids
    return out

  def encode(self, prompts: Sequence[str], *, warn: bool = True) -> np.ndarray:
    """Encodes prompts given by a user, warning (once per prompt) about what they lose.

    Args:
      prompts: N strings; "" is the unconditional prompt.
      warn: log a warning for each prompt with unknown words or more words than fit.

    Returns:
      int32 [N, max_length] token ids.
    """
    if warn:
      for prompt in dict.fromkeys(prompts):
        unknown = self.unknown_words(prompt)
        if unknown:
          logging.warning(
            "prompt %r: the tokenizer has never seen %s; they are read as an unknown word, "
            "which the model knows nothing about. Known words: %s",
            prompt,
            ", ".join(repr(w) for w in dict.fromkeys(unknown)),
            " ".join(self.vocabulary[3:]),
          )
        if len(split_words(prompt)) > self.max_length - 1:
          logging.warning(
            "prompt %r has %d words; only the first %d are used (model.text.max_length=%d)",
            prompt,
            len(split_words(prompt)),
            self.max_length - 1,
            self.max_length,
          )
    return (
      np.stack([self.encode_one(p) for p in prompts])
      if prompts
      else np.zeros((0, self.max_length), np.int32)
    )

  def decode(self, ids: Sequence[int]) -> str:
    """The words of token ids, without START and padding."""
    return " ".join(self.vocabulary[i] for i in ids if i not in (PAD_ID, START_ID))


def article(noun: str) -> str:
  """ "a" or "an" for `noun` (by its first letter)."""
  return "an" if noun[:1].lower() in "aeiou" else "a"


def class_caption(name: str) -> str:
  """The caption of an image of class `name`: "a cat", "an airplane", "a red circle"."""
  return f"{article(name)} {name}"


def caption_words(source) -> list[str]:
  """Every word the captions of `source` can contain (see `make_captioner`)."""
  if hasattr(source, "caption_words"):
    return list(source.caption_words())
  return ["a", "an", *source.class_names]


def make_captioner(source) -> Callable[[int, int, np.random.Generator], str]:
  """The caption of an example: (source index, label, generator) -> str.

  A source with its own `caption(index, rng)` (the shapes set: colour, shape, and at random its
  size and position) gives that; others give `class_caption` of the label's class name.
  """
  if hasattr(source, "caption"):
    return lambda index, label, rng: source.caption(index, rng)
  names = list(source.class_names)
  return lambda index, label, rng: class_caption(names[int(label)])


def default_prompts(source) -> list[str]:
  """One prompt per class: "a red circle", ... for the shapes set, "a cat", ... for CIFAR-10."""
  return [class_caption(name) for name in source.class_names]


def tokenizer_for(source, max_length: int) -> Tokenizer:
  """The tokenizer of a data set's captions."""
  return Tokenizer(caption_words(source), max_length)
