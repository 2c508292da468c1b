"""`alignax eval --workdir=DIR [--reference=DIR]`: the world metrics of one run."""

from __future__ import annotations

import json
import os

import jax

from alignax.generation import Sampler, SamplingConfig
from alignax.tasks import evaluation


def main(flags) -> dict:
  """`alignax eval --workdir=DIR [--reference=DIR]`: world metrics of one run, printed as JSON
  and written to WORKDIR/eval.json; either run may be one without an export yet (its latest
  checkpoint is used, see `alignax.run_models.run_params`)."""
  from alignax.algorithms.world_eval import eval_prompt_records
  from alignax.config import base_config, read_config, resolve
  from alignax.train.runner import stage_tokenizer
  from alignax.run_models import RAW_STAGES, chat_template_of, load_policy_and_source
  # A run without an export yet is evaluated at its latest checkpoint; `source` in the output
  # says which, so an eval.json of a run in progress is never taken for the finished model's.
  lm, params, stage, tokenizer_spec, source = load_policy_and_source(flags.workdir)
  try:
    cfg = read_config(flags.workdir)
  except Exception:  # noqa: BLE001  imported runs have no config.json: evaluate on the default world
    cfg = base_config(stage)
  with cfg.unlocked():
    cfg.tokenizer = tokenizer_spec
    if "world" not in cfg:
      from alignax.config import world_section
      cfg.world = world_section()
    if "eval" not in cfg:
      from alignax.config import eval_section
      cfg.eval = eval_section()
    cfg.eval.num_prompts = int(flags.num_prompts)
    cfg.data.source = "world"
    cfg.workdir = cfg.get("workdir") or flags.workdir
  config = resolve(cfg)
  tok = stage_tokenizer(config)
  records = eval_prompt_records(config)
  fmt = "raw" if stage in RAW_STAGES else "chat"
  sampler = Sampler(lm, tok, SamplingConfig(temperature=1.0, max_new_tokens=int(cfg.eval.max_new_tokens)))
  samples = evaluation.sample_prompts(sampler, params, [r["prompt"] for r in records],
                                      jax.random.key(flags.seed), fmt=fmt, batch_size=32,
                                      template=chat_template_of(flags.workdir))
  metrics = evaluation.world_metrics(records, samples)
  if flags.reference:
    ref_lm, ref_params, _, _, ref_source = load_policy_and_source(flags.reference)
    metrics["kl_to_reference"] = evaluation.sequence_kl(
        samples, evaluation.reference_logprobs(ref_lm, ref_params, samples))
    metrics["reference_source"] = ref_source
  metrics.update(stage=stage, source=source, num_prompts=len(records), format=fmt)
  print(json.dumps(metrics, indent=2))
  with open(os.path.join(flags.workdir, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=2)
  return metrics
