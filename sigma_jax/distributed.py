"""Multi-process (multi-host) runs through JAX's own runtime: no home-made orchestration.

One process per host (per TPU VM worker, or per local CPU process in tests), all running the
same command. ``initialize`` must be the first JAX call of the program; after it
``jax.devices()`` lists every device of every process and a mesh spans them all.

Conventions the stages follow:
  * every process builds the same global batch indices from (seed, step) and materialises only
    its own rows (``host_rows``); ``parallel.shard_batch`` assembles the global array with
    ``jax.make_array_from_process_local_data``;
  * Orbax checkpoints are written collectively (every process calls ``save``);
  * files (metrics, reports, DONE markers) are written by process 0 only, and progress bars
    are shown by process 0 only (``utils`` and ``launch.train`` enforce this);
  * stages that run on one host's devices (data, text_tokenizer, collab, tokenize) run on
    process 0 while the others wait at a barrier, then read the artifacts from the shared work
    directory (a bucket or NFS path on a pod);
  * a process that dies stops the others: JAX's coordination service misses its heartbeat and
    terminates the survivors with an error after ``heartbeat_timeout_s``.
"""
from __future__ import annotations

import logging
import os

import numpy as np

_ENV_ADDRESS = ("SIGMA_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
_ENV_COUNT = ("SIGMA_NUM_PROCESSES", "JAX_NUM_PROCESSES")
_ENV_ID = ("SIGMA_PROCESS_ID", "JAX_PROCESS_ID")
MODES = ("auto", "on", "off")
# Long enough for a host-local stage (the collab model, a TFDS build) on process 0.
DEFAULT_BARRIER_TIMEOUT_S = 24 * 3600


def _env(names) -> str | None:
  for n in names:
    if os.environ.get(n):
      return os.environ[n]
  return None


def _tpu_pod() -> bool:
  # A TPU VM that belongs to a multi-host slice lists its peers here.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout_s: int = 100, init_timeout_s: int = 300) -> bool:
  """Starts JAX's distributed runtime when the run is multi-process; call before any JAX work.

  Args:
    mode: 'off' never starts it; 'on' always does (on a TPU pod JAX discovers the peers itself);
      'auto' starts it when a process count above 1 is given (argument or environment) or the
      host is a worker of a multi-host TPU slice.
    coordinator_address: 'host:port' of process 0; default from $SIGMA_COORDINATOR_ADDRESS or
      $JAX_COORDINATOR_ADDRESS.
    num_processes, process_id: default from $SIGMA_NUM_PROCESSES / $JAX_NUM_PROCESSES and
      $SIGMA_PROCESS_ID / $JAX_PROCESS_ID.
    heartbeat_timeout_s: how long a silent peer is tolerated before the others stop with an
      error (instead of waiting forever in a collective).
    init_timeout_s: how long to wait for every process to connect.

  Returns:
    True when the distributed runtime was started.
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
  address = coordinator_address or _env(_ENV_ADDRESS)
  count = num_processes if num_processes is not None else _env(_ENV_COUNT)
  pid = process_id if process_id is not None else _env(_ENV_ID)
  count = int(count) if count is not None else None
  pid = int(pid) if pid is not None else None
  if mode == "off" or (mode == "auto" and not ((count or 1) > 1 or _tpu_pod())):
    return False
  if count is not None and count > 1:
    if address is None:
      raise ValueError(f"{count} processes need a coordinator address (--coordinator_address "
                       "or $JAX_COORDINATOR_ADDRESS, 'host:port' of process 0)")
    if pid is None or not 0 <= pid < count:
      raise ValueError(f"process id {pid} is not in [0, {count}) (--process_id or "
                       "$JAX_PROCESS_ID)")
  import jax
  jax.distributed.initialize(coordinator_address=address, num_processes=count,
                             process_id=pid, initialization_timeout=int(init_timeout_s),
                             heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def process_index() -> int:
  import jax
  return jax.process_index()


def process_count() -> int:
  import jax
  return jax.process_count()


def is_primary() -> bool:
  """True on process 0 (always, in a single-process run)."""
  return process_index() == 0


def host_rows(global_size: int) -> slice:
  """The contiguous rows of a global batch that this process's devices hold.

  `parallel.make_mesh` orders devices by process, so along the batch axes process p holds the
  p-th of ``process_count()`` equal blocks (what `jax.make_array_from_process_local_data`
  expects).

  Raises:
    ValueError: the batch does not split evenly over the processes.
  """
  count, index = process_count(), process_index()
  if global_size % count:
    raise ValueError(f"global batch {global_size} is not divisible by {count} processes")
  per = global_size // count
  return slice(index * per, (index + 1) * per)


def barrier(name: str, timeout_s: float = DEFAULT_BARRIER_TIMEOUT_S) -> None:
  """Blocks until every process reaches the barrier ``name``; a no-op in one process."""
  if process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the runtime's own barrier
  client = jax_distributed.global_state.client
  if client is None:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))


def agree(value: np.ndarray, what: str) -> None:
  """Raises when processes hold different values of something that must be identical."""
  if process_count() == 1:
    return
  from jax.experimental import multihost_utils
  multihost_utils.assert_equal(np.asarray(value), f"processes disagree on {what}")
