"""Critique and revise (the supervised phase of Constitutional AI, SL-CAI).

  alignax revise --policy=runs/sft --constitution=world --prompts=prompts.jsonl --out=revised.jsonl

For each prompt the policy samples a response; then, `rounds` times, a principle is drawn (a
stream seeded by (seed, index, round)), the policy critiques its latest response against it
(`prompts.critique_prompt`) and rewrites it (`prompts.revision_prompt`). Each output line is an
SFT record {"prompt", "response": the final revision} with the chain kept for inspection:

  "cai": {"index": i, "policy": WORKDIR, "constitution": name, "initial": first response,
          "chain": [{"principle", "critique", "revision", "revision_ended", "taken"}, ...],
          "ended": whether the final response ended with <eos>}

A revision that does not end with `<eos>` (cut off at `max_new_tokens`) or is empty is not
taken, nor (with `keep_if_critique_starts`) one whose critique found nothing to fix: the
response stays the one before it (the chain shows every step, with "taken"). A prompt whose final
response never ended is still written, with "ended": false, and counted as unfinished in the
summary (OUT.revise.json and the command's last line), so nothing is dropped unseen. Output and
resume work as for `alignax label` (`resumable.ResumableJsonl`).

Everything runs batched: all prompts of a chunk go through one sampler call per step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np

from alignax.cai import prompts as cai_prompts
from alignax.cai.constitution import Constitution, sample_principles
from alignax.cai.judge import ChatModel
from alignax.cai.resumable import ResumableJsonl, progress_bar, sha256_files
from alignax.data.chat import encode_prompt
from alignax.generation import Sampler, SamplingConfig


@dataclasses.dataclass(frozen=True)
class ReviseConfig:
  """rounds: critique-revision rounds per prompt; temperature / max_new_tokens: the sampler's
  for every step (responses, critiques and revisions); seed: principle draws and sampling keys.
  keep_if_critique_starts: when set (the world's critiques say "No problem: ..."), a revision
  is taken only if the model's own critique does not start with it: the model rewrites what it
  found wrong and keeps what it did not ("" revises always, as in Bai et al.)."""

  rounds: int = 1
  temperature: float = 0.7
  max_new_tokens: int = 48
  seed: int = 0
  keep_if_critique_starts: str = ""

  def __post_init__(self):
    if self.rounds < 1:
      raise ValueError(f"rounds must be >= 1, got {self.rounds}")


class Reviser:
  """Samples responses, critiques and revisions from one chat model, in fixed-size batches."""

  def __init__(self, model: ChatModel, cfg: ReviseConfig, batch_size: int = 64):
    self.model, self.cfg, self.batch_size = model, cfg, int(batch_size)
    self.sampler = Sampler(model.lm, model.tokenizer,
                           SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens))
    self.too_long = 0  # prompts (answers, critiques, revisions) that did not fit, so far

  def _ids(self, user_text) -> list[int]:
    messages = user_text if not isinstance(user_text, str) else [{"role": "user", "content": user_text}]
    return encode_prompt(self.model.tokenizer, messages, template=self.model.template)

  def sample(self, user_texts: Sequence, key: jax.Array) -> list[tuple[str, bool]]:
    """(text, ended with <eos>) for each prompt (a user message's text, or a conversation).

    A prompt too long for the model to answer within model.max_seq_len gets ("", False): its
    revision is not taken (or its record counts as unfinished), and `self.too_long` counts it."""
    ids = [self._ids(t) for t in user_texts]
    limit = self.model.lm.config.max_seq_len - self.cfg.max_new_tokens
    fits = [len(r) <= limit for r in ids]
    self.too_long += fits.count(False)
    if not any(fits):
      return [("", False)] * len(ids)
    ids = [r if ok else ids[fits.index(True)] for r, ok in zip(ids, fits)]  # a stand-in row
    tokens, mask = self.sampler.pad_prompts(ids)
    out = []
    for start in range(0, len(ids), self.batch_size):
      rows = list(range(start, min(start + self.batch_size, len(ids))))
      idx = rows + [rows[0]] * (self.batch_size - len(rows))
      res = jax.device_get(self.sampler.generate_padded(self.model.params, tokens[idx], mask[idx],
                                                        jax.random.fold_in(key, start)))
      res = {k: v[: len(rows)] for k, v in res.items()}
      out += list(zip(self.sampler.decode(res), res["ended"].astype(bool).tolist()))
    return [o if ok else ("", False) for o, ok in zip(out, fits)]

  def revise(self, records: Sequence[dict], indices: Sequence[int],
             constitution: Constitution) -> list[dict[str, Any]]:
    """SFT records with their chains (see the module docstring) for prompt records."""
    key = jax.random.key(self.cfg.seed)
    chunk_key = jax.random.fold_in(key, int(indices[0]) if len(indices) else 0)
    prompts = [r["prompt"] for r in records]
    current = self.sample(prompts, jax.random.fold_in(chunk_key, 0))
    initial = list(current)
    chains: list[list[dict]] = [[] for _ in records]
    for rnd in range(self.cfg.rounds):
      principles = [sample_principles(constitution, 1,
                                      np.random.default_rng([self.cfg.seed, int(i), rnd]))[0]
                    for i in indices]
      crit = self.sample([cai_prompts.critique_prompt(p, q, r[0])
                          for p, q, r in zip(principles, prompts, current)],
                         jax.random.fold_in(chunk_key, 2 * rnd + 1))
      rev = self.sample([cai_prompts.revision_prompt(p, q, r[0], c[0])
                         for p, q, r, c in zip(principles, prompts, current, crit)],
                        jax.random.fold_in(chunk_key, 2 * rnd + 2))
      for j, (p, c, r) in enumerate(zip(principles, crit, rev)):
        chains[j].append({"principle": p.id, "critique": c[0], "revision": r[0],
                          "revision_ended": bool(r[1])})
        found_nothing = bool(self.cfg.keep_if_critique_starts) and \
            c[0].strip().startswith(self.cfg.keep_if_critique_starts)
        taken = r[1] and bool(r[0].strip()) and not found_nothing  # cut-off or empty: no improvement
        chains[j][-1]["taken"] = bool(taken)
        if taken:
          current[j] = r
    out = []
    for j, (rec, index) in enumerate(zip(records, indices)):
      text, ended = current[j]
      out.append({"prompt": rec["prompt"], "response": text,
                  "cai": {"index": int(index), "policy": self.model.workdir,
                          "constitution": constitution.name, "initial": initial[j][0],
                          "chain": chains[j], "ended": bool(ended)}})
    return out


def revise_file(reviser: Reviser, constitution: Constitution, prompts: str, out: str, *,
                chunk: int = 256, limit: int = 0, progress: bool = True) -> dict[str, Any]:
  """Revises every prompt of `prompts` (a prompts file: {"prompt": str | messages}) into `out`,
  resuming a killed run. Returns the summary (also in OUT.revise.json)."""
  from alignax.data.readers import expand_paths, read_records
  paths = expand_paths(prompts)
  records = read_records(paths, "prompts")
  total = len(records) if limit <= 0 else min(limit, len(records))
  cfg = reviser.cfg
  settings = {"policy": os.path.abspath(reviser.model.workdir), "constitution": constitution.name,
              "constitution_fingerprint": constitution.fingerprint(), "prompts": [os.path.abspath(x) for x in paths],
              "prompts_sha256": sha256_files(paths), **dataclasses.asdict(cfg),
              "prompts_to_revise": total, "chunk": int(chunk)}
  output = ResumableJsonl(out, "revise", settings, lambda r: r["cai"]["index"], chunk=chunk, total=total)
  chunks = output.todo_chunks()
  todo = [i for c in chunks for i in c]
  bar = progress_bar(total, total - len(todo), "revise", "prompt", progress)
  for idx in chunks:
    output.append(reviser.revise([records[i] for i in idx], idx, constitution))
    if bar is not None:
      bar.update(len(idx))
  if bar is not None:
    bar.close()
  summary = dict(summarize(output.rows()), too_long_prompts_this_run=reviser.too_long)
  output.finish(summary)
  return summary


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
  """prompts, unfinished (final response without <eos>), changed (final != initial), and the
  fraction of revisions taken."""
  if not rows:
    return {"prompts": 0}
  chains = [c for r in rows for c in r["cai"]["chain"]]
  return {"prompts": len(rows),
          "unfinished": int(sum(not r["cai"]["ended"] for r in rows)),
          "changed": int(sum(r["response"] != r["cai"]["initial"] for r in rows)),
          "revisions_taken": float(np.mean([c["taken"] for c in chains])) if chains else 0.0}
