"""Device mesh, shardings, host-to-device placement and multi-process start-up.

One mesh axis, "data", over every device of every process. The train state is replicated;
batches are sharded along their first axis. Code is written for one device and `jit` inserts
the collectives (the gradient all-reduce) from these shardings.

A run over several processes (TPU pod hosts, GPU cluster nodes) starts the same program in
every process; `initialize_distributed` connects them before anything else uses JAX. Each
process then reads only its rows of every global batch and `put_batch` assembles the global
array from them.
"""

import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.runtime.errors import ConfigError

DATA_AXIS = "data"

# Set on every process of a launch without a cluster launcher. jax.distributed reads the first
# itself; jax 0.10 has no variables for the other two, so `initialize_distributed` reads them.
COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0, e.g. 10.0.0.1:1234
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"  # 0 .. JAX_NUM_PROCESSES - 1


def _count(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name, "1"))
  except ValueError:
    return 1


def multiprocess_launcher(environ: Mapping[str, str] | None = None) -> str | None:
  """Names the launcher of a multi-process run found in the environment, or None.

  Recognised are the three variables above and the launchers whose variables
  `jax.distributed.initialize()` reads by itself (jax._src.clusters), each only when it starts
  more than one process:

    "explicit": JAX_COORDINATOR_ADDRESS is set, or JAX_NUM_PROCESSES > 1;
    "slurm": srun with SLURM_NTASKS > 1;
    "ompi": Open MPI's mpirun with OMPI_COMM_WORLD_SIZE > 1;
    "tpu": Cloud TPU on GKE, TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES) naming several hosts.

  A Cloud TPU VM pod slice lists its hosts only in the VM metadata, which this does not query;
  start those runs, and those of clusters jax detects otherwise, with `main.py --distributed`.

  Args:
    environ: the environment variables (default os.environ).
  """
  environ = os.environ if environ is None else environ
  if environ.get(COORDINATOR_ADDRESS) or _count(environ, NUM_PROCESSES) > 1:
    return "explicit"
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(name in environ for name in slurm) and _count(environ, "SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([host for host in hosts.split(",") if host.strip()]) > 1:
    return "tpu"
  return None


def initialize_distributed(force: bool = False, environ: Mapping[str, str] | None = None) -> bool:
  """Joins a multi-process run with `jax.distributed.initialize()`; call before any other JAX use.

  Args:
    force: initialize even when `multiprocess_launcher` finds no launcher (Cloud TPU VM pod
      slices, or a cluster that jax detects but this function does not).
    environ: the environment variables (default os.environ); JAX_COORDINATOR_ADDRESS,
      JAX_NUM_PROCESSES and JAX_PROCESS_ID, when set, are passed to jax, which finds what they
      leave unset from the cluster's variables.

  Returns:
    True if this process joined a multi-process run, False for a single-process run.

  Raises:
    ConfigError: the environment does not describe the run completely (one line).
  """
  environ = os.environ if environ is None else environ
  launcher = multiprocess_launcher(environ)
  if launcher is None and not force:
    return False
  kwargs = {}
  try:
    if environ.get(COORDINATOR_ADDRESS):
      kwargs["coordinator_address"] = environ[COORDINATOR_ADDRESS]
    for name, arg in ((NUM_PROCESSES, "num_processes"), (PROCESS_ID, "process_id")):
      if environ.get(name):
        kwargs[arg] = int(environ[name])
    jax.distributed.initialize(**kwargs)
  except (TypeError, ValueError) as e:
    message = str(e).replace("\n", " ").rstrip(".")
    raise ConfigError(
      f"jax.distributed.initialize() failed ({launcher or '--distributed'}): {message}; "
      f"launch with srun, mpirun or on a Cloud TPU pod, or set {COORDINATOR_ADDRESS}, "
      f"{NUM_PROCESSES} and {PROCESS_ID} on every process"
    ) from e
  logging.info("joined a multi-process run (%s)", launcher or "--distributed")
  return True


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of arrays held whole on every device (params, optimizer state)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """The sharding of arrays split along `axis` over the "data" axis (batches).

  axis=1 is for batches of a seed study, [K seeds, B, ...]: every device holds its rows of each
  seed's batch.
  """
  return NamedSharding(mesh, PartitionSpec(*([None] * axis), DATA_AXIS))


def check_batch_size(
  global_batch_size: int,
  mesh: Mesh | None = None,
  field: str = "train.batch_size",
  *,
  num_devices: int | None = None,
  process_count: int | None = None,
  local_device_count: int | None = None,
) -> None:
  """Raises ValueError (one line naming `field`) unless the batch divides over devices and hosts.

  The global batch B must divide over all devices and over the processes, and each process's
  B / process_count rows over that process's own devices.

  Args:
    global_batch_size: B, examples per call over all processes.
    mesh: the device mesh; the counts not given explicitly come from it and the running processes.
    field: the config field the message names.
    num_devices, process_count, local_device_count: the counts to check against (tests check
      several-host topologies with them in one process).
  """
  num_devices = mesh.devices.size if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  if local_device_count is None:
    local_device_count = len(mesh.local_devices)
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
      f"{field}={global_batch_size} is not divisible by the device count {num_devices}; "
      f"use a multiple of {num_devices}"
    )
  if global_batch_size % process_count:
    raise ValueError(
      f"{field}={global_batch_size} is not divisible by the process count {process_count}; "
      f"use a multiple of {process_count}"
    )
  per_process = global_batch_size // process_count
  if per_process % local_device_count:
    raise ValueError(
      f"{field}={global_batch_size} gives {per_process} examples per process, not divisible "
      f"by the {local_device_count} devices of a process; "
      f"use a multiple of {process_count * local_device_count}"
    )


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, axis: int = 0) -> dict[str, jax.Array]:
  """Assembles global arrays, sharded on `axis`, from this process's slice of a batch.

  Args:
    batch: numpy arrays [b, ...] (or [K, b, ...] with axis=1), this process's rows of the
      global batch.
    mesh: the device mesh.
    axis: the batch axis.

  Returns:
    jax.Arrays [b * process_count, ...] sharded over the "data" axis.
  """
  sharding = batch_sharded(mesh, axis)
  return {
    name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for name, value in batch.items()
  }
