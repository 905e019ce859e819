"""Tests of `config.reuse_host_memory`: freed host memory is reused without page faults, and only
runs on the CPU are changed."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from diffusion_jax.runtime import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# Allocates, fills and frees a 256 MiB block twice; prints whether the settings took effect and
# the page faults of the second round. Run in a fresh process: the settings are process-wide.
_FAULTS = textwrap.dedent(
  """
  import ctypes, resource, sys
  from diffusion_jax.runtime import hostmem
  applied = hostmem.reuse_freed_memory() if sys.argv[1] == "reuse" else False
  libc = ctypes.CDLL(None)
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
  libc.free.argtypes = (ctypes.c_void_p,)
  size = 256 << 20
  def fill_and_free():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
  fill_and_free()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  fill_and_free()
  print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  """
)


def second_round_faults(mode: str) -> tuple[str, int]:
  result = subprocess.run(
    [sys.executable, "-c", _FAULTS, mode],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "PYTHONPATH": ROOT},
  )
  applied, faults = result.stdout.split()
  return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
  applied, faults = second_round_faults("reuse")
  default_applied, default_faults = second_round_faults("default")
  assert (applied, default_applied) == ("True", "False")
  # By default the block is mapped afresh and every page faults again (one fault per 4 KiB page,
  # fewer with huge pages: at least one per 2 MiB); kept for reuse, its pages stay mapped.
  assert default_faults >= (256 << 20) // (2 << 20)
  assert faults <= default_faults // 100


@pytest.mark.parametrize(
  "platforms, expected",
  [("cpu", False), (" CPU ", False), ("cuda", True), ("cuda,cpu", True), ("tpu", True)],
)
def test_jax_platforms_decide_the_platform(platforms, expected):
  assert hostmem.accelerator_expected({"JAX_PLATFORMS": platforms}) is expected


def test_installed_plugins_decide_without_jax_platforms(monkeypatch):
  monkeypatch.setattr(hostmem.importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(hostmem.importlib.util, "find_spec", lambda name: None)
  assert not hostmem.accelerator_expected({})
  monkeypatch.setattr(hostmem.importlib.util, "find_spec", lambda name: name == "libtpu" or None)
  assert hostmem.accelerator_expected({})
  monkeypatch.setattr(hostmem.importlib.util, "find_spec", lambda name: None)
  monkeypatch.setattr(hostmem.importlib.metadata, "entry_points", lambda group: ["cuda12"])
  assert hostmem.accelerator_expected({})


def test_configure_leaves_accelerator_runs_and_disabled_runs_alone(monkeypatch):
  calls = []
  monkeypatch.setattr(hostmem, "reuse_freed_memory", lambda: calls.append(1) or True)
  monkeypatch.setattr(hostmem, "accelerator_expected", lambda: True)
  assert not hostmem.configure(True)
  monkeypatch.setattr(hostmem, "accelerator_expected", lambda: False)
  assert not hostmem.configure(False)
  assert not calls
  assert hostmem.configure(True)
  assert calls == [1]
