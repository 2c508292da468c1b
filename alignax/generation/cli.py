"""`alignax sample --workdir=DIR --prompt="..."`: completions from any stage's run directory.

Loads the run's export when it finished, else its latest checkpoint (a run in progress). The
LM comes from: pretrain / SFT / DPO / imported params; PPO's policy; a reward model's backbone
(whose LM head is the SFT one it started from). Prompts use the chat template, except for
pretraining and imported runs, which read plain text (`--format` overrides).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ckpt_lib_orbax
from flax import nnx

from alignax import checkpoint as ckpt_lib
from alignax.config import read_config
from alignax.models import abstract_lm

RAW_STAGES = ("pretrain", "import")


def chat_template_of(workdir: str) -> str:
  """The chat template a run was trained with (its export, else its config)."""
  if ckpt_lib.has_export(workdir):
    return ckpt_lib.read_export_meta(workdir).get("chat_template", "markers")
  try:
    return read_config(workdir).data.get("chat_template", "markers")
  except Exception:  # no config.json (an imported run)
    return "markers"


def load_policy(workdir: str):
  """(LanguageModel, params, stage, tokenizer spec) of a run directory, export first."""
  if ckpt_lib.has_export(workdir):
    meta = ckpt_lib.read_export_meta(workdir)
    params, _ = ckpt_lib.load_export(workdir)
    stage, tokenizer = meta["stage"], meta["tokenizer"]
    model_cfg = ckpt_lib.export_model_config(workdir)
  else:
    cfg = read_config(workdir)
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    manager = ckpt_lib_orbax.CheckpointManager(directory, item_names=("state", "data", "config", "meta"))
    step = manager.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"{workdir} has neither an export nor a checkpoint to sample from")
    params = manager.restore(step, args=ckpt_lib_orbax.args.Composite(
        state=ckpt_lib_orbax.args.StandardRestore())).state["params"]
    manager.close()
    stage, tokenizer = cfg.stage, cfg.tokenizer
    from alignax.models.config import ModelConfig
    model_cfg = ModelConfig.from_mapping(cfg.model.to_dict())
  if "policy" in params:
    params = params["policy"]
  if "backbone" in params:
    params = params["backbone"]
  lm, abstract = abstract_lm(model_cfg)
  nnx.replace_by_pure_dict(abstract, params)
  return lm, abstract, stage, tokenizer


def sample_main(flags) -> None:
  from alignax.data.sources import resolve_tokenizer
  from alignax.evaluation import sample_prompts
  from alignax.generation import Sampler, SamplingConfig
  lm, params, stage, tokenizer_spec = load_policy(flags.workdir)
  try:
    cfg = read_config(flags.workdir)
  except Exception:  # an imported run has no config.json: the export's tokenizer is enough
    from alignax.config import base_config
    cfg = base_config(stage)
  with cfg.unlocked():
    cfg.tokenizer = tokenizer_spec
  tok = resolve_tokenizer(cfg)
  fmt = flags.format if flags.format != "auto" else ("raw" if stage in RAW_STAGES else "chat")
  prompts = list(flags.prompt) or ["What is the capital of France?"]
  sampler = Sampler(lm, tok, SamplingConfig(temperature=flags.temperature, top_k=flags.top_k,
                                            top_p=flags.top_p, max_new_tokens=flags.max_new_tokens))
  key = jax.random.key(flags.seed)
  repeated = [p for p in prompts for _ in range(flags.num_samples)]
  out = sample_prompts(sampler, params, repeated, key, fmt=fmt, batch_size=len(repeated),
                       template=chat_template_of(flags.workdir))
  print(f"# {flags.workdir} ({stage}, {fmt} prompts, temperature {flags.temperature})")
  for prompt, text, ended in zip(repeated, out.texts, out.ended):
    print(f"> {prompt}\n{text}{'' if ended else ' [no <eos>]'}\n")
