"""Runs main.py and sends this process a signal while it trains a given step (for test_train.py).

  python tests/fault_worker.py SIGNAL STEP WAIT_FOR main.py-arguments...

SIGNAL (SIGKILL, SIGTERM, SIGINT) goes out when the loop fetches the batch of step STEP of a run
that starts from scratch, that is in the middle of step STEP. WAIT_FOR is a directory (a
checkpoint) to wait for first, or "-": the signal then arrives at a known point of the run.
"""

import os
import pathlib
import signal
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_jax.experiment import cli  # noqa: E402
from diffusion_jax.runtime import parallel  # noqa: E402


def signal_at_step(signum: int, step: int, wait_for: str) -> None:
  put_batch = parallel.put_batch
  calls = 0

  def put_batch_then_signal(*args, **kwargs):
    nonlocal calls
    calls += 1
    if calls == step:
      while wait_for != "-" and not os.path.isdir(wait_for):
        time.sleep(0.01)
      os.kill(os.getpid(), signum)
    return put_batch(*args, **kwargs)

  parallel.put_batch = put_batch_then_signal


if __name__ == "__main__":
  name, step, wait_for, *args = sys.argv[1:]
  signal_at_step(signal.Signals[name], int(step), wait_for)
  cli.run([os.path.join(ROOT, "main.py"), *args])
