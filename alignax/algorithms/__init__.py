"""Algorithms, one module per stage, each with an `ALGORITHM` record (`base.Algorithm`).

`registry` lists them (one line each) and derives every stage list; `run_stage` trains the stage
`cfg.stage` names.
"""

from __future__ import annotations


def run_stage(cfg):
  """Trains the stage `cfg.stage` names and returns its StageResult: validates the config, runs
  the upstream stages whose exports are missing, adopts the init export's model and tokenizer,
  then hands the record to the shared runner."""
  from alignax.algorithms import registry
  from alignax.algorithms.common import adopt_export, ensure_export
  from alignax.config import validate_common
  from alignax.train.runner import run_training
  record = registry.get(cfg.stage)
  # Bad keys fail before any upstream stage is run for this one.
  validate_common(cfg)
  if record.validate is not None:
    record.validate(cfg)
  for field in record.needed_upstream(cfg):
    ensure_export(cfg[field])
  model = None
  if "init" in record.upstream:
    model = adopt_export(cfg, cfg.init.workdir, chat_stages=registry.chat_stages())
  return run_training(cfg, record.build, record.export, validate=record.validate, model_config=model)
