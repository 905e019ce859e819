"""Host memory kept for reuse, for XLA:CPU on Linux (`config.reuse_host_memory`).

XLA:CPU allocates a program's temporary buffers on every call: about 2.3 GiB for the CIFAR-10
train step at batch 32. glibc's malloc serves blocks that large with fresh `mmap` pages, or from
per-thread arenas that hand freed memory back to the kernel, so every call faults the pages in
again and the kernel zeroes each one: a fifth of the step's time on a 2-core CPU
(benchmarks/results/train_step_cpu.md). `reuse_freed_memory` has malloc serve every thread from
one heap, never map blocks on their own and never return freed memory to the kernel, so the next
call finds its pages mapped. The process keeps its peak memory instead of giving it back between
calls.

Threads take their malloc arena at their first allocation, so this must run before JAX starts
its CPU client (before the first `jax.devices()` or computation); later, it helps only partly.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping

# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# One heap for all threads, no mmap'd blocks, no trimming (-1 becomes SIZE_MAX).
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))


def accelerator_expected(environ: Mapping[str, str] | None = None) -> bool:
  """Whether JAX will run on an accelerator, decided without starting its backends.

  JAX_PLATFORMS names the platforms when set; otherwise JAX uses a GPU or TPU when a plugin for
  one is installed (the `jax_plugins` entry points and namespace package, or libtpu).
  """
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() != "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def reuse_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse (see the module docstring).

  Returns:
    True if every setting took effect; False without glibc (macOS, musl), which is left as is.
  """
  if not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)


def configure(enabled: bool) -> bool:
  """`reuse_freed_memory` for a run on the CPU if `enabled` (`config.reuse_host_memory`).

  Call it before JAX starts its backends.

  Returns:
    True if malloc was set to keep freed memory.
  """
  return bool(enabled) and not accelerator_expected() and reuse_freed_memory()
