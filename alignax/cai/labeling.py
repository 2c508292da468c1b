"""AI preference labels: a judge model labels preference pairs against a constitution (RLAIF).

  alignax label --judge=runs/sft --constitution=world --pairs=pairs.jsonl --out=ai_pairs.jsonl

For pair i and each of `principles_per_pair` principles drawn for it (a stream seeded by
(seed, i), so a resumed run draws the same ones), the judge gives P(the pair's first response
better) (`judge.Judge.probs`); the pair's soft label is the mean over its principles. The output
is a preference file in the project's schema: `chosen` is the response the judge prefers,
`chosen_prob` its probability (>= 0.5; the reward model and DPO read it with
`soft_labels=True`), and `ai_feedback` the provenance:

  {"index": i, "judge": WORKDIR, "constitution": name, "principles": [ids],
   "probs": [P(chosen better) per principle], "input_chosen_prob": P(the input's chosen better),
   "source": "pairs.jsonl:17"}

The input's other fields (`chosen_ended`, `chosen_gold`, ...) follow their response.

Resuming: records are appended in chunks of `chunk` consecutive pairs, each flushed and fsynced,
and the settings are kept in OUT.label.json. A rerun of the same command after a kill keeps
every complete chunk, drops the one the kill cut short, and labels only the pairs not yet
written, in the same chunks: nothing is lost or duplicated, and the file equals an
uninterrupted run's (`resumable.ResumableJsonl`). A rerun with other settings (judge, constitution, pairs, principles, seed)
is refused, naming them; a finished file is left as it is.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from alignax.cai import prompts as cai_prompts
from alignax.cai.constitution import Constitution, sample_principles
from alignax.cai.judge import Comparison, ComparisonTooLong, Judge
from alignax.cai.resumable import ResumableJsonl, progress_bar, sha256_files
from alignax.errors import DataError


def principles_for(constitution: Constitution, index: int, n: int, seed: int):
  """The principles pair `index` is judged on: a function of (seed, index) only."""
  return sample_principles(constitution, n, np.random.default_rng([int(seed), int(index)]))


def _plain(messages):
  """A single-message list as its text, else the messages (the schema accepts both)."""
  if len(messages) == 1 and messages[0]["role"] in ("user", "assistant"):
    return messages[0]["content"]
  return list(messages)


def label_records(judge: Judge, records: Sequence[dict], indices: Sequence[int],
                  constitution: Constitution, *, principles_per_pair: int, seed: int,
                  both_orders: bool = True) -> list[dict[str, Any]]:
  """AI-labeled preference records for `records` (normalized preference records, as
  `read_records(..., "preference")` returns them); indices[j] is record j's index in its file."""
  asked, spans = [], []
  for rec, index in zip(records, indices):
    principles = principles_for(constitution, index, principles_per_pair, seed)
    first, second = (cai_prompts.response_text(rec[k]) for k in ("chosen", "rejected"))
    start = len(asked)
    asked += [Comparison(p, _plain(rec["prompt"]), first, second) for p in principles]
    spans.append((start, len(asked), principles))
  try:
    probs = judge.probs(asked, both_orders=both_orders)
  except ComparisonTooLong as e:  # name the pair's file and line, not a position in a batch
    j = next(k for k, (lo, hi, _) in enumerate(spans) if lo <= e.index < hi)
    where = records[j].get("_source") or f"pair {indices[j]}"
    raise DataError(f"{where}: the judge's comparison prompt for this pair is {e.length} tokens; "
                    f"it reads at most {e.limit} before its answer (model.max_seq_len); shorten "
                    "the responses or use a judge with a longer context") from None
  out = []
  for rec, index, (lo, hi, principles) in zip(records, indices, spans):
    p_input = probs[lo:hi]
    p = float(np.mean(p_input))
    keep = p >= 0.5  # the input's order, unless the judge prefers its rejected response
    a, b = ("chosen", "rejected") if keep else ("rejected", "chosen")
    row = {"prompt": _plain(rec["prompt"]), "chosen": _plain(rec[a]), "rejected": _plain(rec[b]),
           "chosen_prob": p if keep else 1.0 - p}
    for field in ("ended", "gold"):
      for new, old in (("chosen", a), ("rejected", b)):
        if f"{old}_{field}" in rec:
          row[f"{new}_{field}"] = rec[f"{old}_{field}"]
    row["ai_feedback"] = {
        "index": int(index), "judge": judge.model.workdir, "constitution": constitution.name,
        "principles": [pr.id for pr in principles],
        "probs": [float(x) if keep else float(1.0 - x) for x in p_input],
        "input_chosen_prob": p, "source": rec.get("_source", "")}
    out.append(row)
  return out


# ---------------------------------------------------------------------------------------------
# The resumable file driver.

def label_file(judge: Judge, constitution: Constitution, pairs: str, out: str, *,
               principles_per_pair: int = 2, seed: int = 0, both_orders: bool = True,
               chunk: int = 256, limit: int = 0, progress: bool = True,
               on_chunk=None) -> dict[str, Any]:
  """Labels every pair of `pairs` (any preference file the data layer reads) into `out`,
  resuming a killed run (see the module docstring). Returns the summary also written into
  OUT.label.json: pairs, the mean `chosen_prob` and how often the judge kept the input order.

  limit: label only the first `limit` pairs (0: all). on_chunk: called after each chunk is on
  disk with the number of pairs written so far (tests kill the process there)."""
  from alignax.data.readers import expand_paths, read_records
  paths = expand_paths(pairs)
  records = read_records(paths, "preference")
  total = len(records) if limit <= 0 else min(limit, len(records))
  settings = {"judge": os.path.abspath(judge.model.workdir), "constitution": constitution.name,
              "constitution_fingerprint": constitution.fingerprint(), "pairs": [os.path.abspath(x) for x in paths],
              "pairs_sha256": sha256_files(paths), "principles_per_pair": int(principles_per_pair),
              "seed": int(seed), "both_orders": bool(both_orders), "pairs_to_label": total,
              "chunk": int(chunk)}
  output = ResumableJsonl(out, "label", settings, lambda r: r["ai_feedback"]["index"], chunk=chunk, total=total)
  chunks = output.todo_chunks()
  todo = [i for c in chunks for i in c]
  bar = progress_bar(total, total - len(todo), "label", "pair", progress)
  for idx in chunks:
    output.append(label_records(judge, [records[i] for i in idx], idx, constitution,
                                principles_per_pair=principles_per_pair, seed=seed,
                                both_orders=both_orders))
    if bar is not None:
      bar.update(len(idx))
    if on_chunk is not None:
      on_chunk(len(output.done))
  if bar is not None:
    bar.close()
  summary = summarize(output.rows())
  output.finish(summary)
  return summary


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
  """Counts of AI-labeled rows: pairs, mean chosen_prob, fraction in the input's order."""
  if not rows:
    return {"pairs": 0}
  kept = np.array([r["ai_feedback"]["input_chosen_prob"] >= 0.5 for r in rows])
  return {"pairs": len(rows), "mean_chosen_prob": float(np.mean([r["chosen_prob"] for r in rows])),
          "agrees_with_input": float(kept.mean())}
