"""Tests of diffusion_jax.parallel and of running over many devices and processes: the same
losses and params on 1, 4 and 8 simulated CPU devices and on 2 processes, each process reading only
its rows of every batch, samples that do not depend on the device count, the collectives of the
compiled train step, multi-process start-up, and one-line errors for batches that do not divide."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax.experiment import run as run_lib
from diffusion_jax.runtime import parallel
from diffusion_jax.runtime.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "parallel_worker.py")
TIMEOUT_S = 300

# Tolerances between topologies. Each example gets the same t, noise and dropout mask on any
# topology, so the runs differ only by float32 rounding (relative ~6e-8 per operation): the
# all-reduce adds the per-device partial sums of the gradient and the loss in another order, and
# XLA blocks the convolutions differently for another per-device batch.
LOSS_RTOL = 1e-5  # measured: at most 6.1e-8 relative
# Adam divides each gradient coordinate by its running RMS. A coordinate whose terms nearly cancel
# has a large relative rounding error, which Adam turns into an update error of up to lr (2e-3
# here) times that relative error, whatever the size of the parameter: so the bound is absolute.
# A parameter moves more than 20x the bound in the 3 steps (asserted of the median; measured
# 1.3e-3), so an example that drew another t, noise or dropout mask on another topology (an
# update error of order lr) would fail it.
PARAM_ATOL = 4e-5  # measured: at most 1.3e-5 (1 vs 8 devices), 4.1e-6 (2 processes vs 1)
PARAM_RTOL = 1e-5
# Sampling has no cross-device sum; only the per-call batch changes XLA's blocking, and rounding
# differences grow over the 10 reverse steps. A uint8 level is 1 / 127.5 = 7.8e-3.
SAMPLE_ATOL = 1e-4  # measured: at most 6.3e-6


# ---------------------------------------------------------------- helpers


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_env(fast_compile_env):
  """The environment of every worker: no inherited launcher variables, cheap compilation."""
  names = (parallel.COORDINATOR_ADDRESS, parallel.NUM_PROCESSES, parallel.PROCESS_ID)
  names += ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
  env = {
    k: v for k, v in os.environ.items() if k not in names and not k.startswith(("SLURM_", "OMPI_"))
  }
  # gloo is jax 0.10's default for collectives between CPU processes; stated so that it stays.
  return {**env, **fast_compile_env, "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


@pytest.fixture(scope="module")
def overrides(tiny_overrides):
  """The tiny setup with a global batch of 8 (1 example per device on 8), dropout and T = 10.

  Without warm-up, every layer moves within 3 steps: the zero-initialised output layers first,
  then the layers before them.
  """
  return {
    **tiny_overrides,
    "train.warmup_steps": 0,
    "model.dropout": 0.1,
    "diffusion.num_timesteps": 10,
    "train.batch_size": 8,
    "train.num_steps": 3,
    "sample.batch_size": 8,
  }


def run_workers(tmp_path, env, jobs):
  """Runs tests/parallel_worker.py once per job, side by side.

  Args:
    jobs: name -> (worker arguments, extra environment variables).

  Returns:
    name -> dict of the arrays the job wrote.
  """
  processes = {}
  for name, (args, extra_env) in jobs.items():
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed below
    command = [sys.executable, WORKER, *args, f"--out={tmp_path / name}.npz"]
    process = subprocess.Popen(
      command, cwd=ROOT, env={**env, **extra_env}, stdout=log, stderr=subprocess.STDOUT
    )
    processes[name] = (process, log)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    # Stop at the first failure: the other process of a pair would wait for it until timeout.
    while time.monotonic() < deadline:
      codes = [process.poll() for process, _ in processes.values()]
      if None not in codes or any(code for code in codes):
        break
      time.sleep(0.1)
  finally:
    for process, log in processes.values():
      if process.poll() is None:
        process.kill()
        process.wait()
      log.close()
  failed = [
    f"worker {name} ended with {process.returncode}:\n"
    + (tmp_path / f"{name}.log").read_text()[-3000:]
    for name, (process, _) in processes.items()
    if process.returncode != 0
  ]
  assert not failed, "\n\n".join(failed)
  return {name: dict(np.load(tmp_path / f"{name}.npz")) for name in jobs}


def job(command, devices, overrides, *extra, env=None):
  """A worker call on `devices` simulated CPU devices: (arguments, environment variables)."""
  flags = f"--xla_force_host_platform_device_count={devices}"
  env = {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **(env or {})}
  return [command, f"--overrides={json.dumps(overrides)}", *extra], env


def leaves(result, prefix):
  return {name: value for name, value in result.items() if name.startswith(prefix + "[")}


def assert_params_close(actual, expected):
  """Params and EMA params agree up to float reduction order, and the training moved them."""
  for prefix in ("params", "ema_params"):
    actual_leaves, expected_leaves = leaves(actual, prefix), leaves(expected, prefix)
    assert actual_leaves.keys() == expected_leaves.keys() and actual_leaves
    for name, value in actual_leaves.items():
      np.testing.assert_allclose(
        value, expected_leaves[name], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name
      )
  movement = np.concatenate(
    [
      np.abs(value - expected[name.replace("params", "initial_params", 1)]).ravel()
      for name, value in leaves(expected, "params").items()
    ]
  )
  assert np.median(movement) > 20 * PARAM_ATOL


# ---------------------------------------------------------------- the same run on any topology


def test_training_on_1_and_8_devices_gives_the_same_losses_and_params(
  tmp_path, worker_env, overrides
):
  runs = run_workers(
    tmp_path,
    worker_env,
    {
      "one": job("train", 1, overrides),
      "eight": job("train", 8, overrides),
    },
  )
  one, eight = runs["one"], runs["eight"]
  assert (int(one["device_count"]), int(eight["device_count"])) == (1, 8)
  # Both read the stream positions s * 8 + [0, 8) for steps s = 0, 1, 2.
  np.testing.assert_array_equal(one["indices"], np.arange(24).reshape(3, 8))
  np.testing.assert_array_equal(eight["indices"], one["indices"])
  np.testing.assert_allclose(eight["loss"], one["loss"], rtol=LOSS_RTOL, atol=0)
  assert len(set(one["loss"].tolist())) == 3  # a different batch and state at each step
  assert_params_close(eight, one)


def test_two_processes_read_their_rows_and_train_like_one(tmp_path, worker_env, overrides):
  # 2 processes x 2 devices against 1 process x 4 devices, on localhost with gloo collectives.
  port = free_port()

  def process(index):
    return {
      parallel.COORDINATOR_ADDRESS: f"localhost:{port}",
      parallel.NUM_PROCESSES: "2",
      parallel.PROCESS_ID: str(index),
    }

  runs = run_workers(
    tmp_path,
    worker_env,
    {
      "single": job("train", 4, overrides),
      "p0": job("train", 2, overrides, env=process(0)),
      "p1": job("train", 2, overrides, env=process(1)),
    },
  )
  single, parts = runs["single"], [runs["p0"], runs["p1"]]
  assert int(single["process_count"]) == 1 and int(single["device_count"]) == 4
  np.testing.assert_array_equal(single["indices"], np.arange(24).reshape(3, 8))
  for p, part in enumerate(parts):
    assert int(part["process_index"]) == p and int(part["process_count"]) == 2
    assert (int(part["device_count"]), int(part["local_device_count"])) == (4, 2)
    # Process p of 2 loaded exactly rows [4p, 4p + 4) of each global batch of 8.
    np.testing.assert_array_equal(part["indices"], single["indices"][:, 4 * p : 4 * p + 4])
  np.testing.assert_array_equal(
    np.concatenate([part["indices"] for part in parts], axis=1), single["indices"]
  )
  # The processes hold replicas of one global state: bitwise the same numbers.
  for name, value in parts[0].items():
    if name.startswith(("loss", "params", "ema_params")):
      np.testing.assert_array_equal(parts[1][name], value, err_msg=name)
  np.testing.assert_allclose(parts[0]["loss"], single["loss"], rtol=LOSS_RTOL, atol=0)
  assert_params_close(parts[0], single)


def test_samples_are_the_same_on_1_and_8_devices(tmp_path, worker_env, overrides):
  runs = run_workers(
    tmp_path,
    worker_env,
    {
      "one": job("sample", 1, overrides, "--samples=4:4,16:16"),
      # 4 images from one call of 8 (cut to 4); 16 from two calls of 8 (the second starts at
      # image 8) and from one call of 16.
      "eight": job("sample", 8, overrides, "--samples=4:8,16:8,16:16"),
    },
  )
  one, eight = runs["one"], runs["eight"]
  expected = one["samples_16_16"]
  assert expected.shape == (16, 8, 8, 3) and expected.dtype == np.float32
  # Distinct images, each depending on its index: differences far above the tolerance.
  assert np.abs(expected[1:] - expected[:-1]).max(axis=(1, 2, 3)).min() > 1000 * SAMPLE_ATOL
  for name, actual in [
    ("one 4:4", one["samples_4_4"]),
    ("eight 4:8", eight["samples_4_8"]),
    ("eight 16:8", eight["samples_16_8"]),
    ("eight 16:16", eight["samples_16_16"]),
  ]:
    np.testing.assert_allclose(
      actual, expected[: len(actual)], rtol=0, atol=SAMPLE_ATOL, err_msg=name
    )


# ---------------------------------------------------------------- the compiled train step

_COLLECTIVE = re.compile(
  r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) "
  r"(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
  re.MULTILINE,
)


def collectives(hlo):
  """op name -> list of the element counts of each such op's result, from HLO text."""
  found = {}
  for match in _COLLECTIVE.finditer(hlo):
    shapes = re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", match.group(1))
    size = sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)
    found.setdefault(match.group(2), []).append(size)
  return found


def test_compiled_train_step_all_reduces_gradients_and_gathers_nothing(
  tmp_path, worker_env, overrides
):
  out = run_workers(tmp_path, worker_env, {"hlo": job("hlo", 8, overrides)})["hlo"]
  hlo, num_params = str(out["hlo"]), int(out["num_params"])
  # Compiled with the cheap settings of `fast_compile_env`: the SPMD partitioner, which places
  # the collectives, runs at every optimisation level (with all optimisations on, the program
  # has the same single all-reduce).
  assert "num_partitions=8" in hlo.splitlines()[0]
  found = collectives(hlo)
  # Data parallelism needs one thing between devices: the sum of the gradients (and of the
  # loss). No batch-shaped tensor moves, and the replicated state needs no gathering. A batch
  # left replicated would need no all-reduce; params left sharded would need all-gathers.
  assert set(found) == {"all-reduce"}, found
  reduced = sum(found["all-reduce"])
  assert num_params <= reduced <= num_params + 8, (reduced, num_params)


# ---------------------------------------------------------------- batch sizes that do not divide


@pytest.mark.parametrize(
  "batch_size, counts, expected",
  [
    (12, dict(num_devices=8, process_count=1, local_device_count=8), "device count 8"),
    (0, dict(num_devices=1, process_count=1, local_device_count=1), "device count 1"),
    # Processes with 1, 1 and 2 devices: 4 devices, but 4 examples do not split 3 ways.
    (4, dict(num_devices=4, process_count=3, local_device_count=2), "process count 3"),
    # Processes with 4 and 2 devices: 12 examples split over 6 devices and over 2 processes,
    # but the 6 rows of the first process do not split over its 4 devices.
    (12, dict(num_devices=6, process_count=2, local_device_count=4), "6 examples per process"),
  ],
)
def test_batch_that_does_not_divide_is_a_one_line_error(batch_size, counts, expected):
  with pytest.raises(ValueError, match=expected) as excinfo:
    parallel.check_batch_size(batch_size, field="train.batch_size", **counts)
  message = str(excinfo.value)
  assert message.startswith(f"train.batch_size={batch_size} ") and "\n" not in message


@pytest.mark.parametrize(
  "batch_size, counts",
  [
    (8, dict(num_devices=8, process_count=1, local_device_count=8)),
    (8, dict(num_devices=4, process_count=2, local_device_count=2)),
    (24, dict(num_devices=6, process_count=2, local_device_count=4)),
  ],
)
def test_batch_that_divides_passes(batch_size, counts):
  parallel.check_batch_size(batch_size, **counts)


def test_counts_default_to_the_mesh_and_the_processes():
  mesh = parallel.make_mesh()
  parallel.check_batch_size(jax.device_count(), mesh)
  with pytest.raises(ValueError, match="sample.batch_size=3 .*process count 2"):
    parallel.check_batch_size(3, mesh, field="sample.batch_size", num_devices=1, process_count=2)


def test_make_run_rejects_the_batch_before_compiling(tiny_config, monkeypatch):
  # As if this were one of 3 processes: train.batch_size=4 cannot be split between them.
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(ConfigError, match=r"^train.batch_size=4 is not divisible by the process"):
    run_lib.make_run(tiny_config())


# ---------------------------------------------------------------- multi-process start-up

SLURM = {
  "SLURM_JOB_ID": "7",
  "SLURM_STEP_NODELIST": "node[1-2]",
  "SLURM_PROCID": "0",
  "SLURM_LOCALID": "0",
}


@pytest.mark.parametrize(
  "environ, expected",
  [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "explicit"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "explicit"),  # initialize names what lacks
    ({"JAX_NUM_PROCESSES": "1"}, None),
    ({**SLURM, "SLURM_NTASKS": "4"}, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),  # one task: a single process
    ({"SLURM_NTASKS": "4"}, None),  # without the variables of a job step started by srun
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "host-0"}, None),
  ],
)
def test_multiprocess_launcher_is_found_in_the_environment(environ, expected):
  assert parallel.multiprocess_launcher(environ) == expected


def test_a_single_process_does_not_initialize_distributed():
  assert parallel.initialize_distributed(environ={}) is False
  assert jax.process_count() == 1
