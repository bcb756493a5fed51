"""Where arrays live: the device mesh, batches split over devices and processes, results gathered back.

One 1-D mesh with axis "data" over every device of every process (ordered by process, so process p's
devices hold rows [p * B/P, (p + 1) * B/P) of a global batch of B), or over this process' local devices
only (`local_mesh`, for single-process inference that uses every local GPU). Params are replicated,
batches sharded along their first axis. Works unchanged from one CPU to a multi-host TPU pod: every
function here is called by every process with its own slice of the data.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """The data-parallel mesh over `devices` (default: every device of every process, process-major)."""
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
  """The data-parallel mesh over this process' devices only."""
  return make_mesh(jax.local_devices())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Places a pytree on every device of the mesh (replicated). Host values must be equal on every process."""
  return jax.device_put(tree, replicated(mesh))


def local_rows(mesh: Mesh) -> int:
  """How many devices of the mesh this process holds: its share of a global batch is that many parts."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """This process' numpy rows of a global batch -> global jax arrays sharded over the data axis. Each
  process passes its own rows (B / process_count of them, divisible by its local device count)."""
  sharding = batch_sharding(mesh)
  n_local = local_rows(mesh)
  out = {}
  for k, v in batch.items():
    if v.shape[0] % n_local:
      raise ValueError(f"batch[{k!r}] has {v.shape[0]} examples, not divisible by {n_local} local devices")
    out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
  return out


def process_slice(n: int, mesh: Mesh) -> slice:
  """The rows of a global batch of `n` (a multiple of the mesh size) that this process holds."""
  per_device = n // mesh.size
  own = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  return slice(own[0] * per_device, (own[-1] + 1) * per_device)


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
  """`x` with its last row repeated until its first axis is a multiple of `multiple`."""
  extra = -len(x) % multiple
  return x if extra == 0 else np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])


def gather(tree):
  """Global arrays -> numpy arrays of their full value on every process (an all-gather across processes
  for sharded arrays; a plain device_get in a single process)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int = 60) -> None:
  """Joins this process to a multi-process JAX run (`jax.distributed.initialize`), before any computation.

  What is not given is taken from the environment: JAX_COORDINATOR_ADDRESS (read by JAX itself),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, or, with none of them, JAX's own cluster detection (TPU pod slices,
  SLURM, Open MPI, Kubernetes). On CPUs the cross-process collectives go through gloo. If a process dies,
  the others stop with JAX's error "...another task died..." within `heartbeat_timeout` seconds (it missed
  its heartbeats) or at once (the coordinator, process 0, closed its socket): no silent hang.
  """
  import os
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  # Collectives between CPU processes need an implementation; it is unused on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=int(heartbeat_timeout))


def _env_int(name: str) -> int | None:
  import os
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None
