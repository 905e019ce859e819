"""Captioned image folders (data.dataset="folder"): metadata.jsonl, metadata.csv and .txt files give
each image its caption, bad rows and uncaptioned images are skipped with a warning naming them,
malformed metadata stops with a one-line error, and the captions reach the batches as tokens."""

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from configs import default
from diffusion_jax import text
from diffusion_jax.data import make_source, make_train_iterator
from diffusion_jax.data.folder import FolderSource
from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime.errors import ConfigError

S = 8  # image_size; the 8 x 8 test images are not resized, so their colours compare exactly


def write_image(root, name, colour):
  """A solid S x S PNG of `colour` at root/name."""
  path = os.path.join(root, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (S, S), colour).save(path)


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps({"file_name": name, "text": caption}) + "\n" for name, caption in rows)


def write_csv(path, rows, header="file_name,text"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lines = [header] + [f'{name},"{caption}"' for name, caption in rows]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def captions_by_colour(source):
  """{an image's colour: the caption the source gives it}, read from the decoded pixels."""
  out = {}
  rng = np.random.default_rng(0)
  for i in range(len(source)):
    image = source[i]["image"]
    colour = tuple(int(v) for v in image[0, 0])
    assert (image == colour).all()
    out[colour] = source.caption(i, rng)
  return out


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def assert_one_line_error(excinfo, *names):
  message = str(excinfo.value)
  assert "\n" not in message
  for name in names:
    assert name in message


RED, GREEN, BLUE, GREY = (200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)


def layout_jsonl_root(root):
  write_jsonl(
    os.path.join(root, "metadata.jsonl"),
    [("cat/1.png", "A black cat"), ("dog/x/2.png", "a small, happy dog"), ("3.png", "the sea")],
  )


def layout_csv_root(root):
  write_csv(
    os.path.join(root, "metadata.csv"),
    [("cat/1.png", "A black cat"), ("dog/x/2.png", "a small, happy dog"), ("3.png", "the sea")],
  )


def layout_sub_folders(root):
  write_jsonl(os.path.join(root, "cat", "metadata.jsonl"), [("1.png", "A black cat")])
  write_csv(os.path.join(root, "dog", "metadata.csv"), [("x/2.png", "a small, happy dog")])
  write_jsonl(os.path.join(root, "metadata.jsonl"), [("3.png", "the sea")])


def layout_txt(root):
  for name, caption in [
    ("cat/1", "A black cat"),
    ("dog/x/2", "a small,\nhappy  dog\n"),
    ("3", "the sea"),
  ]:
    with open(os.path.join(root, name + ".txt"), "w") as f:
      f.write(caption)


def layout_mixed(root):
  # The metadata row wins over the .txt of the same image; the others keep their .txt.
  write_jsonl(os.path.join(root, "cat", "metadata.jsonl"), [("1.png", "A black cat")])
  layout_txt(root)
  with open(os.path.join(root, "cat", "1.txt"), "w") as f:
    f.write("a white cat")


@pytest.mark.parametrize(
  "layout", [layout_jsonl_root, layout_csv_root, layout_sub_folders, layout_txt, layout_mixed]
)
def test_each_convention_gives_every_image_its_caption(tmp_path, caplog, layout):
  write_image(tmp_path, "cat/1.png", RED)
  write_image(tmp_path, "dog/x/2.png", GREEN)
  write_image(tmp_path, "3.png", BLUE)
  layout(str(tmp_path))
  with caplog.at_level("WARNING"):
    source = FolderSource(str(tmp_path), S)
  assert warnings_of(caplog) == []
  assert source.captioned and len(source) == 3
  assert source.class_names == [".", "cat", "dog"]
  assert captions_by_colour(source) == {
    RED: "A black cat",
    GREEN: "a small, happy dog",
    BLUE: "the sea",
  }
  # The words as the tokenizer splits them, so that the vocabulary covers every caption.
  assert source.caption_words() == ["a", "black", "cat", "dog", "happy", "sea", "small", "the"]


def test_nearest_metadata_file_describes_an_image(tmp_path, caplog):
  write_image(tmp_path, "cat/1.png", RED)
  write_image(tmp_path, "cat/2.png", GREEN)
  write_jsonl(tmp_path / "cat" / "metadata.jsonl", [("1.png", "a red cat"), ("2.png", "a cat")])
  write_jsonl(tmp_path / "metadata.jsonl", [("cat/1.png", "a blue cat")])
  with caplog.at_level("WARNING"):
    source = FolderSource(str(tmp_path), S)
  assert captions_by_colour(source) == {RED: "a red cat", GREEN: "a cat"}
  [warning] = warnings_of(caplog)
  assert "metadata.jsonl line 1" in warning and "cat/metadata.jsonl describes it" in warning


def test_folder_without_captions_is_unchanged(tmp_path):
  write_image(tmp_path, "cat/1.png", RED)
  write_image(tmp_path, "dog/2.png", GREEN)
  (tmp_path / "notes.txt").write_text("not a caption: no image is called notes")
  source = FolderSource(str(tmp_path), S)
  assert not source.captioned and len(source) == 2
  assert not hasattr(source, "caption") and not hasattr(source, "caption_words")
  assert [int(source[i]["label"]) for i in range(2)] == [0, 1]
  # The text module falls back to class-name captions, as before.
  assert text.caption_words(source) == ["a", "an", "cat", "dog"]


def test_missing_images_and_uncaptioned_images_are_skipped_with_a_warning(tmp_path, caplog):
  write_image(tmp_path, "1.png", RED)
  write_image(tmp_path, "2.png", GREEN)
  write_image(tmp_path, "3.png", BLUE)
  write_image(tmp_path, "4.png", GREY)
  write_jsonl(
    tmp_path / "metadata.jsonl",
    [("1.png", "a red square"), ("gone.png", "a lost image"), ("4.png", "  ")],
  )
  (tmp_path / "2.txt").write_text("a green square")
  with caplog.at_level("WARNING"):
    source = FolderSource(str(tmp_path), S)
  assert captions_by_colour(source) == {RED: "a red square", GREEN: "a green square"}
  rows, images = warnings_of(caplog)
  assert "'gone.png'" in rows and "metadata.jsonl line 2" in rows and "\n" not in rows
  assert "'3.png' (no caption)" in images and "'4.png'" in images and "\n" not in images
  assert "lost" not in source.caption_words()

  # Building the source again (training does) repeats no warning.
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert len(FolderSource(str(tmp_path), S)) == 2
  assert warnings_of(caplog) == []


def test_every_image_without_a_caption_is_an_error(tmp_path):
  write_image(tmp_path, "1.png", RED)
  write_image(tmp_path, "2.png", GREEN)
  write_jsonl(tmp_path / "metadata.jsonl", [("other.png", "a caption of nothing")])
  with pytest.raises(ConfigError) as excinfo:
    FolderSource(str(tmp_path), S)
  assert_one_line_error(excinfo, "'1.png'", "'2.png'", "metadata.jsonl")


MALFORMED = {
  "bad_json": ("metadata.jsonl", '{"file_name": "1.png", "text": "a"}\n{"file_name": "2.png"\n', 2),
  "not_an_object": ("metadata.jsonl", '["1.png", "a red square"]\n', 1),
  "no_text_key": ("metadata.jsonl", '{"file_name": "1.png", "caption": "a"}\n', 1),
  "text_not_a_string": ("metadata.jsonl", '{"file_name": "1.png", "text": 3}\n', 1),
  "outside_folder": ("sub/metadata.jsonl", '{"file_name": "../1.png", "text": "a"}\n', 1),
  "repeated_row": (
    "metadata.jsonl",
    '{"file_name": "1.png", "text": "a"}\n{"file_name": "./1.png", "text": "b"}\n',
    2,
  ),
  "no_text_column": ("metadata.csv", "file_name,caption\n1.png,a red square\n", 1),
  "unquoted_comma": ("metadata.csv", "file_name,text\n1.png,a red, square thing\n", 2),
  "short_row": ("metadata.csv", "file_name,text\n1.png,a\n2.png\n", 3),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_a_one_line_error_naming_file_and_line(tmp_path, case):
  name, content, line = MALFORMED[case]
  write_image(tmp_path, "1.png", RED)
  write_image(tmp_path, "sub/2.png", GREEN)
  (tmp_path / name).write_text(content)
  with pytest.raises(ConfigError) as excinfo:
    FolderSource(str(tmp_path), S)
  assert_one_line_error(excinfo, f"{name} line {line}")


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.csv", "1.txt"])
def test_caption_file_that_is_not_utf8_is_a_one_line_error(tmp_path, name):
  write_image(tmp_path, "1.png", RED)
  (tmp_path / name).write_bytes(b"file_name,text\n1.png,caf\xe9\n")
  with pytest.raises(ConfigError) as excinfo:
    FolderSource(str(tmp_path), S)
  assert_one_line_error(excinfo, name, "UTF-8")


def test_two_metadata_files_in_one_folder_is_an_error(tmp_path):
  write_image(tmp_path, "1.png", RED)
  write_jsonl(tmp_path / "metadata.jsonl", [("1.png", "a")])
  write_csv(tmp_path / "metadata.csv", [("1.png", "a")])
  with pytest.raises(ConfigError) as excinfo:
    FolderSource(str(tmp_path), S)
  assert_one_line_error(excinfo, "metadata.jsonl", "metadata.csv")


def test_batches_carry_the_tokens_of_each_images_caption(tmp_path):
  colours = [RED, GREEN, BLUE, GREY, (250, 250, 0)]
  captions = ["A red square", "green; grass!", "the blue sky", "a grey cloud", "yellow sun"]
  write_csv(
    tmp_path / "animals" / "metadata.csv",
    [(f"{i}.png", caption) for i, caption in enumerate(captions[:3])],
  )
  for i, colour in enumerate(colours):
    write_image(tmp_path, f"animals/{i}.png" if i < 3 else f"{i}.png", colour)
    if i >= 3:
      (tmp_path / f"{i}.txt").write_text(captions[i])
  fields = default.get_config().data.to_dict()
  fields.update(dataset="folder", path=str(tmp_path), image_size=S, random_flip=False)
  config = types.SimpleNamespace(**fields)
  tokenizer = text.tokenizer_for(make_source(config), max_length=6)
  expected = {
    colour: " ".join(text.split_words(c)) for colour, c in zip(colours, captions, strict=True)
  }
  batches = make_train_iterator(config, global_batch_size=4, seed=0, tokenizer=tokenizer)
  seen = set()
  for _ in range(3):
    batch = next(batches)
    for image, tokens in zip(batch["image"], batch["tokens"], strict=True):
      colour = tuple(int(v) for v in image[0, 0])
      assert tokenizer.decode(tokens) == expected[colour]
      seen.add(colour)
  assert seen == set(colours)


def test_a_text_conditional_run_reads_captions_or_falls_back_to_class_names(tmp_path, tiny_config):
  overrides = {
    "data.dataset": "folder",
    "data.path": str(tmp_path),
    "model.cross_attn_resolutions": (8,),
    "model.text.vocab_size": 32,
    "model.text.width": 16,
    "model.text.num_layers": 1,
    "model.text.num_heads": 2,
    "data.random_flip": False,
  }
  write_image(tmp_path, "kitten/1.png", RED)
  run = run_lib.make_run(tiny_config(overrides))  # No captions: "a kitten", as for tfds sets.
  assert run.tokenizer.vocabulary[3:] == ["a", "an", "kitten"]
  (tmp_path / "kitten" / "1.txt").write_text("a red cat")
  run = run_lib.make_run(tiny_config(overrides))
  assert run.tokenizer.vocabulary[3:] == ["a", "cat", "red"]


def test_grids_draw_the_folders_captions_and_long_captions_are_named(tmp_path, tiny_config, caplog):
  overrides = {
    "data.dataset": "folder",
    "data.path": str(tmp_path),
    "model.cross_attn_resolutions": (8,),
    "model.text.vocab_size": 32,
    "model.text.max_length": 5,
    "data.random_flip": False,
  }
  write_image(tmp_path, "1.png", RED)
  write_image(tmp_path, "2.png", GREEN)
  write_image(tmp_path, "3.png", BLUE)
  (tmp_path / "1.txt").write_text("a red cat")
  (tmp_path / "2.txt").write_text("a green cat sitting on a mat")  # 7 words: 4 fit
  (tmp_path / "3.txt").write_text("a red cat")
  run = run_lib.make_run(tiny_config(overrides))
  assert warnings_of(caplog) == [
    "1 of 3 captions have more than 4 words (the longest 7); training reads their first 4. "
    "Raise model.text.max_length (now 5) to keep them whole"
  ]
  prompts, condition, count = run.grid_prompts(4)
  assert prompts == ["a red cat", "a green cat sitting on a mat"]  # distinct, in data order
  assert count == 4 and condition["tokens"].shape == (4, 5)
  assert [run.tokenizer.decode(t) for t in condition["tokens"][::2]] == [
    "a red cat",
    "a green cat sitting",
  ]
