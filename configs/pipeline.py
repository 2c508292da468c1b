"""The main job: pretrain -> SFT -> reward model -> PPO, GRPO, RLOO and DPO on the world task, then
a report.

  alignax pipeline --config=configs/pipeline.py:tiny --config.workdir=runs/pipeline
  alignax pipeline --config=configs/pipeline.py:tiny --config.dpo.beta=0.05 \
      --config.ppo.adaptive_kl=True
  alignax pipeline --config=configs/pipeline.py:tiny_rlaif   # Constitutional AI: AI labels, revisions

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
  stage_preset = {"tiny_rlaif": "tiny"}.get(preset, preset)  # the stages' own preset
  for name in registry.names():
    c[name] = _stage(name, stage_preset)
  c.tokenizer = c.pretrain.tokenizer  # the pretraining preset's (the model's vocab is sized for it)
  c.report = ConfigDict(dict(
      num_prompts=200,  # eval prompts sampled per model (all of the world's eval set by default)
      temperature=1.0,  # sampling temperature of the report (1: the policies themselves, as KL needs)
      max_new_tokens=64,
      batch_size=64,
      bootstrap_resamples=2000,  # resamples of prompts behind every 95% interval (`<metric>_ci95`)
  ))
  if preset == "tiny_rlaif":
    _rlaif(c)
  elif preset != "tiny":
    raise ValueError(f"unknown preset {preset!r}; presets: tiny, tiny_rlaif")
  return c


def _rlaif(c: ConfigDict) -> None:
  """Constitutional AI on the world (`alignax.cai.pipeline`): a feedback model critiques, revises
  and judges; SFT trains on its revisions, the reward model and DPO on its labels."""
  c.world.feedback_demos = 4000  # critique / revision / comparison demonstrations in its SFT data
  c.stages = "pretrain,sft,reward,ppo,dpo"
  c.feedback = _stage("sft", "tiny")  # the feedback model: SFT from pretrain, demos + feedback demos
  c.feedback.data.seq_len = 192  # a comparison quotes two responses (up to ~140 world BPE tokens)
  c.feedback.train.steps = 300
  c.reward.reward.soft_labels = True
  c.dpo.dpo.soft_labels = True
  c.rlaif = ConfigDict(dict(
      constitution="world",  # a built-in name or a JSON / YAML file (alignax.cai.constitution)
      revise_prompts=2000,  # world SFT prompts answered, critiqued and revised: SL-CAI's data
      revise_rounds=2,
      keep_if_critique_starts="No problem",  # keep an answer whose critique found nothing to fix
      temperature=0.7,  # sampling temperature of answers, critiques and revisions
      max_new_tokens=48,
      label_pairs=4000,  # world preference pairs the feedback model labels (human labels set aside)
      principles_per_pair=2,  # principles sampled per pair (0: all)
      both_orders=True,  # ask with the two responses in both orders and average
      reuse_pretrain="runs/pipeline_tiny",  # a pipeline on the same world whose pretrain export is reused
      human_report="runs/pipeline_tiny/report.json",  # the human-label pipeline to compare with
  ))
