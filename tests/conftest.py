"""Fixtures shared by the test modules."""

import os

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import shapes

# A training setup that compiles in seconds on a CPU: the shapes config with a one-level U-Net of
# width 8 on 8x8 images, 20 diffusion steps and a batch of 4. Keys are dotted config fields, so the
# same dict serves in-process configs and `--config.a.b=value` command lines.
TINY_OVERRIDES = {
  "data.num_examples": 64,
  "data.image_size": 8,
  "model.channels": 8,
  "model.channel_mult": (1,),
  "model.num_res_blocks": 0,
  "model.attn_resolutions": (),
  "model.num_groups": 4,
  "model.dropout": 0.0,
  "diffusion.num_timesteps": 20,
  "train.batch_size": 4,
  "train.num_steps": 6,
  "train.warmup_steps": 2,
  "train.cooldown_steps": 0,
  "train.log_every": 1,
  "train.checkpoint_every": 3,
  "train.sample_every": 3,
  "train.num_grid_samples": 4,
  "train.progress": False,
  "sample.batch_size": 4,
  "sample.num_samples": 4,
}

# The tiny setup made text-conditional (`tiny_config(..., text=True)`): a one-layer text encoder
# of width 16 and cross-attention at 8x8 (and in the middle); flips off, as captions name sides.
TINY_TEXT_OVERRIDES = {
  "model.cross_attn_resolutions": (8,),
  "model.text.vocab_size": 32,
  "model.text.width": 16,
  "model.text.num_layers": 1,
  "model.text.num_heads": 2,
  "model.text.max_length": 12,
  "data.random_flip": False,
}

# Compilation settings of every test module and of the subprocesses given `fast_compile_env`: a
# persistent cache, so that a program compiled once (in this process or in a `main.py`
# subprocess) is loaded from disk afterwards, and XLA's cheapest backend pipeline (same
# semantics, much faster to compile).
_CACHE_OPTIONS = {
  "jax_persistent_cache_min_compile_time_secs": 0.0,
  "jax_persistent_cache_min_entry_size_bytes": -1,
  "jax_disable_most_optimizations": True,
}


def _read_option(name):
  # Options with a context manager are attributes; plain flags are only readable with `read`.
  try:
    return getattr(jax.config, name)
  except AttributeError:
    return jax.config.read(name)


@pytest.fixture(scope="session")
def tiny_overrides():
  """The dotted-field overrides of the tiny training setup (a copy per session)."""
  return dict(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_config():
  """A factory: `tiny_config({"train.num_steps": 3, ...})` -> a fresh tiny ConfigDict;
  `text=True` makes it text-conditional (TINY_TEXT_OVERRIDES, below the given overrides)."""

  def make(overrides=None, text=False):
    config = shapes.get_config()
    text_overrides = TINY_TEXT_OVERRIDES if text else {}
    for name, value in {**TINY_OVERRIDES, **text_overrides, **(overrides or {})}.items():
      section, _, field = name.rpartition(".")
      target = config
      for part in filter(None, section.split(".")):
        target = target[part]
      target[field] = value
    return config

  return make


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory):
  """A persistent compilation cache directory shared by the whole session, every xdist worker
  and the subprocesses they start: a program compiled once anywhere is read from disk after. (An
  entry read while another process still writes it fails to decompress: jax warns and compiles.)"""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the workers' common base directory
  path = root / "jax_compilation_cache"
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope="module", autouse=True)
def fast_compile(jax_cache_dir):
  """Turns on the shared compilation cache and cheap compilation for each module; restores after.

  Every module gets it: programs compile in less than half the time and compute the same
  functions (the golden test pins XLA's default pipeline in a process of its own)."""
  options = {"jax_compilation_cache_dir": jax_cache_dir, **_CACHE_OPTIONS}
  previous = {name: _read_option(name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  # The cache decides once per process whether it is in use; make it look at the new settings.
  compilation_cache.reset_cache()
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def fast_compile_env(jax_cache_dir):
  """Environment variables giving a subprocess the settings of `fast_compile`."""
  options = {"jax_compilation_cache_dir": jax_cache_dir, **_CACHE_OPTIONS}
  return {name.upper(): str(value) for name, value in options.items()}
