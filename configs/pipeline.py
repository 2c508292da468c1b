"""The main job: pretrain -> SFT -> reward model -> PPO, GRPO, RLOO and DPO on the world task, then
a report.

  alignax pipeline --config=configs/pipeline.py:tiny --config.workdir=runs/pipeline
  alignax pipeline --config=configs/pipeline.py:tiny --config.dpo.beta=0.05 \
      --config.ppo.adaptive_kl=True

Each stage is the stage's own config (`configs/<stage>.py`, same preset) under its name here, so
any of its keys can be overridden (`--config.sft.train.steps=200`); a stage's own hyperparameters
read without repeating the section (`--config.dpo.beta` is the DPO stage's `dpo.beta`, also
spelled `--config.dpo.dpo.beta`). `seed`, `tokenizer`, `world`
and `data.loader`/`data.tfds_dir`/`data.chat_template` are shared: set them here, not per stage. Stage i runs in
WORKDIR/<stage> from the export of the stage before it; a finished stage (one with an export) is
not rerun, so the command resumes where it stopped.
"""

import os

from alignax.algorithms import registry
from alignax.config import ConfigDict, load_config_file, world_section

HERE = os.path.dirname(os.path.abspath(__file__))


def _stage(name: str, preset: str) -> ConfigDict:
  return load_config_file(os.path.join(HERE, f"{name}.py"), preset)


def get_config(preset: str | None = None):
  preset = preset or "tiny"
  c = ConfigDict()
  c.stage = "pipeline"
  c.preset = preset
  c.workdir = os.path.join("runs", f"pipeline_{preset}")
  c.seed = 0
  c.world = world_section()
  c.data = ConfigDict(dict(loader="tfds", tfds_dir="", chat_template="markers"))
  c.stages = ",".join(registry.default_pipeline())  # which stages to run (registry order)
  for name in registry.names():
    c[name] = _stage(name, preset)
  c.tokenizer = c.pretrain.tokenizer  # the pretraining preset's (the model's vocab is sized for it)
  c.report = ConfigDict(dict(
      num_prompts=200,  # eval prompts sampled per model (all of the world's eval set by default)
      temperature=1.0,  # sampling temperature of the report (1: the policies themselves, as KL needs)
      max_new_tokens=64,
      batch_size=64,
      bootstrap_resamples=2000,  # resamples of prompts behind every 95% interval (`<metric>_ci95`)
  ))
  if preset != "tiny":
    raise ValueError(f"unknown preset {preset!r}; presets: tiny")
  return c
