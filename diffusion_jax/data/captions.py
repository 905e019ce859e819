"""Captions of an image folder, in the conventions of the Hugging Face `imagefolder` loader.

A caption comes from a metadata file or from a text file beside the image:

- `metadata.jsonl` (one JSON object per line) or `metadata.csv` (a header row), each row with
  `file_name`, the image's path relative to the folder holding the metadata file, and `text`, its
  caption. Metadata files may sit in the root or in any sub-folder; each describes the images below
  its folder, except those below a folder with a metadata file of its own (the nearest one wins).
- `NAME.txt` next to `NAME.png` (any image extension): the whole file is the caption.

An image with both a metadata row and a .txt file takes the metadata row's caption. Runs of
whitespace in a caption become single spaces.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence

from absl import logging

from diffusion_jax.runtime.errors import ConfigError

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
HOW_TO_CAPTION = (
  'add a metadata.jsonl with lines like {"file_name": "cat/1.png", "text": "a black cat"} (or a '
  "metadata.csv with columns file_name,text), or a text file beside each image (cat/1.png + "
  "cat/1.txt)"
)
_NAMED = 5  # rows named in a warning; the rest are counted
# The last caption read: (root, digest of the image paths and the caption files' sizes and
# times) -> its captions. Training builds the source twice; the second build reads no file again
# and does not warn again.
_last_read: dict[tuple[str, bytes], Captions] = {}


@dataclasses.dataclass(frozen=True)
class Captions:
  """The captions found for a folder's images.

  Attributes:
    texts: {image path, as given: caption}; an image without a caption file has no entry, and a
      caption file holding only whitespace gives "".
    fresh: whether the files were read now (False: the result of an identical earlier read,
      whose warnings were logged then).
  """

  texts: dict[str, str]
  fresh: bool


def _clean(text: str) -> str:
  return " ".join(text.split())


def _rows_jsonl(path: str) -> Iterator[tuple[int, str, str]]:
  with open(path, encoding="utf-8-sig") as f:
    lines = list(f)
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as exc:
      raise ConfigError(
        f"{path} line {number} is not valid JSON ({exc.msg}): write one JSON object per line."
      ) from None
    if not isinstance(row, dict):
      raise ConfigError(
        f"{path} line {number} is a JSON {type(row).__name__}, not an object: write one object "
        f'per line, like {{"file_name": "1.png", "text": "a black cat"}}.'
      )
    missing = [key for key in ("file_name", "text") if key not in row]
    if missing:
      raise ConfigError(
        f"{path} line {number} has no {' or '.join(map(repr, missing))}: every line needs "
        f'"file_name" (the image\'s path relative to the metadata file) and "text" (its caption).'
      )
    for key in ("file_name", "text"):
      if not isinstance(row[key], str):
        raise ConfigError(
          f"{path} line {number}: {key!r} is {row[key]!r}, not a string: write it in quotes."
        )
    yield number, row["file_name"], row["text"]


def _rows_csv(path: str) -> Iterator[tuple[int, str, str]]:
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    try:
      header = next(reader, None)
      if header is None:
        raise ConfigError(f"{path} is empty: write a header row file_name,text, then one row each.")
      header = [name.strip() for name in header]
      missing = [key for key in ("file_name", "text") if key not in header]
      if missing:
        raise ConfigError(
          f"{path} line 1: the header {','.join(header)!r} has no column "
          f"{' or '.join(map(repr, missing))}: name the columns file_name and text."
        )
      name_at, text_at = header.index("file_name"), header.index("text")
      for row in reader:
        if not any(cell.strip() for cell in row):
          continue
        if len(row) > len(header):
          # An unquoted comma in a caption splits it: reading it would cut the caption short.
          raise ConfigError(
            f"{path} line {reader.line_num} has {len(row)} fields, the header {len(header)}: "
            f'quote captions that hold commas ("a red, round ball").'
          )
        if len(row) < len(header):
          raise ConfigError(
            f"{path} line {reader.line_num} has {len(row)} of the header's {len(header)} "
            f"fields: give every row a file_name and a text."
          )
        yield reader.line_num, row[name_at], row[text_at]
    except csv.Error as exc:
      raise ConfigError(f"{path} line {reader.line_num} is not valid CSV ({exc}).") from None


def _rows(path: str) -> list[tuple[int, str, str]]:
  """The (line number, file_name, text) rows of a metadata file."""
  read_rows = _rows_jsonl if path.endswith(".jsonl") else _rows_csv
  try:
    return list(read_rows(path))
  except (OSError, UnicodeDecodeError) as exc:
    raise ConfigError(
      f"the metadata file {path!r} cannot be read as UTF-8 text ({type(exc).__name__}): fix it."
    ) from None


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as exc:
    raise ConfigError(
      f"the caption file {path!r} cannot be read as UTF-8 text ({type(exc).__name__}): fix or "
      f"remove it."
    ) from None


def _digest(root: str, images: Sequence[str], files: Sequence[str]) -> tuple[str, bytes]:
  digest = hashlib.blake2b()
  for image in images:
    digest.update(f"{image}\n".encode())
  for file in files:
    try:
      stat = os.stat(file)
      digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:  # Reading it will say why.
      digest.update(f"{file}\0\n".encode())
  return root, digest.digest()


def read_captions(root: str, images: Sequence[str]) -> Captions | None:
  """Reads the captions of a folder's images (see the module docstring for the conventions).

  A metadata row naming a file that is not among `images` is skipped with one warning naming the
  first few such rows.

  Args:
    root: the folder (`data.path`).
    images: paths of its image files, each below `root`.

  Returns:
    The captions, or None when the folder holds neither a metadata file nor a .txt file beside
    an image (an uncaptioned folder).

  Raises:
    ConfigError: a metadata file is malformed (invalid JSON or CSV, no `file_name` or `text`, a
      file_name outside its folder or given twice) or a caption file is not UTF-8 text; the
      one-line message names the file and the line.
  """
  root = os.path.abspath(root)
  by_path = {os.path.abspath(image): image for image in images}
  # Only the folders between an image and the root can hold a caption file that describes it.
  folders = set()
  for path in by_path:
    folder = os.path.dirname(path)
    while folder not in folders and len(folder) >= len(root):
      folders.add(folder)
      folder = os.path.dirname(folder)
  listing = {folder: set(os.listdir(folder)) for folder in sorted(folders)}
  metadata = {}
  for folder, names in listing.items():
    found = [name for name in METADATA_NAMES if name in names]
    if len(found) > 1:
      raise ConfigError(f"the folder {folder!r} holds both {' and '.join(found)}: keep one.")
    if found:
      metadata[folder] = os.path.join(folder, found[0])
  sidecars = {}
  for path in by_path:
    txt = os.path.splitext(os.path.basename(path))[0] + ".txt"
    if txt in listing[os.path.dirname(path)]:
      sidecars[path] = os.path.join(os.path.dirname(path), txt)
  if not metadata and not sidecars:
    return None

  key = _digest(root, list(by_path), [*metadata.values(), *sidecars.values()])
  if key in _last_read:
    return dataclasses.replace(_last_read[key], fresh=False)

  texts = {path: _clean(_read_text(file)) for path, file in sidecars.items()}
  skipped = []
  for folder, file in metadata.items():
    # Errors name the file by its full path, warnings (which name data.path) by the relative one.
    where = os.path.relpath(file, root)
    lines: dict[str, int] = {}
    for number, name, text in _rows(file):
      path = os.path.normpath(os.path.join(folder, name))
      if os.path.isabs(name) or not path.startswith(folder + os.sep):
        raise ConfigError(
          f"{file} line {number}: file_name {name!r} is not a path below the metadata file's "
          f"folder: write it relative to that folder (e.g. 'cat/1.png')."
        )
      if path in lines:
        raise ConfigError(
          f"{file} line {number} repeats the file_name {name!r} of line {lines[path]}: give "
          f"each image one row."
        )
      lines[path] = number
      if path not in by_path:
        skipped.append(f"{where} line {number} ({name!r}: no such image)")
        continue
      nearest = os.path.dirname(path)
      while nearest not in metadata:
        nearest = os.path.dirname(nearest)
      if nearest != folder:
        skipped.append(
          f"{where} line {number} ({name!r}: {os.path.relpath(metadata[nearest], root)} "
          f"describes it)"
        )
      else:
        texts[path] = _clean(text)
  if skipped:
    more = len(skipped) - _NAMED
    logging.warning(
      "data.path=%r: skipped %d metadata rows that name no image of the folder: %s%s.",
      root,
      len(skipped),
      "; ".join(skipped[:_NAMED]),
      f"; and {more} more" if more > 0 else "",
    )
  result = Captions({by_path[path]: text for path, text in texts.items()}, fresh=True)
  _last_read.clear()
  _last_read[key] = result
  return result
