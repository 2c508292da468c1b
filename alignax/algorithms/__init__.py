"""Algorithms, one module per stage: pretrain, sft, reward, ppo, dpo.

Each module provides `train(cfg)`; `run_stage` picks it from `cfg.stage`.
"""

from __future__ import annotations

import importlib

STAGES = {
    "pretrain": "alignax.algorithms.pretrain",
    "sft": "alignax.algorithms.sft",
    "reward": "alignax.algorithms.reward",
    "ppo": "alignax.algorithms.ppo",
    "dpo": "alignax.algorithms.dpo",
}


def run_stage(cfg):
  """Trains the stage `cfg.stage` names; returns its StageResult."""
  from alignax.config import ConfigError
  if cfg.stage not in STAGES:
    raise ConfigError(f"config.stage: unknown stage {cfg.stage!r}; stages: {', '.join(STAGES)}")
  return importlib.import_module(STAGES[cfg.stage]).train(cfg)
