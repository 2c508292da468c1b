"""The pipeline's config: which stages it runs (`config.stages`) and each stage's own config,
with the pipeline's shared keys and workdirs filled in (`alignax pipeline` runs them; the report
and the benchmarks read them)."""

from __future__ import annotations

import copy
import os

from alignax import checkpoint as ckpt_lib
from alignax.algorithms import registry
from alignax.config import ConfigDict, ConfigError

SHARED = ("seed", "tokenizer")


def stage_names(cfg) -> list[str]:
  """`config.stages` in registry order, each checked to exist and to have its upstream stages
  either in the list or already finished in WORKDIR."""
  known = registry.names()
  names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
  for s in names:
    if s not in known:
      raise ConfigError(f"config.stages: unknown stage {s!r}; stages: {', '.join(known)}")
  names = [s for s in known if s in names]
  for s in names:
    for field, upstream in registry.get(s).upstream.items():
      if upstream not in names and not ckpt_lib.has_export(os.path.join(cfg.workdir, upstream)):
        raise ConfigError(f"config.stages: {s} builds on {upstream} ({field}), which is neither in "
                          f"the list nor finished in {cfg.workdir}")
  return names


def with_shared_keys(cfg, section: str) -> ConfigDict:
  """A copy of the pipeline's `section` (a stage config) in WORKDIR/<section>, with the keys
  every stage shares (seed, tokenizer, world, data.loader/tfds_dir/chat_template) filled in."""
  scfg = copy.deepcopy(cfg[section])
  with scfg.unlocked():
    scfg.workdir = os.path.join(cfg.workdir, section)
    for key in SHARED:
      scfg[key] = cfg[key]
    scfg.world = copy.deepcopy(cfg.world)
    for key in ("loader", "tfds_dir", "chat_template"):
      scfg.data[key] = cfg.data[key]
  return scfg


def stage_config(cfg, name: str) -> ConfigDict:
  """The stage's config with the shared keys and the pipeline's workdirs filled in."""
  scfg = with_shared_keys(cfg, name)
  with scfg.unlocked():
    for field, upstream in registry.get(name).upstream.items():
      scfg[field].workdir = os.path.join(cfg.workdir, upstream)
      scfg[field].run_if_missing = False  # the pipeline runs stages in order itself
  if "rlaif" in cfg:  # the RLAIF pipeline trains SFT on revisions, reward and DPO on AI labels
    from alignax.cai.wiring import stage_overrides
    stage_overrides(cfg, name, scfg)
  return scfg
