"""Tests of the command line, main.py: one-line errors for bad input, and a train + sample run."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_jax.runtime import images

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "main.py")
TIMEOUT_S = 300


def cli_env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def start(args, env):
  return subprocess.Popen(
    [sys.executable, MAIN, *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def finish(process):
  stdout, stderr = process.communicate(timeout=TIMEOUT_S)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def override_flags(overrides):
  return [f"--config.{name}={value!r}" for name, value in overrides.items()]


# ---------------------------------------------------------------- bad input

# name -> (arguments, extra environment, text the error line must contain).
# Each fails before anything is compiled, so the processes run side by side.
ERROR_CASES = {
  "unknown_dataset": (
    ["--config=shapes", "--config.data.dataset=nosuchset"],
    {},
    ["data.dataset", "nosuchset", "unknown"],
  ),
  "repeated_seed": (
    ["--config=shapes", "--config.seeds=0,1,1"],
    {},
    ["seeds='0,1,1'", "distinct non-negative integers"],
  ),
  "unknown_prediction": (
    ["--config=shapes", "--config.diffusion.prediction=score"],
    {},
    ["diffusion.prediction='score'", "valid: eps, x0, v"],
  ),
  "missing_folder": (
    # The space-separated form of --config is accepted too.
    ["--config", "shapes", "--config.data.dataset=folder", "--config.data.path=/nonexistent"],
    {},
    ["data.path", "/nonexistent"],
  ),
  "image_size_not_halvable": (
    # A path to a config file works like a name.
    [f"--config={ROOT / 'configs' / 'shapes.py'}", "--config.data.image_size=30"],
    {},
    ["data.image_size=30", "multiple of 4"],
  ),
  "batch_not_divisible_by_devices": (
    ["--config=shapes", "--config.train.batch_size=3"],
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    ["train.batch_size=3", "device count 2"],
  ),
  "coordinator_without_process_count": (
    ["--config=shapes"],
    {"JAX_COORDINATOR_ADDRESS": "localhost:12345"},
    ["jax.distributed.initialize()", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"],
  ),
  "unknown_sampler": (
    ["--config=shapes", "--mode=sample", "--config.sample.sampler=ddpm2"],
    {},
    ["sample.sampler='ddpm2'", "valid: ddpm, ddim, dpm_solver++, heun"],
  ),
  "num_steps_out_of_range": (
    ["--config=shapes", "--config.sample.sampler=heun", "--config.sample.num_steps=401"],
    {},
    ["sample.num_steps=401", "sampler 'heun'", "from 1 to 400"],
  ),
  "unknown_config": (
    ["--config=nosuch"],
    {},
    ["--config=nosuch", "cifar10", "default", "shapes"],
  ),
  "sample_without_checkpoint": (
    ["--config=shapes", "--mode=sample"],
    {},
    ["--workdir=", "no checkpoint"],
  ),
  "misspelt_field": (
    ["--config=shapes", "--config.model.ch=64"],
    {},
    ["--config.model.ch", "no field model.ch", "model.channels"],
  ),
  "misspelt_section": (
    ["--config=shapes", "--config.modl.channels=64"],
    {},
    ["no field modl.channels", "did you mean model.channels"],
  ),
  "value_of_the_wrong_type": (
    ["--config=shapes", "--config.model.channels=abc"],
    {},
    ["--config.model.channels=abc", "int()"],
  ),
  "negative_batch_size": (
    ["--config=shapes", "--config.train.batch_size=-4"],
    {},
    ["train.batch_size=-4", "must be a positive integer"],
  ),
  "zero_samples": (
    ["--config=shapes", "--mode=sample", "--config.sample.num_samples=0"],
    {},
    ["sample.num_samples=0", "must be a positive integer"],
  ),
  "workdir_is_not_a_directory": (
    # The fixture makes the workdir's parent a file.
    ["--config=shapes"],
    {},
    ["cannot write", "Not a directory", "checkpoints already written are kept"],
  ),
  "autoencoder_has_no_sample_mode": (
    ["--config=shapes_autoencoder", "--mode=sample"],
    {},
    ["an autoencoder run has no --mode=sample", "--mode=eval"],
  ),
  "autoencoder_image_size_not_a_multiple_of_f": (
    ["--config=shapes_autoencoder", "--config.data.image_size=60"],
    {},
    ["data.image_size", "image size 60", "downsampling factor 8"],
  ),
  "cascade_has_no_eval_mode": (
    ["--config=shapes_cascade", "--mode=eval"],
    {},
    ["a cascade has --mode=train and --mode=sample", "eval.images"],
  ),
  "cascade_stage_without_checkpoint": (
    ["--config=shapes_cascade", "--mode=sample"],
    {},
    ["cascade stage 0", "no checkpoint", "train first"],
  ),
  "sds_without_a_prior": (
    ["--config=shapes_sds", "--mode=sds", "--config.sds.prior_workdir=/nonexistent/prior"],
    {},
    ["sds.prior_workdir='/nonexistent/prior' holds no trained run", "shapes_text"],
  ),
  "no_config_and_no_saved_run": (
    [],
    {},
    ["--config is required", "config.json", "shapes"],
  ),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
  """Runs every error case at once, each a child forked from one process that imported the CLI
  (tests/cli_cases.py); name -> (CompletedProcess, workdir)."""
  cases, workdirs = [], {}
  outputs = tmp_path_factory.mktemp("outputs")
  for name, (args, extra_env, _) in ERROR_CASES.items():
    workdir = tmp_path_factory.mktemp(name) / "run"
    if name == "sample_without_checkpoint":
      workdir.mkdir()
    if name == "workdir_is_not_a_directory":
      workdir = workdir.parent / "a_file" / "run"
      workdir.parent.write_text("not a directory")
    workdirs[name] = workdir
    out, err = str(outputs / f"{name}.out"), str(outputs / f"{name}.err")
    cases.append(
      {"argv": [*args, f"--workdir={workdir}"], "env": extra_env, "stdout": out, "stderr": err}
    )
  runner = subprocess.run(
    [sys.executable, str(ROOT / "tests" / "cli_cases.py")],
    input=json.dumps(cases),
    capture_output=True,
    text=True,
    env=cli_env(),
    timeout=TIMEOUT_S,
  )
  assert runner.returncode == 0, runner.stderr
  results = {}
  for (name, (args, _, _)), case, code in zip(
    ERROR_CASES.items(), cases, json.loads(runner.stdout), strict=True
  ):
    output = [pathlib.Path(case[k]).read_text() for k in ("stdout", "stderr")]
    results[name] = (subprocess.CompletedProcess(args, code, *output), workdirs[name])
  return results


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_is_a_one_line_error(error_runs, name):
  result, workdir = error_runs[name]
  expected_text = ERROR_CASES[name][2]
  assert result.returncode != 0, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1, result.stderr
  # The message is the last thing printed, on one line.
  assert lines[-1] == errors[0]
  for text in expected_text:
    assert text in errors[0]
  if name != "sample_without_checkpoint":
    # Rejected before the run started: nothing was written.
    assert not workdir.exists()


def test_unknown_config_lists_every_config(error_runs):
  result, _ = error_runs["unknown_config"]
  error = [line for line in result.stderr.splitlines() if line.startswith("error:")][0]
  names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
  assert re.search(r"valid: " + ", ".join(names) + r"\b", error), error


# ---------------------------------------------------------------- train, then sample


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_overrides, fast_compile_env):
  """A 2-step training run of the tiny setup, then --mode=sample, both through main.py."""
  workdir = tmp_path_factory.mktemp("cli") / "run"
  flags = ["--config=shapes", f"--workdir={workdir}", *override_flags(tiny_overrides)]
  env = cli_env(**fast_compile_env)
  trained = finish(start([*flags, "--config.train.num_steps=2"], env))
  # The default sampler (ddpm, every step) and DPM-Solver++ with 5 steps, side by side.
  sampled = start([*flags, "--mode=sample"], env)
  fast = [
    "--config.sample.sampler=dpm_solver++",
    "--config.sample.num_steps=5",
    "--config.sample.seed=1",
  ]
  # Without --config: the run's config.json, with sample.* overrides on top.
  sampled_fast = start([f"--workdir={workdir}", "--mode=sample", *fast], env)
  return workdir, trained, finish(sampled), finish(sampled_fast)


def test_train_then_sample(cli_run, tiny_overrides):
  workdir, trained, sampled, _ = cli_run
  assert trained.returncode == 0, trained.stderr
  assert sampled.returncode == 0, sampled.stderr

  with open(workdir / "config.json") as f:
    config = json.load(f)
  assert config["train"]["num_steps"] == 2
  for name, value in tiny_overrides.items():
    if name == "train.num_steps":
      continue
    section, field = name.split(".")
    assert config[section][field] == (list(value) if isinstance(value, tuple) else value), name

  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in records)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]

  size = tiny_overrides["data.image_size"]
  grid = np.load(workdir / "samples" / "step_0000002_dpm_solver++_20steps.npz")["samples"]
  assert grid.shape == (tiny_overrides["train.num_grid_samples"], size, size, 3)

  png = workdir / "samples" / "samples_0000002_seed0.png"
  npz = workdir / "samples" / "samples_0000002_seed0.npz"
  num = tiny_overrides["sample.num_samples"]
  assert f"wrote {num} samples: {png} and {npz}" in sampled.stdout
  samples = np.load(npz)["samples"]
  assert samples.dtype == np.uint8 and samples.shape == (num, size, size, 3)
  with Image.open(png) as image:
    np.testing.assert_array_equal(np.asarray(image), images.make_grid(images.upscale(samples)))


def test_sample_with_another_sampler(cli_run, tiny_overrides):
  workdir, _, sampled, sampled_fast = cli_run
  assert sampled_fast.returncode == 0, sampled_fast.stderr
  npz = workdir / "samples" / "samples_0000002_seed1.npz"
  num, size = tiny_overrides["sample.num_samples"], tiny_overrides["data.image_size"]
  assert f"wrote {num} samples:" in sampled_fast.stdout and str(npz) in sampled_fast.stdout
  samples = np.load(npz)["samples"]
  assert samples.dtype == np.uint8 and samples.shape == (num, size, size, 3)


def test_help_and_flag_files_work_without_a_config(tmp_path):
  env = cli_env()
  runs = {flag: start([flag], env) for flag in ("--help", "--helpfull")}
  flagfile = tmp_path / "flags.txt"
  # A flag file that names the config: read before --config is looked for.
  flagfile.write_text("--config=shapes\n--config.train.batch_size=-4\n")
  runs["flagfile"] = start([f"--flagfile={flagfile}", f"--workdir={tmp_path / 'run'}"], env)
  results = {name: finish(process) for name, process in runs.items()}
  for flag in ("--help", "--helpfull"):
    result = results[flag]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "--config is required" not in result.stderr
    assert "--workdir" in result.stdout and "--mode" in result.stdout
  result = results["flagfile"]
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: train.batch_size=-4")


def test_a_run_directory_describes_itself(cli_run, tiny_overrides, tmp_path, fast_compile_env):
  """Sampling takes the network from config.json; a config that contradicts the saved run, or a
  checkpoint of another network, is one line naming the difference, never a traceback."""
  workdir = cli_run[0]
  flags = ["--config=shapes", f"--workdir={workdir}", *override_flags(tiny_overrides)]
  # The same checkpoints without config.json: only the checkpoint can tell.
  bare = tmp_path / "bare"
  shutil.copytree(workdir, bare)
  (bare / "config.json").unlink()
  bare_flags = ["--config=shapes", f"--workdir={bare}", *override_flags(tiny_overrides)]
  env = cli_env(**fast_compile_env)
  channels = tiny_overrides["model.channels"]
  runs = {
    "sample": start([*flags, "--mode=sample", f"--config.model.channels={2 * channels}"], env),
    "train": start([*flags, "--config.diffusion.num_timesteps=30"], env),
    "bare": start([*bare_flags, "--mode=sample", f"--config.model.channels={2 * channels}"], env),
  }
  results = {name: finish(process) for name, process in runs.items()}
  expected = {
    "sample": [f"model.channels={2 * channels} (the run: {channels})", "new --workdir"],
    "train": ["diffusion.num_timesteps=30 (the run: 20)", "new --workdir"],
    "bare": ["checkpoint at step 2", "does not fit this config", "new --workdir"],
  }
  for name, result in results.items():
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(text in last for text in expected[name]), last
  # Nothing was trained or removed: the checkpoint is still the one of step 2.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  assert sorted(os.listdir(bare / "checkpoints")) == ["2"]
