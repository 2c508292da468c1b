"""The language model of a run directory, for the commands that sample or evaluate one.

Loads the run's export when it finished, else its latest checkpoint (a run in progress, or one
stopped before its last step; a line on stderr says which step). The LM comes from: pretrain /
SFT / DPO / imported params; PPO's policy; a reward model's backbone (whose LM head is the SFT
one it started from). Pretraining and imported runs read plain-text prompts (`RAW_STAGES`);
the others use the chat template they were trained with (`chat_template_of`).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from alignax import checkpoint as ckpt_lib
from alignax.config import read_config
from alignax.models import abstract_lm

RAW_STAGES = ("pretrain", "import")


def chat_template_of(workdir: str) -> str:
  """The chat template a run was trained with (its export, else its config): "markers",
  "plain" or "model" (the tokenizer's own Jinja template). Runs from before "auto" existed say
  nothing and mean "markers"; a run that recorded "auto" is resolved for its tokenizer as the
  data layer resolves it."""
  from alignax.data.tokenizers import spec_chat_template
  if ckpt_lib.has_export(workdir):
    meta = ckpt_lib.read_export_meta(workdir)
    name, spec = meta.get("chat_template", "markers"), meta.get("tokenizer")
  else:
    try:
      cfg = read_config(workdir)
    except Exception:  # no config.json (an imported run)
      return "markers"
    name, spec = cfg.data.get("chat_template", "markers"), cfg.get("tokenizer")
  if name == "auto":
    name = "model" if spec and spec_chat_template(spec) else "markers"
  return name


def no_model_error(workdir: str) -> ckpt_lib.CheckpointError:
  return ckpt_lib.CheckpointError(
      f"{workdir} has neither an export nor a checkpoint: train it first (alignax train "
      f"--config=... --config.workdir={workdir}); a run writes a checkpoint every "
      "checkpoint.every steps and when it stops, and its export when it finishes")


def run_params(workdir: str):
  """(params as a nested dict, stage, tokenizer spec, ModelConfig, source) of a run directory:
  its export (source "export"), else its latest checkpoint (source "checkpoint step N": a run in
  progress or stopped early; the model and tokenizer then come from its config.json), which a
  line on stderr says."""
  from alignax.checkpoint_params import checkpoint_steps, load_latest_params
  from alignax.config import split_model_section
  if ckpt_lib.has_export(workdir):
    meta = ckpt_lib.read_export_meta(workdir)
    params, _ = ckpt_lib.load_export(workdir)
    return params, meta["stage"], meta["tokenizer"], ckpt_lib.export_model_config(workdir), "export"
  if not checkpoint_steps(workdir):
    raise no_model_error(workdir)
  cfg = read_config(workdir)
  params, step = load_latest_params(workdir)
  print(f"alignax: {workdir} has no export yet: using its checkpoint at step {step}",
        file=sys.stderr, flush=True)
  model_cfg, lora_cfg = split_model_section(cfg.model)
  if lora_cfg.enabled:
    raise ckpt_lib.CheckpointError(
        f"{workdir} is a LoRA run without an export yet: its checkpoints hold only the adapters; "
        "finish the run (its export holds the merged model)")
  return params, cfg.stage, cfg.tokenizer, model_cfg, f"checkpoint step {step}"


def lm_params(params: dict) -> dict:
  """The LM inside a run's params: PPO's policy; a reward model's backbone, whose LM head comes
  from the SFT model it started from (reward training never reads it). An ensemble of reward
  models holds K stacked backbones and is refused by the shape check of `load_policy`."""
  if "policy" in params:
    params = params["policy"]
  if "backbone" in params:
    params = params["backbone"]
  return params


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{"blocks/attn/wq": shape} of a nested dict of arrays (path parts as strings, so an integer
  key and its string form name the same leaf)."""
  return {ckpt_lib.leaf_name(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def load_policy(workdir: str):
  """(LanguageModel, params, stage, tokenizer spec) of a run directory, export first."""
  return load_policy_and_source(workdir)[:4]


def load_policy_and_source(workdir: str):
  """`load_policy` and where the params came from ("export" or "checkpoint step N")."""
  params, stage, tokenizer, model_cfg, source = run_params(workdir)
  params = lm_params(params)
  lm, abstract = abstract_lm(model_cfg)
  expected, got = leaf_shapes(nnx.to_pure_dict(abstract)), leaf_shapes(params)
  if expected != got:
    bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
    raise ckpt_lib.CheckpointError(
        f"the {stage} params of {workdir} do not fit its model config: {bad[0]} is "
        f"{got.get(bad[0], 'missing')}, the model needs {expected.get(bad[0], 'nothing there')}"
        + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        + ("; a reward ensemble cannot be sampled as one LM" if stage == "reward" else ""))
  nnx.replace_by_pure_dict(abstract, params)
  return lm, abstract, stage, tokenizer, source
