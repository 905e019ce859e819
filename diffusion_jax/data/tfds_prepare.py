"""Preparing a TensorFlow Datasets data set the first time, or one line saying why it cannot be.

Preparation (download + conversion to array_record) is tfds' own `download_and_prepare`; it needs
TensorFlow (the `prepare` extra) and either the internet or the official archives in a `manual_dir`.
Around it this module checks what tfds would only find out slowly or say in a traceback: that the
download hosts cannot be reached (tfds retries for minutes), and that a file in `manual_dir` is not
the official archive (compared with the checksums tfds ships for the data set).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request

from diffusion_jax.runtime.errors import ConfigError

PREPARE_INSTALL = (
  "`pip install 'diffusion_jax[prepare]'`, or in a clone `.venv/bin/pip install -r "
  "requirements-prepare.txt`"
)


def one_line(exc: BaseException, limit: int = 160) -> str:
  """The exception's type and the first line of its message, shortened."""
  text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
  text = text if len(text) <= limit else text[: limit - 3] + "..."
  return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _needs_tensorflow(exc: BaseException) -> bool:
  """True when `exc` (or its cause chain) is a failed import of TensorFlow."""
  while exc is not None:
    if isinstance(exc, ImportError) and "tensorflow" in str(exc).lower():
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def prepare_failed_message(name: str, where: str, reason: str) -> str:
  return (
    f"data.dataset={name!r} is not prepared in {where} and {reason}: prepare it once on a machine "
    f"with internet (the one-time preparation needs TensorFlow: {PREPARE_INSTALL}), or put the "
    f"official archive in a directory and pass --config.data.manual_dir=DIR, or set "
    f"--config.data.data_dir to where it is already prepared (array_record format)."
  )


def _reachable(host: str, port: int, timeout: float = 5.0) -> bool:
  """Whether a TCP connection to host:port opens within `timeout` seconds."""
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def _has_cached_downloads(builder) -> bool:
  """Whether an earlier run left finished downloads of this data set (tfds reuses them)."""
  folder = os.path.join(str(builder.data_dir_root), "downloads", builder.name)
  return os.path.isdir(folder) and any(".tmp." not in entry for entry in os.listdir(folder))


def _check_manual_files(name: str, url_infos: dict, manual_dir: str) -> list[str]:
  """Checks the sizes of the archives found in `manual_dir`; returns the URLs not found there."""
  missing = []
  for url, info in url_infos.items():
    path = os.path.join(manual_dir, info.filename) if manual_dir and info.filename else ""
    if not path or not os.path.isfile(path):
      missing.append(url)
    elif info.size is not None and os.path.getsize(path) != int(info.size):
      raise ConfigError(_not_official(name, path, info, f"{os.path.getsize(path):,} bytes"))
  return missing


def _not_official(name: str, path: str, info, found: str) -> str:
  return (
    f"data.manual_dir: {path} is not the official archive of {name!r} ({found}; expected "
    f"{info.filename} of {int(info.size):,} bytes, sha256 {info.checksum[:16]}...): replace it "
    f"with the original download of {info.filename}."
  )


def _fail_fast_offline(name: str, builder, urls: list[str]) -> None:
  """Raises ConfigError at once when a host that must be downloaded from cannot be reached."""
  if not urls or urllib.request.getproxies() or _has_cached_downloads(builder):
    return  # Through a proxy only tfds' own requests can tell.
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.hostname and not _reachable(parts.hostname, port):
      raise ConfigError(
        prepare_failed_message(
          name,
          str(builder.data_dir),
          f"its download from {parts.hostname} cannot start (no connection to the host)",
        )
      )


def prepare(builder, name: str, manual_dir: str) -> None:
  """Downloads (or reads from `manual_dir`) and converts `builder`'s data set to array_record.

  Args:
    builder: an unprepared `tfds.core.DatasetBuilder`.
    name: the data set as the user named it (for messages).
    manual_dir: directory holding the official archives, or "".

  Raises:
    ConfigError: one line saying why the data set cannot be prepared and what to do instead.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

  where = str(builder.data_dir)
  manual_dir = os.path.expanduser(manual_dir) if manual_dir else ""
  try:
    url_infos = dict(builder.url_infos or {})
  except Exception as exc:  # A missing dependency of tfds surfaces here first.
    reason = f"tfds failed ({one_line(exc)})"
    raise ConfigError(prepare_failed_message(name, where, reason)) from None
  missing = _check_manual_files(name, url_infos, manual_dir)
  _fail_fast_offline(name, builder, missing)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  try:
    # array_record is the format that supports random access (tfds' default is tfrecord).
    builder.download_and_prepare(download_config=download_config, file_format="array_record")
  except NonMatchingChecksumError:
    for info in url_infos.values():
      path = os.path.join(manual_dir, info.filename) if manual_dir and info.filename else ""
      if path and os.path.isfile(path):
        raise ConfigError(_not_official(name, path, info, "its checksum differs")) from None
    raise ConfigError(
      prepare_failed_message(name, where, "a downloaded file had the wrong checksum")
    ) from None
  except Exception as exc:  # Any other failure here has the same fixes for the user.
    if _needs_tensorflow(exc):
      reason = "preparing it needs TensorFlow, which is not installed"
    else:
      reason = f"preparing it failed ({one_line(exc)})"
    raise ConfigError(prepare_failed_message(name, where, reason)) from None
