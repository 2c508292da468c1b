"""Algorithms, one module per stage, each with an `ALGORITHM` record (`base.Algorithm`).

`registry` lists them (one line each) and derives every stage list; `run_stage` trains the stage
`cfg.stage` names.
"""

from __future__ import annotations


def _prepare(cfg):
  """(record, the config to train): validates `cfg`, runs missing upstream stages, and returns a
  copy with the init export's model and tokenizer adopted (or `cfg` for a stage without one)."""
  from alignax.algorithms import registry
  from alignax.algorithms.common import adopt_export
  record = registry.get(cfg.stage)
  # Bad keys, here or in an upstream stage that would run first, fail before any stage runs.
  validate_chain(cfg)
  for field in record.needed_upstream(cfg):
    ensure_export(cfg[field])
  if "init" in record.upstream:
    cfg = adopt_export(cfg, cfg.init.workdir, chat_stages=registry.chat_stages())
  return record, cfg


def validate_chain(cfg, _chain: tuple[str, ...] = ()) -> None:
  """Validates `cfg` and the config of every upstream stage that would be run first (its export
  missing, `init.run_if_missing` set), recursively; a ConfigError names the upstream config."""
  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms import registry
  from alignax.algorithms.common import upstream_config
  from alignax.config import ConfigError, resolve
  record = registry.get(cfg.stage)
  try:
    resolve(cfg)
    if record.validate is not None:
      record.validate(cfg)
  except ConfigError as e:
    if not _chain:
      raise
    raise ConfigError(f"{' -> '.join(_chain)} (run first into {cfg.workdir}): {e}") from None
  for field in record.needed_upstream(cfg):
    init = cfg[field]
    if ckpt_lib.has_export(init.workdir) or not init.run_if_missing or not init.config:
      continue
    if len(_chain) > 8:
      raise ConfigError(f"config.{field}.config: the chain of upstream stages loops ({' -> '.join(_chain)})")
    validate_chain(upstream_config(init), _chain + (init.config,))


def ensure_export(init_cfg) -> str:
  """The workdir of a finished previous stage, running it first when it is missing.

  Raises CheckpointError when it is missing and `init.run_if_missing` is False.
  """
  from absl import logging

  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms.common import upstream_config
  workdir = init_cfg.workdir
  if ckpt_lib.has_export(workdir):
    return workdir
  if not init_cfg.run_if_missing or not init_cfg.config:
    raise ckpt_lib.CheckpointError(f"config.init.workdir: {workdir} has no finished export; run "
                                   f"that stage first or set config.init.run_if_missing=True")
  prev = upstream_config(init_cfg)
  logging.warning("%s has no export: running %s into it first", workdir, init_cfg.config)
  print(f"alignax: {workdir} is missing; running {init_cfg.config} first", flush=True)
  result = run_stage(prev)
  if not result.finished:
    raise ckpt_lib.CheckpointError(f"the previous stage in {workdir} stopped before finishing")
  return workdir


def run_stage(cfg):
  """Trains the stage `cfg.stage` names and returns its StageResult: validates the config, runs
  the upstream stages whose exports are missing, adopts the init export's model and tokenizer,
  then hands the record to the shared runner."""
  from alignax.train.runner import StageResult, run_training
  record, cfg = _prepare(cfg)
  named = record.members_of(cfg) if record.members_of is not None else None
  if not named:
    return run_training(cfg, record.build, record.export, validate=record.validate)
  import os

  from alignax.train import members as members_lib
  members = [members_lib.Member(name=n, cfg=c) for n, c in named]
  results = members_lib.run_members(members, os.path.join(cfg.workdir, "members", members_lib.GROUP_DIR),
                                    record.build, record.export, validate=record.validate,
                                    vectorized=record.vectorized_keys())
  finished = all(r.finished for r in results)
  if finished:
    record.combine(cfg, [r.workdir for r in results])
  return StageResult(state=None, finished=finished, workdir=cfg.workdir)


def run_members(named_cfgs, group_dir: str):
  """Trains the configs of one stage as members of one vectorized program (`alignax.train.members`).

  named_cfgs: [(member name, config)], differing only in the record's `vectorized_keys`.
  Returns one StageResult per member.
  """
  from alignax.algorithms import registry
  from alignax.train import members as members_lib
  stages = {cfg.stage for _, cfg in named_cfgs}
  if len(stages) != 1:
    raise ValueError(f"members of one group must train one stage, got {sorted(stages)}")
  record = registry.get(stages.pop())
  members = []
  for name, cfg in named_cfgs:
    _, cfg = _prepare(cfg)
    if record.members_of is not None and record.members_of(cfg):
      from alignax.config import ConfigError
      raise ConfigError(f"member {name}: a {record.name} run that is itself several members (e.g. "
                        f"reward.ensemble > 1) cannot be a member of a vectorized sweep; sweep it "
                        f"without --vectorize")
    members.append(members_lib.Member(name=name, cfg=cfg))
  return members_lib.run_members(members, group_dir, record.build, record.export, validate=record.validate,
                                 vectorized=record.vectorized_keys())
