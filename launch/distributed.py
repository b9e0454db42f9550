"""Multi-host start-up through JAX's own runtime (`jax.distributed.initialize`).

One process per host (or per GPU); every process runs the same program on a global mesh
built from `jax.devices()`. Only process 0 writes files (metrics, summaries, plots); orbax
coordinates checkpoint writes across processes itself. On CPU the collectives between
processes go through gloo, so a multi-process run can be tested on one machine.
"""

import jax
from absl import logging


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
  """Joins a multi-process JAX run, once, before any other JAX call.

  Args:
    coordinator_address: `host:port` of process 0; with `num_processes` and `process_id`
      for a manual start (e.g. several processes on localhost).
    num_processes: total number of processes.
    process_id: this process's index.
    auto: call `jax.distributed.initialize()` without arguments, which detects the
      cluster (Cloud TPU pods, SLURM, Open MPI, Kubernetes).
  """
  if coordinator_address is None and not auto:
    return
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d; %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_chief() -> bool:
  """Whether this process writes files (process 0)."""
  return jax.process_index() == 0
