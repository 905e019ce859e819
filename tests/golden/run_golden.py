"""Runs the golden scenario and prints its fingerprint as JSON (used by test_golden.py).

The shapes config for 20 steps at 16x16: the loss of every step, a SHA-256 of the final
parameters and EMA parameters, and of a 16-image DDIM sample drawn from the checkpoint by
--mode=sample's code path. Runs in a fresh process with XLA's cheap compilation pipeline
(jax_disable_most_optimizations: the same functions, compiled in half the time) and no other
option, so the result does not depend on the options a test session sets.

  python tests/golden/run_golden.py WORKDIR
"""

import hashlib
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import shapes  # noqa: E402
from diffusion_jax.experiment import run as run_lib  # noqa: E402
from diffusion_jax.experiment import sample_mode, train  # noqa: E402
from diffusion_jax.runtime import checkpoints  # noqa: E402


def golden_config():
  config = shapes.get_config()
  config.train.num_steps = 20
  config.train.log_every = 1
  config.train.checkpoint_every = 20
  config.train.num_grid_samples = 0
  config.train.progress = False
  config.sample.sampler = "ddim"
  config.sample.num_steps = 20
  config.sample.num_samples = 16
  config.sample.batch_size = 16
  return config


def tree_digest(tree) -> str:
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def cpu() -> dict[str, str]:
  """The processor's name and a digest of its instruction-set flags (XLA:CPU compiles for them)."""
  info = {"name": platform.processor(), "flags": ""}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          info["name"] = value.strip()
        elif key.strip() == "flags":
          info["flags"] = hashlib.sha256(value.strip().encode()).hexdigest()[:16]
          break
  except OSError:
    pass
  return info


def main(workdir: str) -> None:
  jax.config.update("jax_disable_most_optimizations", True)
  config = golden_config()
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  run = run_lib.make_run(config)
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"))
  state = run_lib.restore_or_init(run, store)
  store.close()
  _, _, samples = sample_mode.sample_from_checkpoint(config, workdir)
  print(
    json.dumps(
      {
        "machine": {"cpu": cpu(), "jax": jax.__version__, "backend": jax.default_backend()},
        "losses": losses,
        "params_sha256": tree_digest(state.params),
        "ema_params_sha256": tree_digest(state.ema_params),
        "samples_sha256": hashlib.sha256(np.ascontiguousarray(samples).tobytes()).hexdigest(),
        "samples_mean": float(np.mean(samples)),
      }
    )
  )


if __name__ == "__main__":
  main(sys.argv[1])
