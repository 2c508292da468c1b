"""Algorithms, one module per stage, each with an `ALGORITHM` record (`base.Algorithm`).

`registry` lists them (one line each) and derives every stage list; `run_stage` trains the stage
`cfg.stage` names.
"""

from __future__ import annotations


def run_stage(cfg):
  """Trains the stage `cfg.stage` names; returns its StageResult."""
  from alignax.algorithms import registry
  return registry.get(cfg.stage).train(cfg)
