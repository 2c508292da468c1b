"""Labeling preference pairs: Bradley-Terry noise on the raters' scores, and what happened
(`PreferenceStats`). Pure functions of the two responses per prompt and a label generator."""

from __future__ import annotations

import dataclasses

import numpy as np

from alignax.tasks import world_gold as wg
from alignax.tasks.world_config import WorldConfig


@dataclasses.dataclass(frozen=True)
class PreferenceStats:
  """What happened while building preference pairs.

  requested: pairs attempted; kept: records returned; skipped_identical: pairs dropped because
  both responses were the same text; gold_ties: kept pairs with equal gold scores (their label
  is a coin flip); disagree_with_gold: kept non-tie pairs whose label contradicts the gold order;
  agreement: 1 - disagree_with_gold / (kept - gold_ties).
  """
  requested: int
  kept: int
  skipped_identical: int
  gold_ties: int
  disagree_with_gold: int

  @property
  def agreement(self) -> float:
    decided = self.kept - self.gold_ties
    return 1.0 - self.disagree_with_gold / decided if decided else float("nan")


def check_samples(samples, n: int) -> list[tuple[str, bool]]:
  """Validates a sampler's output: n pairs of (str, bool-like)."""
  samples = list(samples)
  if len(samples) != n:
    raise ValueError(f"sampler returned {len(samples)} responses for {n} prompts")
  out = []
  for i, s in enumerate(samples):
    if not (isinstance(s, (tuple, list)) and len(s) == 2 and isinstance(s[0], str)):
      raise ValueError(f"sampler item {i} must be (response: str, ended_with_eos: bool), got {s!r}")
    out.append((s[0], bool(s[1])))
  return out


def label_pairs(prompts: list[str], resp_a: list[tuple[str, bool]], resp_b: list[tuple[str, bool]],
                config: WorldConfig, label_rng: np.random.Generator
                ) -> tuple[list[dict[str, object]], PreferenceStats]:
  """Labels each prompt's two responses (see `World.preference_data`).

  Args:
    prompts: [N] prompts; resp_a, resp_b: [N] (response, ended_with_eos) each.
    config: the world's rater bias, its strength and the label temperature.
    label_rng: the stream the Bradley-Terry labels are drawn from.
  """
  g_a = wg.gold_scores(prompts, [r for r, _ in resp_a], [e for _, e in resp_a])
  g_b = wg.gold_scores(prompts, [r for r, _ in resp_b], [e for _, e in resp_b])
  # The raters' scores: the gold scores unless the world's raters are biased.
  bias, strength = config.rater_bias, config.rater_bias_strength
  r_a, r_b = g_a, g_b
  if bias != "none":
    r_a = wg.rater_scores(prompts, [r for r, _ in resp_a], [e for _, e in resp_a], bias, strength)
    r_b = wg.rater_scores(prompts, [r for r, _ in resp_b], [e for _, e in resp_b], bias, strength)
  prefer_a = np.asarray(wg.bt_prefers_a(r_a, r_b, label_rng, config.label_temperature),
                        bool).reshape(-1)
  records, skipped, ties, disagree = [], 0, 0, 0
  for i, prompt in enumerate(prompts):
    (ta, ea), (tb, eb) = resp_a[i], resp_b[i]
    if ta == tb:
      skipped += 1
      continue
    if g_a[i] == g_b[i]:
      ties += 1
    elif prefer_a[i] != (g_a[i] > g_b[i]):
      disagree += 1
    a, b = (ta, ea, float(g_a[i])), (tb, eb, float(g_b[i]))
    chosen, rejected = (a, b) if prefer_a[i] else (b, a)
    records.append({"prompt": prompt, "chosen": chosen[0], "rejected": rejected[0],
                    "chosen_ended": chosen[1], "rejected_ended": rejected[1],
                    "chosen_gold": chosen[2], "rejected_gold": rejected[2]})
  stats = PreferenceStats(requested=len(prompts), kept=len(records), skipped_identical=skipped,
                          gold_ties=ties, disagree_with_gold=disagree)
  return records, stats
