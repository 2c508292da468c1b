"""Sampling-based evaluation on the world's prompts, shared by the SFT, PPO and DPO stages.

At each eval: sample one response per eval prompt (`eval.temperature`, default 1: the policy's
own distribution, so the sequence KL to a reference is an unbiased estimate), score with the
gold labeler, and append a greedy table of the showcase prompts to `WORKDIR/samples.md` and to
TensorBoard.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from alignax import evaluation
from alignax.generation import Sampler, SamplingConfig
from alignax.tasks.world import SHOWCASE_PROMPTS


def eval_prompt_records(cfg, records: list[dict] | None = None) -> list[dict]:
  """`eval.num_prompts` of the world's eval prompts, in a fixed (seeded) order."""
  if records is None:
    from alignax.data import sources
    records = sources.split_sources(cfg, "prompts")["eval"]
  records = [records[i] for i in range(len(records))]
  order = np.random.default_rng(int(cfg.seed) + 17).permutation(len(records))
  return [records[i] for i in order[: int(cfg.eval.num_prompts)]]


class WorldEvaluator:
  """`evaluate(params, step, reference=None) -> metrics` for a policy on the world task."""

  def __init__(self, cfg, lm, tokenizer, writer=None, fmt: str = "chat", records=None):
    self.cfg, self.lm, self.tokenizer, self.writer, self.fmt = cfg, lm, tokenizer, writer, fmt
    self.records = eval_prompt_records(cfg, records)
    n_new = int(cfg.eval.max_new_tokens)
    self.sampler = Sampler(lm, tokenizer, SamplingConfig(temperature=float(cfg.eval.temperature),
                                                         max_new_tokens=n_new))
    self.greedy = Sampler(lm, tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=n_new))
    self.batch_size = int(cfg.eval.batch_size)
    self.template = cfg.data.get("chat_template", "markers")

  def __call__(self, params, step: int, reference=None, proxy=None) -> dict[str, float]:
    """World metrics of fresh samples; with `reference` (lm, params) also `kl_to_reference`; with
    `proxy` (a function of Samples -> [n] reward-model scores) also `proxy_reward`."""
    key = jax.random.fold_in(jax.random.key(int(self.cfg.seed) + 1), step)
    samples = evaluation.sample_prompts(self.sampler, params, [r["prompt"] for r in self.records],
                                        key, fmt=self.fmt, batch_size=self.batch_size,
                                        template=self.template)
    metrics = evaluation.world_metrics(self.records, samples)
    if reference is not None:
      ref_lm, ref_params = reference
      ref_lp = evaluation.reference_logprobs(ref_lm, ref_params, samples, self.batch_size)
      metrics["kl_to_reference"] = evaluation.sequence_kl(samples, ref_lp)
    if proxy is not None:
      metrics["proxy_reward"] = float(np.mean(proxy(samples)))
    if self.cfg.eval.showcase:
      self.write_showcase(params, step)
    return metrics

  def write_showcase(self, params, step: int) -> str:
    shown = evaluation.sample_prompts(self.greedy, params, list(SHOWCASE_PROMPTS), jax.random.key(0),
                                      fmt=self.fmt, batch_size=len(SHOWCASE_PROMPTS),
                                      template=self.template)
    table = evaluation.sample_table(SHOWCASE_PROMPTS, {f"step {step} (greedy)": shown.texts})
    if self.writer is not None and self.writer.enabled:
      self.writer.write_text(step, "samples", table)
      with open(os.path.join(self.cfg.workdir, "samples.md"), "a", encoding="utf-8") as f:
        f.write(f"\n### step {step}\n\n{table}\n")
    return table
