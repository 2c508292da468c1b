"""Pieces several stages share: per-process data slicing, fixed eval batches, LM state init."""

from __future__ import annotations

import itertools
from typing import Callable

import jax
import numpy as np

from alignax import parallel
from alignax.models import LanguageModel, abstract_lm, build_lm
from alignax.models.config import ModelConfig
from alignax.train.state import TrainState


def process_batch_size(global_batch: int) -> int:
  """This process's share of the global batch (each process feeds its local devices)."""
  n = jax.process_count()
  if global_batch % n:
    raise parallel.ParallelError(f"train.batch_size={global_batch} is not divisible by the "
                                 f"{n} processes")
  return global_batch // n


def shard_args() -> dict:
  """Each process reads a disjoint slice of the records."""
  return dict(shard_index=jax.process_index(), shard_count=jax.process_count())


def take_batches(iterator, n: int) -> list:
  """The first `n` batches of an iterator as a list (fixed eval sets are read once and reused)."""
  return list(itertools.islice(iterator, n))


def tokens_in(batch) -> int:
  """Non-padding tokens in a host LM batch, over all processes."""
  return int(np.count_nonzero(batch["segment_ids"])) * jax.process_count()


def init_lm_state(placement: parallel.Placement, model: ModelConfig, optimizer, seed: int,
                  params=None, extra_fn: Callable | None = None) -> tuple[LanguageModel, TrainState]:
  """The model and a TrainState on the mesh: fresh params from `seed`, or `params` (already loaded).

  `extra_fn(params) -> pytree` builds algorithm-specific state (e.g. reference params).
  """
  lm, _ = abstract_lm(model)
  key = jax.random.key(seed)
  if params is None:
    def init():
      _, p = build_lm(model, jax.random.fold_in(key, 0))
      return TrainState.create(p, optimizer, jax.random.fold_in(key, 1),
                               extra=extra_fn(p) if extra_fn else None)
    return lm, parallel.init_sharded(placement, init)
  params = jax.device_put(params, placement.state_sharding(params))
  state = TrainState.create(params, optimizer, jax.random.fold_in(key, 1),
                            extra=extra_fn(params) if extra_fn else None)
  return lm, placement.put_state(state)
