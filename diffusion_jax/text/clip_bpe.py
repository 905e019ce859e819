"""CLIP's byte-level BPE tokenizer, read from a diffusers/transformers `tokenizer/` folder.

Stable Diffusion's text encoders read prompts as CLIP tokens: `<|startoftext|>`, the BPE ids of the
prompt, `<|endoftext|>`, truncated and padded to 77. The folder holds `vocab.json` (token -> id),
`merges.txt` (the merges, best first, after a `#version` line) and, where present,
`special_tokens_map.json` / `tokenizer_config.json`, which name the pad token (SD 1.x:
`<|endoftext|>`, id 49407; SD 2.x: `!`, id 0) and `model_max_length`. The BPE itself is the
`tokenizers` package's.

Two text normalisations, both those of transformers' `CLIPTokenizer` as diffusers loads it:

- "slow" (the default): transformers < 5's Python `CLIPTokenizer` where `ftfy` is not installed,
  which hands the text to BERT's BasicTokenizer: characters of category C* (controls, format
  characters such as U+200D, private-use, unassigned) and U+FFFD removed, whitespace made a space,
  a space put on each side of every CJK ideograph (each becomes a word of its own), NFC, split on
  whitespace, each word lower-cased with `str.lower`, no accent stripping. Its word pattern is
  matched case-insensitively: `'ſ` (long s) counts as the contraction `'s`, and U+0345 (combining
  ypogegrammeni, which case-folds to a letter) falls in no class of the pattern and is dropped.
- "fast": transformers' `tokenizers`-backed tokenizer (`CLIPTokenizerFast`; transformers >= 5's only
  `CLIPTokenizer`): NFC, whitespace runs made one space, lower-cased character by character (`Σ` is
  always `σ`), control/format characters kept, runs of CJK ideographs one word.

Neither applies ftfy, which transformers < 5 uses instead of BasicTokenizer where it is installed
(open_clip installs it; diffusers and transformers do not require it, transformers 5 dropped it):
`ftfy.fix_text`, whitespace cleaning, `str.lower`. Against that path ids differ for prompts with
HTML entities (ftfy decodes `&amp;` unless the prompt holds a `<`; neither path above decodes
them, so neither does this module), curly quotes (`’` becomes `'`, changing `don’t`), ligatures
and full-width forms (`ﬁ`, `Ａ`), mojibake ftfy repairs, and characters either path above treats
its own way (format characters such as U+200D, which ftfy keeps; CJK ideographs). On prompts of
printable ASCII the three agree, except for HTML entities.

With pad token `!` (SD 2.x), transformers also treats every `!` in a prompt as that special token,
id 0 rather than the BPE id of the `!` word; so does this module.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from diffusion_jax.pretrained.files import WeightsError, read_config

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
NORMALIZATIONS = ("slow", "fast")

# transformers (like CLIP's own tokenizer) reads at most this many merges, merges.txt's lines 2 to
# 48895: CLIP's 49152 tokens less the 256 bytes and the two special tokens.
_MAX_MERGES = 49152 - 256 - 2
# Above this, transformers' `model_max_length` means "not set" (its VERY_LARGE_INTEGER is 1e30).
_UNSET_LENGTH = 10**6

# CLIP's word pattern. The slow tokenizer matches it case-insensitively (`regex` module, simple
# case folding); on lower-cased text that changes two characters: the long s (U+017F) folds to "s",
# hence the `[sſ]`, and U+0345 folds to a letter, so it is neither a letter nor "[^\s\p{L}\p{N}]"
# and no alternative matches it.
_SLOW_PATTERN = (
  r"<\|[sſ]tartoftext\|>|<\|endoftext\|>|'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
  r"[^\s\p{L}\p{N}\u0345]+"
)
_FAST_PATTERN = (
  r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)

# BasicTokenizer's "Chinese characters": the CJK Unified Ideographs blocks and extensions.
_CJK = (
  (0x4E00, 0x9FFF),
  (0x3400, 0x4DBF),
  (0x20000, 0x2A6DF),
  (0x2A700, 0x2B73F),
  (0x2B740, 0x2B81F),
  (0x2B820, 0x2CEAF),
  (0xF900, 0xFAFF),
  (0x2F800, 0x2FA1F),
)


def basic_normalize(text: str) -> str:
  """The "slow" normalisation: what BERT's BasicTokenizer (as transformers' CLIPTokenizer without
  ftfy configures it) makes of `text`, its words joined by single spaces."""
  chars = []
  for char in text:
    category = unicodedata.category(char)
    if char in "\t\n\r" or category == "Zs":
      chars.append(" ")
    elif char == "\ufffd" or category.startswith("C"):
      continue
    elif any(lo <= ord(char) <= hi for lo, hi in _CJK):
      chars.append(f" {char} ")
    else:
      chars.append(char)
  text = unicodedata.normalize("NFC", "".join(chars))
  return " ".join(word.lower() for word in text.split())


class ClipTokenizer:
  """CLIP's tokenizer: prompts to int32 [B, max_length] ids, as diffusers' pipelines get them from
  `tokenizer(prompts, padding="max_length", max_length=77, truncation=True)`.

  Attributes:
    max_length: L, tokens per prompt (start, BPE ids, end, padding).
    normalization: "slow" or "fast" (see the module docstring).
    pad_token: the padding token; bos_id, eos_id, pad_id: the ids of start, end and padding.
    vocab_size: number of tokens in the vocabulary.
  """

  def __init__(
    self,
    vocab: Mapping[str, int],
    merges: Sequence[str | tuple[str, str]],
    pad_token: str = EOS_TOKEN,
    max_length: int = MAX_LENGTH,
    *,
    normalization: str = "slow",
  ):
    """Builds the tokenizer.

    Args:
      vocab: token -> id (vocab.json); byte-level tokens, `</w>` ending a word's last token. The
        ids need not be contiguous.
      merges: the merges, best first, as "a b" strings (merges.txt's lines, without its header) or
        (a, b) pairs.
      pad_token: the padding token, in `vocab`.
      max_length: tokens per prompt, >= 2.
      normalization: "slow" (transformers' Python CLIPTokenizer without ftfy) or "fast"
        (its `tokenizers`-backed one).

    Raises:
      ValueError: a special token missing from `vocab`, a merge of unknown tokens, a bad argument.
    """
    if normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization={normalization!r}: expected one of {NORMALIZATIONS}")
    if max_length < 2:
      raise ValueError(f"max_length={max_length} must be >= 2 (start and end tokens)")
    for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
      if token not in vocab:
        raise ValueError(f"special token {token!r} is not in the vocabulary")
    pairs = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
    for i, pair in enumerate(pairs):
      if len(pair) != 2:
        raise ValueError(f"merge {i} ({merges[i]!r}) is not a pair of tokens")
    try:
      bpe = models.BPE(
        vocab=dict(vocab),
        merges=pairs,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=EOS_TOKEN,
      )
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
      raise ValueError(f"vocabulary and merges do not fit ({e})") from None
    self.max_length = int(max_length)
    self.normalization = normalization
    self.pad_token = pad_token
    self.bos_id, self.eos_id, self.pad_id = (
      int(vocab[t]) for t in (BOS_TOKEN, EOS_TOKEN, pad_token)
    )
    self.vocab_size = len(vocab)
    self._tokenizer = _backend(bpe, pad_token, normalization)

  @classmethod
  def from_folder(cls, folder: str, *, normalization: str = "slow") -> ClipTokenizer:
    """The tokenizer of a diffusers/transformers tokenizer folder (see `load_clip_tokenizer`)."""
    vocab_path = os.path.join(folder, "vocab.json")
    single = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(vocab_path) and os.path.isfile(single):
      vocab, merges = _read_tokenizer_json(single)  # transformers >= 5 writes only this file
      vocab_path = single
    else:
      vocab = read_config(vocab_path)
      merges = _read_merges(os.path.join(folder, "merges.txt"))
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
      raise WeightsError(f"{vocab_path}: not a JSON object of token -> integer id")
    pad_token, max_length = _special_settings(folder)
    try:
      return cls(vocab, merges, pad_token, max_length, normalization=normalization)
    except WeightsError:
      raise
    except ValueError as e:
      raise WeightsError(f"{folder}: {e}") from None

  def normalize(self, text: str) -> str:
    """`text` as the BPE sees it: normalised, before the split into words."""
    if self.normalization == "slow":
      return basic_normalize(text)
    return self._tokenizer.normalizer.normalize_str(text)

  def encode(self, prompt: str) -> list[int]:
    """The BPE ids of one prompt, untruncated, without start and end tokens."""
    return self._encode([prompt])[0]

  def lengths(self, prompts: str | Sequence[str]) -> np.ndarray:
    """Untruncated lengths, start and end tokens included, int64 [B]: a prompt longer than
    `max_length` keeps only its first max_length - 2 BPE ids (diffusers warns about the rest)."""
    return np.array([len(ids) + 2 for ids in self._encode(_as_list(prompts))], np.int64)

  def truncated_text(self, prompt: str) -> str:
    """The text of the tokens truncation drops from `prompt` ("" when it fits)."""
    return self.decode(self.encode(prompt)[self.max_length - 2 :])

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids (a row of `__call__` or BPE ids), words separated by single spaces: start
    tokens are left out, and the first end token ends the text."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    ids = [i for i in ids if i != self.bos_id]
    text = self._tokenizer.decode(ids, skip_special_tokens=False)
    return " ".join(text.replace("</w>", " ").split())

  def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
    """Token ids of prompts (a str is one prompt).

    Returns:
      int32 [B, max_length]: start token, BPE ids truncated to max_length - 2, end token, then the
      pad token to max_length; the empty prompt is [start, end, pad...].
    """
    encoded = self._encode(_as_list(prompts))
    out = np.full((len(encoded), self.max_length), self.pad_id, np.int32)
    for row, ids in zip(out, encoded, strict=True):
      ids = [self.bos_id, *ids[: self.max_length - 2], self.eos_id]
      row[: len(ids)] = ids
    return out

  def _encode(self, prompts: list[str]) -> list[list[int]]:
    if self.normalization == "slow":
      prompts = [basic_normalize(p) for p in prompts]
    # One at a time: `encode_batch` starts a thread pool, which a later fork would warn about.
    return [self._tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]


def load_clip_tokenizer(folder: str, *, normalization: str = "slow") -> ClipTokenizer:
  """CLIP's tokenizer from a diffusers/transformers tokenizer folder (e.g. `<model>/tokenizer`).

  Reads vocab.json and merges.txt (or, without them, the BPE model of tokenizer.json, the one file
  transformers >= 5 writes), and the pad token and `model_max_length` from
  special_tokens_map.json (first) and tokenizer_config.json where present, as transformers does;
  without them the pad token is `<|endoftext|>` and the length 77.

  Args:
    folder: the tokenizer folder.
    normalization: "slow" or "fast" (see the module docstring).

  Raises:
    WeightsError: a missing or unreadable file, or files that do not fit together; the message is
      one line naming the file.
  """
  return ClipTokenizer.from_folder(folder, normalization=normalization)


def _as_list(prompts: str | Sequence[str]) -> list[str]:
  return [prompts] if isinstance(prompts, str) else list(prompts)


def _backend(bpe: models.BPE, pad_token: str, normalization: str) -> Tokenizer:
  """The `tokenizers` pipeline: (for "fast") normaliser, CLIP's word split, byte-level alphabet,
  BPE, and the special tokens, which are matched in the text before it is split."""
  tokenizer = Tokenizer(bpe)
  if normalization == "slow":
    pattern, use_regex = _SLOW_PATTERN, False
  else:
    tokenizer.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pattern, use_regex = _FAST_PATTERN, True
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  special = [AddedToken(t, special=True, normalized=True) for t in (BOS_TOKEN, EOS_TOKEN)]
  if pad_token not in (BOS_TOKEN, EOS_TOKEN):
    special.append(AddedToken(pad_token, special=True, normalized=False))
  tokenizer.add_special_tokens(special)
  return tokenizer


def _read_merges(path: str) -> list[tuple[str, str]]:
  """merges.txt as transformers reads it: its first line (`#version: 0.2`) skipped, at most
  48894 merges kept."""
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().strip().split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise WeightsError(f"{path}: not readable as UTF-8 text ({e})") from None
  merges = []
  for number, line in enumerate(lines[1 : _MAX_MERGES + 1], start=2):
    pair = line.split()
    if len(pair) != 2:
      raise WeightsError(f"{path}:{number}: {line!r} is not a pair of tokens")
    merges.append((pair[0], pair[1]))
  return merges


def _read_tokenizer_json(path: str) -> tuple[dict, list[tuple[str, str]]]:
  """The vocabulary and merges of a `tokenizers` file (tokenizer.json) with a BPE model."""
  model = read_config(path).get("model")
  if not isinstance(model, dict) or model.get("type") != "BPE":
    raise WeightsError(f"{path}: holds no BPE model")
  vocab, merges = model.get("vocab"), model.get("merges")
  if not isinstance(vocab, dict) or not isinstance(merges, list):
    raise WeightsError(f"{path}: the BPE model has no vocab object or merges list")
  pairs = []
  for merge in merges[:_MAX_MERGES]:
    pair = merge.split() if isinstance(merge, str) else merge
    if not isinstance(pair, list) or len(pair) != 2:
      raise WeightsError(f"{path}: merge {merge!r} is not a pair of tokens")
    pairs.append((pair[0], pair[1]))
  return vocab, pairs


def _special_settings(folder: str) -> tuple[str, int]:
  """(pad token, model_max_length) of a tokenizer folder."""
  configs = []
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(folder, name)
    configs.append((path, read_config(path) if os.path.exists(path) else {}))
  pad_token = EOS_TOKEN
  for path, config in reversed(configs):
    value = config.get("pad_token")
    if isinstance(value, dict):
      value = value.get("content")
    if value is not None:
      if not isinstance(value, str):
        raise WeightsError(f"{path}: pad_token is {value!r}, not a token")
      pad_token = value
  path, config = configs[1]
  max_length = config.get("model_max_length", MAX_LENGTH)
  if not isinstance(max_length, int | float) or isinstance(max_length, bool) or max_length < 2:
    raise WeightsError(f"{path}: model_max_length is {max_length!r}, not a length >= 2")
  return pad_token, MAX_LENGTH if max_length > _UNSET_LENGTH else int(max_length)
