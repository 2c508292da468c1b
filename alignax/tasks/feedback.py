"""AI-feedback demonstrations of the world: critiques, revisions and comparisons written from the
gold labeler's rubric, so a tiny model trained on them can critique, revise and judge.

A principle of a constitution names the rubric components it is about (`Principle.rubric`,
e.g. "polite" -> politeness); its *principle score* of a response is the sum of those gold
components (raw units, `world_gold.score_breakdown`). Everything else follows from it:

  comparison  the response with the higher principle score is the answer ("(A)" or "(B)");
              pairs whose principle scores tie say nothing about the principle and are skipped
  critique    "Problem: it is rude." when a named component is negative, else
              "No problem: it is polite." (the positive components, or "it is fine")
  revision    the response itself when the critique found no problem, else the world's ideal
              response (a polite, correct one-sentence answer, or a polite refusal)

The responses judged are the demo sampler's (the styles of the world's preference pairs: rude,
verbose, wrong, truncated, harmful compliance, ...) on train prompts, so held-out facts never
appear. Pure functions of the world, the constitution and a seed.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from alignax.cai import prompts as cai_prompts
from alignax.cai.constitution import Constitution, Principle, check_rubric
from alignax.tasks import world_facts as wf
from alignax.tasks import world_gold as wg
from alignax.tasks import world_text as wt

KINDS = ("comparison", "critique", "revision")
# What a critique says about a rubric component: (when negative, when positive).
_PHRASES = {
    "correctness": ("the answer is wrong or missing", "the answer is correct"),
    "harmful": ("it helps with a harmful request", "it refuses a harmful request"),
    "over_refusal": ("it refuses a harmless question", ""),
    "question": ("it asks a question instead of answering", ""),
    "length": ("it is too long", ""),
    "politeness": ("it is rude", "it is polite"),
    "eos": ("it is cut off", ""),
    "empty": ("it is empty", ""),
    "garbage": ("it has garbage characters", ""),
    "repetition": ("it repeats itself", ""),
}
_POLITE_REFUSALS = ("Sorry, I can't help with that.", "Sorry, that is not something I can help with.",
                    "I'm sorry, but I can't help with that.")


def principle_score(principle: Principle, prompt: str, response: str, ended: bool = True) -> float:
  """The sum of the gold components `principle.rubric` names (raw units; 0 for no rubric)."""
  comps = wg.gold_breakdown(prompt, response, ended)
  return float(sum(comps[c] for c in principle.rubric))


def principle_order(principle: Principle, prompt: str, first: tuple[str, bool],
                    second: tuple[str, bool]) -> int:
  """+1 when the first (response, ended) follows `principle` better by gold, -1 when the second
  does, 0 on a tie."""
  d = (principle_score(principle, prompt, *first) - principle_score(principle, prompt, *second))
  return int(np.sign(round(d, 9)))


def critique(principle: Principle, prompt: str, response: str, ended: bool = True) -> str:
  """The world's critique of `response` against `principle` (see the module docstring)."""
  comps = wg.gold_breakdown(prompt, response, ended)
  bad = [_PHRASES[c][0] for c in principle.rubric if comps[c] < 0]
  if bad:
    return "Problem: " + " and ".join(bad) + "."
  good = [_PHRASES[c][1] for c in principle.rubric if comps[c] > 0 and _PHRASES[c][1]]
  return "No problem: " + (" and ".join(good) if good else "it is fine") + "."


def ideal_response(prompt: str, rng: random.Random) -> str:
  """The best response the world knows for `prompt`: a polite correct answer, a polite refusal
  of a harmful request, or "I don't know." for a prompt no template renders."""
  key = wf.answer_key(prompt)
  if key.kind == "fact":
    return f"{rng.choice(wt.POLITE_OPENERS[:4])} {rng.choice(wf.statements(key.fact))}"
  if key.kind == "harmful":
    return rng.choice(_POLITE_REFUSALS)
  return "I don't know."


def revision(principle: Principle, prompt: str, response: str, ended: bool,
             rng: random.Random) -> str:
  """The world's revision: unchanged when no rubric component is negative, else the ideal."""
  comps = wg.gold_breakdown(prompt, response, ended)
  if all(comps[c] >= 0 for c in principle.rubric):
    return response
  return ideal_response(prompt, rng)


def feedback_records(prompts: Sequence[str], responses_a: Sequence[tuple[str, bool]],
                     responses_b: Sequence[tuple[str, bool]], constitution: Constitution,
                     n: int, seed: int, mix=(0.5, 0.25, 0.25)) -> list[dict[str, str]]:
  """`n` SFT demonstrations {"prompt", "response", "style"} of the three feedback tasks.

  Args:
    prompts: [M] train prompts; responses_a, responses_b: [M] two (response, ended) per prompt
      (the world's demo sampler). Record i uses prompt i mod M.
    constitution: the principles (each with a rubric of world components).
    n: demonstrations to write. A comparison is about a principle drawn among those on which
      its pair differs (pairs that tie on all of them are skipped), so exactly `n` come out
      unless nearly every pair ties.
    seed: the stream of principle, task and order draws.
    mix: fractions of comparison, critique and revision demonstrations.

  style is "feedback/<kind>/<principle id>", for inspection.
  """
  check_rubric(constitution, wg.COMPONENTS)
  usable = [p for p in constitution.principles if p.rubric]
  if not usable or not prompts or n <= 0:
    return []
  rng = random.Random(seed)
  records, i, misses = [], 0, 0
  while len(records) < n and misses < 50 * n + 1000:
    j = i % len(prompts)
    i += 1
    prompt, (a, a_ended), (b, b_ended) = prompts[j], responses_a[j], responses_b[j]
    kind = rng.choices(KINDS, mix)[0]
    principle = rng.choice(usable)
    if kind == "comparison":
      # A principle on which this pair differs (a harmful request differs on few of them).
      orders = {p.id: principle_order(p, prompt, (a, a_ended), (b, b_ended)) for p in usable}
      decided = [p for p in usable if orders[p.id] != 0]
      if not decided or a == b:
        misses += 1
        continue
      principle = rng.choice(decided)
      order = orders[principle.id]
      if rng.random() < 0.5:  # either position equally often: a judge must read, not guess
        a, b, order = b, a, -order
      user = cai_prompts.comparison_prompt(principle, prompt, a, b)
      answer = cai_prompts.CHOICES[0] if order > 0 else cai_prompts.CHOICES[1]
    elif kind == "critique":
      user = cai_prompts.critique_prompt(principle, prompt, a)
      answer = critique(principle, prompt, a, a_ended)
    else:
      crit = critique(principle, prompt, a, a_ended)
      user = cai_prompts.revision_prompt(principle, prompt, a, crit)
      answer = revision(principle, prompt, a, a_ended, rng)
    records.append({"prompt": user, "response": answer, "style": f"feedback/{kind}/{principle.id}"})
  return records


def gold_preference_prob(prompt: str, first: tuple[str, bool], second: tuple[str, bool]) -> float:
  """1 when gold prefers the first response, 0 when the second, 0.5 on a tie."""
  d = wg.gold_score(prompt, *first) - wg.gold_score(prompt, *second)
  return 1.0 if d > 0 else (0.0 if d < 0 else 0.5)


def label_agreement(rows: Sequence[dict], constitution: Constitution) -> dict[str, dict[str, float]]:
  """How AI labels (`alignax label` output rows on world pairs) agree with gold and the input.

  Returns {principle id or "overall": {"gold": agreement, "gold_n": pairs, "input": ...,
  "input_n": ...}}. Per principle: over the pairs judged on it whose principle scores differ,
  the fraction where the judge's P(chosen better) > 0.5 matches the rubric's order ("gold"), and
  over all pairs judged on it, the fraction where it matches the input's label ("input"). "overall":
  the final label (chosen) against the gold score order (pairs without a gold tie), and
  against the input's label (the simulated human raters' when the input is world pairs).
  """
  by_id = {p.id: p for p in constitution.principles}
  hits: dict[str, list[bool]] = {}
  with_input: dict[str, list[bool]] = {}
  gold, human = [], []
  for r in rows:
    fb = r["ai_feedback"]
    prompt = cai_prompts.conversation_text(r["prompt"])
    chosen = (cai_prompts.response_text(r["chosen"]), bool(r.get("chosen_ended", True)))
    rejected = (cai_prompts.response_text(r["rejected"]), bool(r.get("rejected_ended", True)))
    kept = fb["input_chosen_prob"] >= 0.5  # the output's chosen is the input's chosen
    for pid, p in zip(fb["principles"], fb["probs"]):
      if p == 0.5:
        continue
      p_input = p if kept else 1.0 - p
      with_input.setdefault(pid, []).append(p_input > 0.5)
      if pid in by_id and by_id[pid].rubric:
        order = principle_order(by_id[pid], prompt, chosen, rejected)
        if order:
          hits.setdefault(pid, []).append((p > 0.5) == (order > 0))
    g = gold_preference_prob(prompt, chosen, rejected)
    if g != 0.5:
      gold.append(g == 1.0)
    human.append(fb["input_chosen_prob"] >= 0.5)
  out = {pid: {"gold": float(np.mean(hits[pid])) if hits.get(pid) else float("nan"),
                "gold_n": len(hits.get(pid, ())), "input": float(np.mean(h)), "input_n": len(h)}
         for pid, h in with_input.items()}
  out["overall"] = {"gold": float(np.mean(gold)) if gold else float("nan"), "gold_n": len(gold),
                    "input": float(np.mean(human)) if human else float("nan"), "input_n": len(human)}
  return out
