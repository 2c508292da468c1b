"""Sampling-based evaluation on the world's prompts, shared by the SFT, PPO and DPO stages.

At each eval: sample `eval.samples_per_prompt` responses (default 1) per eval prompt
(`eval.temperature`, default 1: the policy's own distribution, so the sequence KL to a reference
is an unbiased estimate), score with the gold labeler, and append a greedy table of the showcase
prompts to `WORKDIR/samples.md` and to TensorBoard. With `eval.save_samples` every sample's
text and per-sample metrics go to `WORKDIR/eval_samples/step_<step>.jsonl` (one JSON object a
line: prompt_index, sample, prompt, response, ended, the `evaluation.per_sample_metrics`, and
kl_to_reference / proxy_reward when measured), for intervals and paired tests downstream.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from alignax.tasks import evaluation
from alignax.generation import Sampler, SamplingConfig
from alignax.tasks.world import SHOWCASE_PROMPTS


def eval_prompt_records(config, records: list[dict] | None = None) -> list[dict]:
  """`eval.num_prompts` of the world's eval prompts (or of `records`), in a fixed order seeded by
  `config.seed` (`config`: a `RunConfig`)."""
  if records is None:
    from alignax.data import sources
    records = sources.split_sources(config.data, "prompts", config.world)["eval"]
  records = [records[i] for i in range(len(records))]
  order = np.random.default_rng(config.seed + 17).permutation(len(records))
  return [records[i] for i in order[: config.eval.num_prompts]]


class WorldEvaluator:
  """`evaluate(params, step, reference=None) -> metrics` for a policy on the world task."""

  def __init__(self, config, lm, tokenizer, writer=None, fmt: str = "chat", records=None):
    """`config`: the run's `RunConfig` (its `eval`, `seed`, `workdir` and `data.chat_template`)."""
    self.lm, self.tokenizer, self.writer, self.fmt = lm, tokenizer, writer, fmt
    self.eval, self.seed, self.workdir = config.eval, config.seed, config.workdir
    self.prompt_records = eval_prompt_records(config, records)
    self.samples_per_prompt = self.eval.samples_per_prompt
    # Sample j of prompt i is row i * k + j: one sampling pass covers every sample.
    self.records = [r for r in self.prompt_records for _ in range(self.samples_per_prompt)]
    n_new = self.eval.max_new_tokens
    self.sampler = Sampler(lm, tokenizer, SamplingConfig(temperature=self.eval.temperature,
                                                         max_new_tokens=n_new))
    self.greedy = Sampler(lm, tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=n_new))
    self.batch_size = self.eval.batch_size
    self.template = config.data.chat_template

  def __call__(self, params, step: int, reference=None, proxy=None) -> dict[str, float]:
    """World metrics of fresh samples; with `reference` (lm, params) also `kl_to_reference`; with
    `proxy` (a function of Samples -> [n] reward-model scores) also `proxy_reward`."""
    key = jax.random.fold_in(jax.random.key(self.seed + 1), step)
    samples = evaluation.sample_prompts(self.sampler, params, [r["prompt"] for r in self.records],
                                        key, fmt=self.fmt, batch_size=self.batch_size,
                                        template=self.template)
    per_sample = evaluation.per_sample_metrics(self.records, samples)
    if reference is not None:
      ref_lm, ref_params = reference
      ref_lp = evaluation.reference_logprobs(ref_lm, ref_params, samples, self.batch_size)
      per_sample["kl_to_reference"] = evaluation.sequence_kls(samples, ref_lp)
    if proxy is not None:
      per_sample["proxy_reward"] = np.asarray(proxy(samples), np.float64).reshape(-1)
    metrics = evaluation.summarize(per_sample)
    if self.eval.save_samples and jax.process_index() == 0:
      self.write_samples(step, samples, per_sample)
    if self.eval.showcase:
      self.write_showcase(params, step)
    return metrics

  def write_samples(self, step: int, samples, per_sample: dict) -> str:
    """Writes WORKDIR/eval_samples/step_<step>.jsonl atomically (a rerun of the step replaces it)."""
    folder = os.path.join(self.workdir, "eval_samples")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:08d}.jsonl")
    k = self.samples_per_prompt
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      for row, rec in enumerate(self.records):
        item = {"prompt_index": row // k, "sample": row % k, "prompt": rec["prompt"],
                "kind": rec.get("kind"), "response": samples.texts[row],
                "ended": bool(samples.ended[row])}
        for name, values in per_sample.items():
          v = float(values[row])
          item[name] = v if np.isfinite(v) else None
        f.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path

  def write_showcase(self, params, step: int) -> str:
    shown = evaluation.sample_prompts(self.greedy, params, list(SHOWCASE_PROMPTS), jax.random.key(0),
                                      fmt=self.fmt, batch_size=len(SHOWCASE_PROMPTS),
                                      template=self.template)
    table = evaluation.sample_table(SHOWCASE_PROMPTS, {f"step {step} (greedy)": shown.texts})
    if self.writer is not None and self.writer.enabled:
      self.writer.write_text(step, "samples", table)
      with open(os.path.join(self.workdir, "samples.md"), "a", encoding="utf-8") as f:
        f.write(f"\n### step {step}\n\n{table}\n")
    return table
