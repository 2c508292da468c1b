"""Where the RLAIF pipeline's steps write, and how it rewires the registry's stages: the piece of
`alignax.cai.pipeline` that the stage configs (`algorithms.pipeline_config`) need, kept below
the algorithms layer."""

from __future__ import annotations

import os

from alignax.config import ConfigDict

FEEDBACK = "feedback"  # the config section and subdirectory of the feedback model
LABELED = ("reward", "dpo")  # stages that train on the AI-labeled pairs


def files(cfg) -> dict[str, str]:
  """Where each step writes, under the pipeline's WORKDIR."""
  w = cfg.workdir
  return {"prompts": os.path.join(w, "revise", "prompts.jsonl"),
          "revisions": os.path.join(w, "revise", "revisions.jsonl"),
          "pairs": os.path.join(w, "label", "world_pairs.jsonl"),
          "pairs_eval": os.path.join(w, "label", "world_pairs_eval.jsonl"),
          "ai_pairs": os.path.join(w, "label", "ai_pairs.jsonl"),
          "ai_pairs_eval": os.path.join(w, "label", "ai_pairs_eval.jsonl")}


def stage_overrides(cfg, name: str, scfg: ConfigDict) -> None:
  """Rewires a registry stage's config for RLAIF (called by `pipeline_config.stage_config`):
  SFT reads the revisions; the reward model and DPO read the AI labels and are evaluated on
  the world's held-out pairs (human labels and gold)."""
  paths = files(cfg)
  with scfg.unlocked():
    if name == "sft":
      scfg.data.source = "files"
      scfg.data.train_files = paths["revisions"]
      scfg.data.eval_files = ""
    elif name in LABELED:
      scfg.data.source = "files"
      scfg.data.train_files = paths["ai_pairs"]
      scfg.data.eval_files = paths["pairs_eval"]
