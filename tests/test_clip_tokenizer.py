"""CLIP's BPE tokenizer (`diffusion_jax.text.clip_bpe`) against transformers' `CLIPTokenizer`.

The fixture (tests/fixtures/clip_tokenizer, written by its make_fixture.py with transformers and
open_clip) holds Stable Diffusion 1.x and 2.x tokenizer folders with CLIP's vocabulary reduced to
what its prompts use, original ids kept, and transformers' ids for every prompt; no transformers
here.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from diffusion_jax.pretrained.files import WeightsError
from diffusion_jax.text.clip_bpe import (
  BOS_TOKEN,
  EOS_TOKEN,
  ClipTokenizer,
  basic_normalize,
  load_clip_tokenizer,
)

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "clip_tokenizer"
PROMPTS = json.loads((FIXTURE / "prompts.json").read_text())
BOS, EOS = 49406, 49407
PAD = {"sd1": EOS, "sd2": 0}
KINDS = [(name, norm) for name in ("sd1", "sd2") for norm in ("slow", "fast")]


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def tokenizers():
  return {
    kind: load_clip_tokenizer(str(FIXTURE / kind[0]), normalization=kind[1]) for kind in KINDS
  }


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(k))
def test_ids_are_those_of_transformers(tokenizers, reference, kind):
  tokenizer = tokenizers[kind]
  ids = tokenizer(PROMPTS)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
  want = reference[f"{kind[0]}_{kind[1]}"]
  wrong = [PROMPTS[i] for i in np.nonzero((ids != want).any(axis=1))[0]]
  assert not wrong, f"{len(wrong)} prompts differ, first {wrong[:3]!r}"
  np.testing.assert_array_equal(
    tokenizer.lengths(PROMPTS), reference[f"{kind[0]}_{kind[1]}_lengths"]
  )


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_the_folder_names_the_pad_token_and_length(tokenizers, name):
  tokenizer = tokenizers[(name, "slow")]
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (BOS, EOS, PAD[name])
  assert tokenizer.max_length == 77
  np.testing.assert_array_equal(tokenizer([""])[0], [BOS, EOS] + [PAD[name]] * 75)
  np.testing.assert_array_equal(tokenizer("a photo of a cat"), tokenizer(["a photo of a cat"]))
  # With pad token "!", transformers reads every "!" of a prompt as that special token.
  assert (tokenizer("wow!")[0, 1:3] == 0).any() == (name == "sd2")


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_truncation_keeps_the_end_token(tokenizers, name):
  tokenizer = tokenizers[(name, "slow")]
  lengths = tokenizer.lengths(PROMPTS)
  ids = tokenizer(PROMPTS)
  long = lengths > 77
  assert long.sum() >= 12
  assert (ids[long, -1] == EOS).all() and (ids[long, 0] == BOS).all()
  np.testing.assert_array_equal(
    ids[long, 1:-1], [tokenizer.encode(p)[:75] for p in np.array(PROMPTS)[long]]
  )
  for row, length in zip(ids[~long], lengths[~long], strict=True):
    assert row[length - 1] == EOS and (row[length:] == PAD[name]).all()
  prompt = PROMPTS[int(np.argmax(long))]
  dropped = tokenizer.truncated_text(prompt)
  assert dropped and dropped == tokenizer.decode(tokenizer.encode(prompt)[75:])
  assert tokenizer.truncated_text("a photo of a cat") == ""


def test_the_constructor_takes_vocabulary_and_merges(tokenizers):
  vocab = json.loads((FIXTURE / "sd1" / "vocab.json").read_text())
  merges = (FIXTURE / "sd1" / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
  short = ClipTokenizer(vocab, merges, "!", 8)
  full = tokenizers[("sd1", "slow")]
  prompt = "a photo of a cat on mars at sunset"
  assert len(full.encode(prompt)) > 6 and len(full.encode("a")) == 1
  np.testing.assert_array_equal(
    short([prompt, "a"]),
    [[BOS, *full.encode(prompt)[:6], EOS], [BOS, *full.encode("a"), EOS, 0, 0, 0, 0, 0]],
  )
  pairs = ClipTokenizer(vocab, [tuple(m.split()) for m in merges])
  np.testing.assert_array_equal(pairs(PROMPTS[:40]), full(PROMPTS[:40]))
  assert full.decode(full(["A photo of a cat, at night!"])[0]) == "a photo of a cat , at night !"
  with pytest.raises(ValueError, match="normalization"):
    ClipTokenizer(vocab, merges, normalization="ftfy")
  with pytest.raises(ValueError, match="'<pad>' is not in the vocabulary"):
    ClipTokenizer(vocab, merges, "<pad>")


def test_basic_normalize_is_berts_basic_tokenizer():
  assert basic_normalize("  A\tB\u00a0東京 z\u200dw\x00\n") == "a b 東 京 zw"
  assert basic_normalize("ΟΔΟΣ e\u0301") == "οδος \u00e9"
  assert BOS_TOKEN == "<|startoftext|>" and EOS_TOKEN == "<|endoftext|>"


def _copy(tmp_path, name="sd1"):
  folder = tmp_path / name
  shutil.copytree(FIXTURE / name, folder)
  return folder


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_a_missing_file_is_a_one_line_error_naming_it(tmp_path, missing):
  folder = _copy(tmp_path)
  (folder / missing).unlink()
  with pytest.raises(WeightsError, match=f"{missing}: no such file") as error:
    load_clip_tokenizer(str(folder))
  assert "\n" not in str(error.value) and str(folder) in str(error.value)


BROKEN = {
  "vocab.json": ("[1, 2]", "vocab.json: holds a JSON list"),
  "merges.txt": ("#version: 0.2\na b\nc\n", r"merges.txt:3: 'c' is not a pair"),
  "tokenizer_config.json": ('{"model_max_length": "long"}', "model_max_length is 'long'"),
  "special_tokens_map.json": ('{"pad_token": "<pad>"}', "'<pad>' is not in the vocabulary"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_file_is_a_one_line_error(tmp_path, name):
  folder = _copy(tmp_path)
  text, message = BROKEN[name]
  (folder / name).write_text(text)
  with pytest.raises(WeightsError, match=message) as error:
    load_clip_tokenizer(str(folder))
  assert "\n" not in str(error.value)


def test_merges_of_unknown_tokens_are_an_error(tmp_path):
  folder = _copy(tmp_path)
  with open(folder / "merges.txt", "a", encoding="utf-8") as f:
    f.write("qq zz\n")
  with pytest.raises(WeightsError, match="vocabulary and merges do not fit") as error:
    load_clip_tokenizer(str(folder))
  assert "\n" not in str(error.value)


def test_without_config_files_the_pad_is_the_end_token(tmp_path):
  folder = _copy(tmp_path, "sd2")
  (folder / "special_tokens_map.json").unlink()
  (folder / "tokenizer_config.json").unlink()
  tokenizer = load_clip_tokenizer(str(folder))
  assert (tokenizer.pad_id, tokenizer.max_length) == (EOS, 77)
