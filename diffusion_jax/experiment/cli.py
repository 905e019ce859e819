"""The command line of main.py and of the installed `diffusion-jax` command.

  diffusion-jax --config=shapes                      # train (resumes from --workdir)
  diffusion-jax --config=shapes --mode=sample        # samples from the latest checkpoint
  diffusion-jax --workdir=runs/shapes --mode=sample  # the same, from the run's config.json

`--config=NAME` reads configs/NAME.py (a path to a .py file also works); `--config.a.b=value`
overrides any field. The default workdir is runs/NAME. Without --config, the workdir's
config.json is the config. Bad input ends in one line starting with "error:".
"""

import difflib
import logging as std_logging
import os
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs

FLAGS = flags.FLAGS
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")
SAVED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")


def define_flags() -> None:
  if "mode" in FLAGS:
    return
  config_flags.DEFINE_config_file("config", None, "Config name (configs/NAME.py) or path.")
  flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")
  flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "sample", "eval", "export", "sds"],
    "train (resumes from the workdir), sample (the latest checkpoint's EMA params, or the "
    "published weights of config.pretrained), eval (bits/dim of the latest checkpoint on "
    "eval.split), export (a fine-tuned Stable Diffusion run as a diffusers folder) or sds "
    "(score distillation of sds.prompt with the prior run in sds.prior_workdir, or Stable "
    "Diffusion from config.pretrained).",
  )
  flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process run (jax.distributed.initialize) even when the environment names no "
    "launcher, as on Cloud TPU VM pod slices (jax finds the hosts in the TPU metadata). Runs "
    "started by srun, mpirun or with JAX_COORDINATOR_ADDRESS are detected without it.",
  )


def config_dir() -> str:
  return os.path.dirname(os.path.abspath(configs.__file__))


def available_configs() -> list[str]:
  names = os.listdir(config_dir())
  return sorted(f[:-3] for f in names if f.endswith(".py") and f[0] != "_")


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of --name=V or --name V in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def resolve_config_arg(argv: list[str]) -> tuple[list[str], str | None]:
  """Flag files expanded; `--config=NAME` as a path to configs/NAME.py, or the workdir's saved
  config when --config is missing. Returns (argv, run name); exits with one line on bad input."""
  try:
    argv = FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error as e:
    raise SystemExit(f"error: {e}") from None
  asked = [arg.split("=")[0] for arg in argv[1:] if arg.split("=")[0] in HELP_FLAGS]
  if asked:
    print(__doc__.strip() + "\n")
    if "--helpfull" in asked or "--helpxml" in asked:
      print(FLAGS.get_help())
    else:
      print(FLAGS.module_help(sys.modules[__name__]))
      print("\nEvery config field is a flag too (--config.a.b=value): see configs/default.py.")
    raise SystemExit(0)
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      argv[i : i + 2] = [f"--config={argv[i + 1]}"]
      arg = argv[i]
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
      path, _, extra = value.partition(":")
      name = os.path.splitext(os.path.basename(path))[0]
      if not path.endswith(".py"):
        path = os.path.join(config_dir(), path + ".py")
      if not os.path.isfile(path):
        raise SystemExit(
          f"error: --config={value}: no such config; "
          f"valid: {', '.join(available_configs())} or a path to a .py file"
        )
      argv[i] = f"--config={path}" + (f":{extra}" if extra else "")
      _check_override_names(argv, path, extra)
      return argv, name
  workdir = _flag_value(argv, "workdir")
  if workdir and os.path.isfile(os.path.join(workdir, "config.json")):
    argv.insert(1, f"--config={SAVED_CONFIG}:{workdir}")
    return argv, os.path.basename(os.path.normpath(workdir))
  raise SystemExit(
    "error: --config is required (or --workdir=DIR of a run, whose config.json is then used); "
    f"valid: {', '.join(available_configs())}"
  )


def _check_override_names(argv: list[str], path: str, extra: str) -> None:
  """Exits with one line naming the closest fields when a --config.a.b override names none."""
  overrides = [a[len("--config.") :].split("=")[0] for a in argv if a.startswith("--config.")]
  if not overrides:
    return
  try:
    config = runpy.run_path(path)["get_config"](*([extra] if extra else []))
  except Exception:  # noqa: BLE001 - the flag parser reports a broken config file itself
    return
  fields, leaves = [], []

  def walk(node, prefix):
    for key, value in node.items():
      fields.append(prefix + key)
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
      else:
        leaves.append(prefix + key)

  walk(config, "")
  for name in overrides:
    if name not in fields:
      close = difflib.get_close_matches(name, leaves, n=3, cutoff=0.6)
      hint = f"; did you mean {', '.join(close)}?" if close else "; see configs/default.py"
      raise SystemExit(f"error: --config.{name}: the config has no field {name}{hint}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with bad values as one line instead of a usage dump or traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f"error: {str(e).splitlines()[0]}") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("'\"").splitlines()[0]
    raise SystemExit(f"error: {type(e).__name__} in the config flags: {message}") from None


def quiet_logs() -> None:
  """Drops messages that say nothing to the user: Orbax's per-save INFO lines, JAX's note that
  it found no TPU on a machine without one, tfds' advice to install OpenCV (PIL decodes) and its
  note that a data set not yet prepared has no dataset_info.json."""
  noise = ("OpenCV is not", "has no dataset_info.json")
  logging.get_absl_handler().addFilter(
    lambda record: (
      "orbax" not in record.pathname and not any(text in record.getMessage() for text in noise)
    )
  )
  std_logging.getLogger("jax._src.xla_bridge").addFilter(
    lambda record: "Unable to initialize backend" not in record.getMessage()
  )


def main(argv: list[str]) -> None:
  """Runs --mode on the parsed flags (absl's main function)."""
  del argv
  quiet_logs()
  import jax

  from diffusion_jax.pretrained import WeightsError
  from diffusion_jax.runtime import hostmem, interrupts, parallel
  from diffusion_jax.runtime.errors import ConfigError, SamplingStopped, TrainingStopped

  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("runs", _run_name)
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
    from diffusion_jax.experiment import cascade, sample_mode, saved_config, settings, train

    logging.info("workdir: %s", os.path.abspath(workdir))
    if cascade.enabled(config):
      _cascade(config, workdir, FLAGS.mode)
      return
    if FLAGS.mode == "sds":
      from diffusion_jax.experiment import sds_mode

      paths = sds_mode.run_sds(config, workdir)
      if jax.process_index() == 0:
        print(f"wrote {paths['npz']}, {paths['png']} and {paths['gif']}")
      return
    config = saved_config.reconcile(config, workdir, FLAGS.mode)
    published = config.get("pretrained") or config.model.name == settings.STABLE_DIFFUSION
    if published and FLAGS.mode in ("sample", "export"):
      _pretrained(config, workdir, FLAGS.mode)
    elif FLAGS.mode == "export":
      raise ConfigError(
        "--mode=export writes a fine-tuned Stable Diffusion run: set config.pretrained"
      )
    elif FLAGS.mode == "train":
      train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "eval":
      _evaluate(config, workdir)
    elif config.model.name == settings.AUTOENCODER:
      raise ConfigError(
        "an autoencoder run has no --mode=sample (it draws nothing); --mode=eval reconstructs "
        "held-out images, and its training grids show reconstructions"
      )
    elif settings.study_seeds(config) or settings.sample_seeds(config):
      with interrupts.stop_sampling_on_signals():
        written, (_, summary) = sample_mode.sample_study(config, workdir)
      if jax.process_index() == 0:
        for png, npz in written:
          print(f"wrote {config.sample.num_samples} samples: {png} and {npz}")
        print(f"wrote the seed study summary {summary}")
    else:
      with interrupts.stop_sampling_on_signals():
        png, npz, samples = sample_mode.sample_from_checkpoint(config, workdir)
      if jax.process_index() == 0:
        print(f"wrote {len(samples)} samples: {png} and {npz}")
  except (ConfigError, FloatingPointError, WeightsError) as e:
    raise SystemExit(f"error: {e}") from None
  except OSError as e:  # an unwritable or full workdir, a vanished file
    where = f" {e.filename}" if e.filename else ""
    raise SystemExit(
      f"error: cannot write or read{where}: {e.strerror or e}; check --workdir={workdir} "
      "(writable, space left); checkpoints already written are kept"
    ) from None
  except (TrainingStopped, SamplingStopped) as e:
    # Training saved a checkpoint, sampling wrote nothing: SIGTERM (preemption, a batch
    # scheduler's time limit) is a clean exit, status 0; Ctrl-C keeps the shell's usual 130.
    if jax.process_index() == 0:
      print(e, file=sys.stderr)
    raise SystemExit(130 if e.signal_name == "SIGINT" else 0) from None


def _pretrained(config, workdir: str, mode: str) -> None:
  """--mode=sample or export with config.pretrained: the published weights, or a fine-tuning
  run's latest checkpoint of them."""
  import jax

  from diffusion_jax.experiment import finetune, pretrained_mode
  from diffusion_jax.runtime import interrupts
  from diffusion_jax.runtime.errors import ConfigError

  unet_params, step = finetune.latest_unet(config, workdir)
  if mode == "export":
    if unet_params is None:
      raise ConfigError(f"--workdir={workdir} has no checkpoint of a fine-tuning run to export")
    folder = pretrained_mode.export(config, workdir, unet_params, step)
    if jax.process_index() == 0:
      print(f"wrote the diffusers folder {folder}")
    return
  with interrupts.stop_sampling_on_signals():
    png, npz, samples = pretrained_mode.sample(config, workdir, unet_params, step)
  if jax.process_index() == 0:
    print(f"wrote {len(samples)} samples: {png} and {npz}")


def _cascade(config, workdir: str, mode: str) -> None:
  """--mode=train or sample on a cascade config (its `cascade` section names the stages)."""
  import jax

  from diffusion_jax.experiment import cascade
  from diffusion_jax.runtime import interrupts
  from diffusion_jax.runtime.errors import ConfigError

  if mode == "train":
    cascade.train_stages(config, workdir)
    return
  if mode != "sample":
    raise ConfigError(
      f"a cascade has --mode=train and --mode=sample, not --mode={mode}; score its output with "
      "--mode=eval --config.eval.images=<its last stage's npz> on the last stage's run"
    )
  with interrupts.stop_sampling_on_signals():
    written = cascade.sample(config, workdir)
  if jax.process_index() == 0:
    for k, (png, npz, images) in enumerate(written):
      size = "x".join(map(str, images.shape[1:3]))
      print(f"stage {k}: wrote {len(images)} samples at {size}: {png} and {npz}")


def _evaluate(config, workdir: str) -> None:
  import jax

  from diffusion_jax.experiment import (
    autoencoder,
    eval_mode,
    quality_mode,
    run,
    saved_config,
    settings,
  )
  from diffusion_jax.runtime.errors import ConfigError

  metrics = quality_mode.parse_metrics(config.eval.metrics)
  if config.eval.images or set(metrics) - {"bpd"}:
    result, path = quality_mode.evaluate(config, workdir)
    if jax.process_index() == 0:
      for name in quality_mode.FIGURES:
        if name in result:
          print(f"{name} {result[name]:.6g}")
      print(f"{result['num_images']} images scored: {path}")
    if config.eval.images or "bpd" not in metrics:
      return

  if config.model.name == settings.STABLE_DIFFUSION:
    raise ConfigError("a Stable Diffusion fine-tuning run has no --mode=eval; --mode=sample draws")

  if config.model.name == settings.AUTOENCODER:
    ae_run = run.make_run(config)
    state = autoencoder.restore(ae_run, workdir)
    _print_reconstruction(*autoencoder.evaluate(config, workdir, ae_run, state))
    return
  result, path = eval_mode.evaluate(config, workdir)
  if jax.process_index() == 0:
    # The standard error needs two images at least.
    error = f" ± {result['bits_per_dim_stderr']:.4f}" if result["num_examples"] > 1 else ""
    latent = result.get("space") == "latent"
    where = (
      f"; a bound on the {'x'.join(map(str, result['latent_shape']))} latents scaled by "
      f"{result['scale_factor']:.4f}, with a continuous decoder: not comparable with pixel "
      "bits/dim"
      if latent
      else ""
    )
    print(
      f"bits/dim{' on latents' if latent else ''} {result['bits_per_dim']:.4f}{error} "
      f"(step {result['step']}, {result['num_examples']} images of {result['split']}; "
      f"prior {result['prior']:.4f}, decoder {result['decoder']:.4f}, "
      f"KL terms {result['kl']:.4f}{where}): {path}"
    )
  if settings.is_latent(config):
    # The autoencoder's reconstructions of the same images, written next to the figure above.
    ae_config = saved_config.load(config.latent.autoencoder_workdir)
    if ae_config is None:
      raise ConfigError(f"latent.autoencoder_workdir={config.latent.autoencoder_workdir!r} is gone")
    ae_config.data, ae_config.eval = config.data, config.eval
    ae_run = run.make_run(ae_config)
    state = autoencoder.restore(ae_run, config.latent.autoencoder_workdir)
    _print_reconstruction(*autoencoder.evaluate(ae_config, workdir, ae_run, state))


def _print_reconstruction(result: dict, path: str) -> None:
  import jax

  from diffusion_jax.experiment import autoencoder

  if jax.process_index() == 0:
    print(
      f"reconstructions of {result['num_examples']} images of {result['split']} by the "
      f"autoencoder at step {result['step']}: {path}"
    )
    for name in autoencoder.FIGURES:
      print(f"{name} {result[name]:.4f}")


_run_name = "run"


def run(argv: list[str] | None = None) -> None:
  """The entry point: main.py and the `diffusion-jax` console command."""
  global _run_name
  define_flags()
  argv, name = resolve_config_arg(list(sys.argv if argv is None else argv))
  _run_name = name or _run_name
  app.run(main, argv=argv, flags_parser=parse_flags)
