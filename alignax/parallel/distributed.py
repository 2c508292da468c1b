"""Multi-process jobs: `jax.distributed.initialize` from config or the environment."""

from __future__ import annotations

import os

import jax
from absl import logging

from alignax.parallel.config import DistributedConfig, ParallelError


def maybe_initialize_distributed(dist_cfg: DistributedConfig) -> bool:
  """`jax.distributed.initialize` from `parallel.distributed` or the environment, once.

  In order of precedence:
    parallel.distributed.coordinator="HOST:PORT"  with .num_processes and .process_id;
    parallel.distributed.coordinator="auto"       JAX's cluster detection (SLURM, Open MPI,
                                                   Cloud TPU, Kubernetes);
    $JAX_COORDINATOR_ADDRESS                       with $JAX_NUM_PROCESSES and $JAX_PROCESS_ID
                                                   when set, otherwise cluster detection.
  Otherwise (the default) the run is single-process. Must run before anything touches devices.

  Returns True when this process is part of a multi-process job.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator = str(dist_cfg.coordinator or "")
  if coordinator == "auto":
    jax.distributed.initialize()
  elif coordinator:
    num, pid = int(dist_cfg.num_processes), int(dist_cfg.process_id)
    if num < 1:
      raise ParallelError(f"parallel.distributed.num_processes: must be >= 1, got {num}")
    if not 0 <= pid < num:
      raise ParallelError(f"parallel.distributed.process_id: must be in [0, {num}), got {pid}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                               ("process_id", "JAX_PROCESS_ID")) if os.environ.get(v)}
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], **env)
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0 writes logs, metrics, progress and the resolved config."""
  return jax.process_index() == 0
