"""Human labels: pairs of responses, the person's choice appended at once (fsync'd) to a preference
JSONL in the project's schema, and what those choices reward.

A record is `{"prompt", "chosen", "rejected", "chosen_ended", "rejected_ended", "chosen_gold",
"rejected_gold"}` (the schema of `alignax.data.schemas.validate_preference`, so the file trains a
reward model or DPO with `--config.data.source=files --config.data.train_files=labels.jsonl`)
plus provenance under `_` keys, which readers carry along as metadata: `_rater`, `_time`
(ISO 8601, UTC), `_models` (which model wrote the chosen and the rejected response), `_shown`
(the models in the order shown, A then B), `_choice`, `_note`, `_sampling` and the gold rubric
components of both responses. Ties carry no preference, so they go to `<labels>.ties.jsonl`
(same fields, `_choice: "tie"`), counted but never trained on.
"""

from __future__ import annotations

import datetime
import json
import os
import threading

from alignax.tasks import world_gold

CHOICES = ("A", "B", "tie")
MIN_LABELS = 6


class LabelStore:
  """Appends labels to a JSONL file, one fsync'd line per choice."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self.ties_path = (self.path[:-len(".jsonl")] if self.path.endswith(".jsonl") else self.path) + ".ties.jsonl"
    directory = os.path.dirname(self.path)
    try:
      os.makedirs(directory, exist_ok=True)
      with open(self.path, "a", encoding="utf-8"):
        pass
    except OSError as e:
      from alignax.studio.models import StudioError
      raise StudioError(f"--labels: cannot write {self.path}: {e.strerror}") from None
    self._lock = threading.Lock()

  def append(self, record: dict, tie: bool = False) -> None:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with self._lock, open(self.ties_path if tie else self.path, "a", encoding="utf-8") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())

  def read(self) -> tuple[list[dict], list[dict]]:
    """(preferences, ties) written so far (a torn last line, from a crash mid-write, is ignored)."""
    def lines(path):
      out = []
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          for line in f:
            try:
              out.append(json.loads(line))
            except json.JSONDecodeError:
              pass
      return out
    return lines(self.path), lines(self.ties_path)


def make_record(pair: dict, choice: str, rater: str, note: str = "") -> dict:
  """The preference record of a labeled pair (see the module doc); `pair` holds the prompt, the
  two shown responses (A first) with their model, ended flag and gold breakdown, and the sampling
  settings."""
  if choice not in CHOICES:
    raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
  a, b = pair["responses"]
  chosen, rejected = (a, b) if choice in ("A", "tie") else (b, a)
  return {
      "prompt": pair["prompt"], "chosen": chosen["text"], "rejected": rejected["text"],
      "chosen_ended": chosen["ended"], "rejected_ended": rejected["ended"],
      "chosen_gold": chosen["score"], "rejected_gold": rejected["score"],
      "_rater": rater, "_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "_models": {"chosen": chosen["model"], "rejected": rejected["model"]},
      "_shown": [a["model"], b["model"]], "_choice": choice, "_note": note, "_sampling": pair["sampling"],
      "_chosen_components": chosen["components"], "_rejected_components": rejected["components"],
  }


def reward_signal(preferences: list[dict], ties: list[dict]) -> dict:
  """What a person's choices reward, against the world's rubric.

  For each rubric component, over the labeled pairs whose two responses differ on it: the
  fraction where the chosen response has the higher value (1 = always preferred more of it,
  0.5 = indifferent, 0 = always preferred less; `n` pairs). `gold_agreement`: the fraction of
  pairs with different gold scores where the person chose the one the gold labeler prefers.
  """
  comps = {}
  for name in world_gold.COMPONENTS:
    wins = n = 0
    for r in preferences:
      c = r.get("_chosen_components", {}).get(name, 0.0)
      j = r.get("_rejected_components", {}).get(name, 0.0)
      if c != j:
        n += 1
        wins += c > j
    if n:
      comps[name] = {"prefers_higher": wins / n, "pairs": n}
  differ = [r for r in preferences if r.get("chosen_gold") != r.get("rejected_gold")]
  agree = sum(r["chosen_gold"] > r["rejected_gold"] for r in differ)
  return {"labels": len(preferences), "ties": len(ties), "min_labels": MIN_LABELS,
          "ready": len(preferences) + len(ties) >= MIN_LABELS,
          "gold_agreement": agree / len(differ) if differ else None, "gold_pairs": len(differ),
          "components": comps}
