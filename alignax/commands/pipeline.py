"""The whole pipeline: pretrain -> SFT -> reward model -> PPO, GRPO, RLOO and DPO -> report.

The stages, their order and their wiring come from the algorithm registry
(`alignax.algorithms.registry`). Each stage runs in WORKDIR/<stage> with its own config (the
pipeline config's section of that name), wired to the exports of the stages it builds on (the
record's `upstream`). A stage that already has an export is
skipped, so rerunning the command resumes (a stage stopped by a signal resumes from its own
checkpoint). Wall seconds per stage accumulate across resumes in WORKDIR/stages.json.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging

from alignax import checkpoint as ckpt_lib
from alignax.algorithms import registry
from alignax.algorithms.pipeline_config import stage_config, stage_names
from alignax.config import ConfigError, resolve, save_config


class StageClock:
  """Wall seconds per stage, persisted so resumed runs add up."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "stages.json")
    self.seconds = {}
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        self.seconds = json.load(f)

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.seconds, f, indent=2)
    os.replace(tmp, self.path)


def run_pipeline(cfg) -> dict | None:
  """Runs the stages in order and writes the report; returns the report dict (None if stopped)."""
  from alignax.algorithms import run_stage
  from alignax.commands.report import write_report
  names = stage_names(cfg)
  rlaif = None
  if "rlaif" in cfg:  # Constitutional AI: feedback model, revisions and AI labels (alignax.cai.pipeline)
    from alignax.cai import pipeline as rlaif
    rlaif.validate(cfg)
  for name in names:  # every stage's config is checked before the first one runs
    record = registry.get(name)
    scfg = stage_config(cfg, name)
    try:
      resolve(scfg)
      if record.validate is not None:
        record.validate(scfg)
    except ConfigError as e:
      raise ConfigError(f"stage {name}: {e}") from None
  save_config(cfg, cfg.workdir)
  clock = StageClock(cfg.workdir)
  steps = rlaif.Steps(cfg, clock) if rlaif is not None else None
  ran = False
  for i, name in enumerate(names, 1):
    if steps is not None and not steps.before(name):
      print(f"alignax: the pipeline stopped before {name}; run the same command to resume.", flush=True)
      return None
    scfg = stage_config(cfg, name)
    if ckpt_lib.has_export(scfg.workdir):
      print(f"[{i}/{len(names)}] {name}: finished earlier ({scfg.workdir}), skipping", flush=True)
      continue
    print(f"[{i}/{len(names)}] {name} -> {scfg.workdir}", flush=True)
    t0 = time.time()
    ran = True
    result = run_stage(scfg)
    clock.add(name, time.time() - t0)
    if not result.finished:
      print(f"alignax: the pipeline stopped during {name}; run the same command to resume.", flush=True)
      return None
    logging.info("stage %s finished in %.1f s", name, clock.seconds[name])
  report_path = os.path.join(cfg.workdir, "report.json")
  if not ran and os.path.exists(report_path):
    print(f"report: up to date ({report_path}; delete it to rebuild)", flush=True)
    with open(report_path, encoding="utf-8") as f:
      return json.load(f)
  t0 = time.time()
  print("report: sampling every model on the eval prompts", flush=True)
  report = write_report(cfg, names, clock.seconds)
  if rlaif is not None:
    report = rlaif.add_to_report(cfg, report)
  clock.add("report", time.time() - t0)
  print(f"report: {os.path.join(cfg.workdir, 'report.md')}", flush=True)
  return report
