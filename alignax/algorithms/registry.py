"""The registry: one line per algorithm, and every stage list derived from the records.

Adding an algorithm costs one module (with its `ALGORITHM` record), one config file
(`configs/<name>.py`) and one line in `MODULES`. The order of `MODULES` is the pipeline's order
(each stage after the stages it builds on).
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the modules import base; the registry only names their records
  from alignax.algorithms.base import Algorithm

MODULES = (
    "alignax.algorithms.pretrain",
    "alignax.algorithms.sft",
    "alignax.algorithms.reward",
    "alignax.algorithms.ppo",
    "alignax.algorithms.grpo",
    "alignax.algorithms.rloo",
    "alignax.algorithms.dpo",
)


@functools.lru_cache(maxsize=None)
def algorithms() -> dict[str, Algorithm]:
  """{name: record} in pipeline order."""
  out = {}
  for path in MODULES:
    record = importlib.import_module(path).ALGORITHM
    if record.name in out:
      raise ValueError(f"two algorithms are named {record.name!r}")
    for field, stage in record.upstream.items():
      if stage not in out:
        raise ValueError(f"algorithm {record.name}: {field} builds on {stage!r}, which must come "
                         f"before it in registry.MODULES")
    out[record.name] = record
  return out


def names() -> tuple[str, ...]:
  return tuple(algorithms())


def get(name: str) -> Algorithm:
  """The record of `name`, or a ConfigError listing the stages."""
  table = algorithms()
  if name not in table:
    from alignax.config import ConfigError
    raise ConfigError(f"config.stage: unknown stage {name!r}; stages: {', '.join(table)}")
  return table[name]


def chat_stages() -> tuple[str, ...]:
  """Stages whose exports carry the chat template they were trained with."""
  return tuple(n for n, a in algorithms().items() if a.chat)


def default_pipeline() -> tuple[str, ...]:
  """The stages the pipeline runs unless `config.stages` says otherwise."""
  return tuple(n for n, a in algorithms().items() if not a.optional)


def policies() -> tuple[Algorithm, ...]:
  """Stages whose export is a policy, in pipeline order (the report's models)."""
  return tuple(a for a in algorithms().values() if a.policy)
