"""Train or sample a diffusion model.

  python main.py --config=shapes                      # train (resumes from --workdir)
  python main.py --config=shapes --mode=sample        # samples from the latest checkpoint
  python main.py --config=cifar10 --config.train.batch_size=64 --workdir=runs/c10

`--config=NAME` reads configs/NAME.py (a path to a .py file also works); `--config.a.b=value`
overrides any field. The default workdir is runs/NAME.

Several processes (a TPU pod, a GPU cluster) each run the same command; runs started by srun,
mpirun or with JAX_COORDINATOR_ADDRESS connect by themselves, Cloud TPU VM pod slices with
--distributed (see the README, "Many devices and TPU pods").
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config name (configs/NAME.py) or path.")
flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "sample", "eval"],
  "train (resumes from the workdir), sample (the latest checkpoint's EMA params) or eval "
  "(bits/dim of the latest checkpoint on eval.split).",
)
flags.DEFINE_bool(
  "distributed",
  False,
  "Join a multi-process run (jax.distributed.initialize) even when the environment names no "
  "launcher, as on Cloud TPU VM pod slices (jax finds the hosts in the TPU metadata). Runs "
  "started by srun, mpirun or with JAX_COORDINATOR_ADDRESS are detected without it.",
)


def available_configs() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f[0] != "_")


def resolve_config_arg(argv: list[str]) -> tuple[list[str], str]:
  """Turns `--config=NAME` into `--config=configs/NAME.py`; returns (argv, config name)."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      argv[i : i + 2] = [f"--config={argv[i + 1]}"]
      arg = argv[i]
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
      path, _, extra = value.partition(":")
      name = os.path.splitext(os.path.basename(path))[0]
      if not path.endswith(".py"):
        path = os.path.join(CONFIG_DIR, path + ".py")
      if not os.path.isfile(path):
        raise SystemExit(
          f"error: --config={value}: no such config; "
          f"valid: {', '.join(available_configs())} or a path to a .py file"
        )
      argv[i] = f"--config={path}" + (f":{extra}" if extra else "")
      return argv, name
  raise SystemExit(f"error: --config is required; valid: {', '.join(available_configs())}")


def main(argv):
  del argv
  # Orbax reports every save at INFO; keep the terminal for this program's own messages.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  from diffusion_jax.runtime import hostmem, parallel
  from diffusion_jax.runtime.errors import ConfigError, TrainingStopped

  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("runs", _CONFIG_NAME)
  # Before JAX starts its CPU client, whose threads take their malloc arenas when they start.
  if hostmem.configure(config.reuse_host_memory):
    logging.info("host memory: freed memory kept for reuse (config.reuse_host_memory)")
  try:
    # Before anything else touches JAX: the backends start with the processes connected.
    if parallel.initialize_distributed(force=FLAGS.distributed):
      logging.info(
        "process %d of %d with %d of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
      )
    from diffusion_jax.experiment import sample_mode, settings, train

    logging.info("workdir: %s", os.path.abspath(workdir))
    if FLAGS.mode == "train":
      train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "eval":
      from diffusion_jax.experiment import eval_mode

      result, path = eval_mode.evaluate(config, workdir)
      if jax.process_index() == 0:
        # The standard error needs two images at least.
        error = f" ± {result['bits_per_dim_stderr']:.4f}" if result["num_examples"] > 1 else ""
        print(
          f"bits/dim {result['bits_per_dim']:.4f}{error} "
          f"(step {result['step']}, {result['num_examples']} images of {result['split']}; "
          f"prior {result['prior']:.4f}, decoder {result['decoder']:.4f}, "
          f"KL terms {result['kl']:.4f}): {path}"
        )
    elif settings.study_seeds(config) or settings.sample_seeds(config):
      written, (_, summary) = sample_mode.sample_study(config, workdir)
      if jax.process_index() == 0:
        for png, npz in written:
          print(f"wrote {config.sample.num_samples} samples: {png} and {npz}")
        print(f"wrote the seed study summary {summary}")
    else:
      png, npz, samples = sample_mode.sample_from_checkpoint(config, workdir)
      if jax.process_index() == 0:
        print(f"wrote {len(samples)} samples: {png} and {npz}")
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  except FloatingPointError as e:
    raise SystemExit(f"error: {e}") from None
  except TrainingStopped as e:
    # A checkpoint is saved: SIGTERM (preemption, a batch scheduler's time limit) is a clean
    # exit, status 0; Ctrl-C keeps the shell's usual 130.
    if jax.process_index() == 0:
      print(e, file=sys.stderr)
    raise SystemExit(130 if e.signal_name == "SIGINT" else 0) from None


if __name__ == "__main__":
  sys_argv, _CONFIG_NAME = resolve_config_arg(sys.argv)
  app.run(main, argv=sys_argv)
