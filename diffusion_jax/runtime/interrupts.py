"""Stopping cleanly on SIGTERM or SIGINT: training at a step every process agrees on, sampling
within a network call.

The handlers only record the signal. The training loop looks at the record at each step
boundary, saves a checkpoint of that step and exits. A compiled sampling call cannot look at
anything until it returns, and Python runs signal handlers only when the main thread, which
waits for that call, runs Python again; so during sampling a thread reads the signals from
`signal.set_wakeup_fd` as they arrive, and the sampler's per-step host callback reads the record
(`sampling_stop`) and aborts the call.
"""

import contextlib
import dataclasses
import os
import signal
import sys
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclasses.dataclass
class StopRequest:
  signal_name: str | None = None  # set by the handler; read once per step by the loop


@contextlib.contextmanager
def _handlers(signums, handler, previous: dict):
  """Installs `handler` for `signums` within the block and fills `previous` with the handlers it
  replaced (before any signal can reach `handler`); puts them back on exit. Outside the main
  thread, where Python cannot install handlers, installs nothing and leaves `previous` empty."""
  try:
    if threading.current_thread() is threading.main_thread():
      for s in signums:
        previous[s] = signal.getsignal(s)
        signal.signal(s, handler)
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def stop_on_signals(signums=SIGNALS):
  """Within the block, SIGTERM and SIGINT only set `.signal_name` of the yielded request.

  The loop checks the request at each step boundary. A second signal while a stop is pending
  gets the previous handler (Ctrl-C twice: KeyboardInterrupt). The previous handlers come back
  on exit. Outside the main thread, where Python cannot install handlers, nothing changes.
  """
  request = StopRequest()
  previous = {}

  def handler(signum, frame):
    if request.signal_name is None:
      request.signal_name = signal.Signals(signum).name
      return
    for s, h in previous.items():
      signal.signal(s, h)
    signal.raise_signal(signum)

  with _handlers(signums, handler, previous):
    yield request


# The requests of the open `stop_sampling_on_signals` blocks.
_sampling_requests: list[StopRequest] = []


def sampling_stop() -> str | None:
  """The signal that asked the running sampling to stop, or None; cheap enough for every step."""
  for request in _sampling_requests:
    if request.signal_name:
      return request.signal_name
  return None


@contextlib.contextmanager
def stop_sampling_on_signals(request: StopRequest | None = None, signums=SIGNALS):
  """Within the block, the first SIGTERM or SIGINT asks sampling to stop; a second one exits.

  The first signal sets `.signal_name` of the yielded request (`request`, e.g. the training
  loop's, so that the loop also stops; a new one if None) the moment it arrives, also while the
  main thread waits for a compiled call: sampling functions made with progress reporting check
  it at every network call and abort (`generate.generate` then raises `SamplingStopped`). A
  second signal while the stop is pending ends the process at once, with status 128 + the
  signal's number (130 for Ctrl-C), after a one-line message. The previous handlers come back on
  exit. Outside the main thread no handler is installed, but a request set by hand still stops
  sampling.
  """
  request = StopRequest() if request is None else request
  previous = {}
  _sampling_requests.append(request)
  try:
    if threading.current_thread() is not threading.main_thread():
      yield request
      return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    watcher = threading.Thread(
      target=_watch, args=(read_fd, request, signums), name="stop-sampling", daemon=True
    )
    watcher.start()
    # Python's C-level handler writes each signal's number to the wakeup fd as it arrives; the
    # Python-level handler (run later, on the main thread) must not count it a second time.
    with _handlers(signums, lambda signum, frame: None, previous):
      previous_fd = signal.set_wakeup_fd(write_fd)
      try:
        yield request
      finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watcher reads the end of the pipe and returns
        watcher.join()
        os.close(read_fd)
  finally:
    _sampling_requests.remove(request)


def _watch(read_fd: int, request: StopRequest, signums) -> None:
  numbers = {int(s) for s in signums}
  while data := os.read(read_fd, 64):
    for signum in data:
      if signum not in numbers:
        continue
      name = signal.Signals(signum).name
      if request.signal_name is not None:
        os.write(2, f"\n{name} again: exiting now\n".encode())
        os._exit(128 + signum)
      request.signal_name = name
      # (No jax here: this thread must not start a backend. Every process that got it says so.)
      sys.stderr.write(f"\n{name}: stopping sampling at the next step (again to exit now)\n")
      sys.stderr.flush()


def stop_agreed(request: StopRequest) -> str | None:
  """The signal that stops every process at this step, or None.

  With several processes the checkpoint is written by all of them together, so they must stop at
  the same step: the first process that got a signal decides for all (a small all-gather).
  """
  if jax.process_count() == 1:
    return request.signal_name
  from jax.experimental import multihost_utils

  code = {None: 0, "SIGTERM": 1, "SIGINT": 2}.get(request.signal_name, 1)
  codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
  return {1: "SIGTERM", 2: "SIGINT"}.get(int(codes.max()))
