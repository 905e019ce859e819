"""Stopping a training run cleanly on SIGTERM or SIGINT, at a step every process agrees on.

The handlers only record the signal; the training loop looks at the record at each step
boundary, saves a checkpoint of that step and exits.
"""

import contextlib
import dataclasses
import signal
import threading

import jax
import numpy as np


@dataclasses.dataclass
class StopRequest:
  signal_name: str | None = None  # set by the handler; read once per step by the loop


@contextlib.contextmanager
def stop_on_signals(signums=(signal.SIGTERM, signal.SIGINT)):
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

  if threading.current_thread() is threading.main_thread():
    previous = {s: signal.signal(s, handler) for s in signums}
  try:
    yield request
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


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
