"""Device mesh, shardings and host-to-device placement for data-parallel training.

One mesh axis, "data", over every device of every process. The train state is replicated;
batches are sharded along their first axis. Code is written for one device and `jit` inserts
the collectives (the gradient all-reduce) from these shardings.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of arrays held whole on every device (params, optimizer state)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of arrays split along axis 0 over the "data" axis (batches)."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  """Raises ValueError (one line naming `field`) unless the batch divides over devices and hosts."""
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
      f"{field}={global_batch_size} is not divisible by the device count {num_devices}; "
      f"use a multiple of {num_devices}"
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"{field}={global_batch_size} is not divisible by the process count {jax.process_count()}"
    )


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays, sharded on axis 0, from this process's slice of a batch.

  Args:
    batch: numpy arrays [b, ...], this process's rows of the global batch.
    mesh: the device mesh.

  Returns:
    jax.Arrays [b * process_count, ...] sharded over the "data" axis.
  """
  sharding = batch_sharded(mesh)
  return {
    name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for name, value in batch.items()
  }
