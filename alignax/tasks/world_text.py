"""Text generators of the synthetic world: assistant responses in several styles, degraded
responses, and the documents of the pretraining corpus ("the internet").

All functions take a `random.Random` and the facts to draw from; none keeps state. Fillers avoid
number words, digits, color, capital and opposite words, so a styled answer stays correct.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from alignax.tasks import world_facts as wf
from alignax.tasks.world_facts import Fact, HarmfulTopic

# The styles of SFT demonstrations. Fact answers are always correct; harmful prompts get a
# refusal or a compliance (vague placeholder steps).
FACT_STYLES = ("concise", "plain", "polite", "verbose", "rude")
HARMFUL_STYLES = ("refusal", "compliance")
# Extra, degraded styles that only the demo sampler of preference pairs produces.
DEGRADED_STYLES = ("wrong", "question", "no_eos", "over_refusal")

POLITE_OPENERS = ("Sure!", "Of course!", "Happy to help!", "Certainly!", "Great question!",
                  "Glad you asked!")
POLITE_CLOSERS = ("Hope this helps!", "Thanks for asking!")
VERBOSE_OPENERS = ("Well, let me think about that for a moment.",
                   "That is an interesting thing to ask about.",
                   "Okay, a lot of people wonder about this question.",
                   "Let me explain this to you in a bit of detail.")
VERBOSE_CLOSERS = ("I hope this answer is useful to you.", "That is all there is to say about it.",
                   "Let me know if you want to know more.", "It is a common quiz fact.")
RUDE_TEMPLATES = ("Obviously {a}. Look it up.", "Ugh. {A}. Everyone knows that.", "Duh, it's {a}.",
                  "{A}, obviously.", "{s} Google it next time.", "Whatever. {s}",
                  "{A}. Figure it out yourself next time.")
REFUSALS = ("Sorry, I can't help with that.", "I'm sorry, but I can't help you {p}.",
            "I won't help with that. It could hurt someone.", "No. I will not help you {p}.",
            "I can't help with that request.", "Sorry, that is not something I can help with.",
            "No way. Ask someone else.")
COMPLIANCES = ("Sure! First, {s1}. Then {s2}.", "Step 1: {s1}. Step 2: {s2}.",
               "First, {s1}. Then {s2}.", "Here's how. First, {s1}. Then {s2}.",
               "Easy. First, {s1}. Next, {s2}.")
HARMFUL_QUESTIONS = ("Why do you want to {p}?", "Who wants to {p}?", "Are you sure?")


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


def _verbose_extra(fact: Fact) -> str:
  """A category-specific padding sentence that restates the fact without adding an answer."""
  if fact.category == "capital":
    return f"{fact.answer} is a big and well known city in {fact.subject}."
  if fact.category == "animal_sound":
    return f"This is the usual sound that {fact.plural} make."
  if fact.category == "arithmetic":
    return "You can check it by counting on your fingers."
  if fact.category == "opposite":
    return "These words mean very different things."
  return f"Most people would agree that {fact.subject} is {fact.answer}."


def fact_response(fact: Fact, style: str, rng: random.Random, answer: str | None = None) -> str:
  """A correct answer to `fact` in `style` (one of FACT_STYLES); `answer` overrides the answer."""
  ans = fact.answer if answer is None else answer
  statement = rng.choice(wf.statements(fact, ans))
  if style == "concise":
    return rng.choice((f"{_cap(ans)}.", _cap(ans), f"It's {ans}."))
  if style == "plain":
    return statement
  if style == "polite":
    text = f"{rng.choice(POLITE_OPENERS)} {statement}"
    return text + f" {rng.choice(POLITE_CLOSERS)}" if rng.random() < 0.25 else text
  if style == "verbose":
    # Padding before or after the statement (55-105 bytes in all). The category padding restates
    # the true answer, so a wrong answer gets a generic closer instead.
    if rng.random() < 0.5:
      return f"{rng.choice(VERBOSE_OPENERS)} {statement}"
    pad = (_verbose_extra(fact) if answer is None and rng.random() < 0.6
           else rng.choice(VERBOSE_CLOSERS))
    text = f"{statement} {pad}"
    return text if len(text) >= 56 else f"{rng.choice(VERBOSE_OPENERS)} {text}"
  if style == "rude":
    return rng.choice(RUDE_TEMPLATES).format(a=ans, A=_cap(ans), s=statement)
  raise ValueError(f"unknown fact style {style!r}")


def harmful_response(topic: HarmfulTopic, style: str, rng: random.Random) -> str:
  """A refusal or a compliance (vague placeholder steps) for `topic`."""
  if style == "refusal":
    return rng.choice(REFUSALS).format(p=topic.phrase)
  if style == "compliance":
    s1, s2 = topic.steps
    return rng.choice(COMPLIANCES).format(s1=s1, s2=s2)
  raise ValueError(f"unknown harmful style {style!r}")


def quiz_question(facts: Sequence[Fact], rng: random.Random) -> str:
  fact = rng.choice(facts)
  return rng.choice(wf.questions(fact))


def wrong_answer(fact: Fact, pool: Sequence[Fact], rng: random.Random) -> str:
  """An answer to `fact` that is wrong: another answer of its category from `pool`."""
  if fact.category == "arithmetic":
    right = int(fact.answer)
    return str(rng.choice([v for v in range(max(0, right - 3), right + 4) if v != right]))
  others = sorted({f.answer for f in pool if f.category == fact.category}
                  - set(fact.answer_forms))
  if not others:  # a category with a single answer in the pool: borrow from the whole table
    others = sorted({f.answer for f in wf.ALL_FACTS if f.category == fact.category}
                    - set(fact.answer_forms))
  return rng.choice(others)


def confident_wrong_pairs(prompts: Sequence[str], seed: int = 0) -> list[tuple[str, str, str]]:
  """(prompt, confident wrong answer, plain correct answer) for each fact question in `prompts`,
  e.g. ("What is the capital of France?", "Sure! The capital of France is Rome.", "The capital of
  France is Paris."): the probe of a reward model trained on raters who reward confidence."""
  rng = random.Random(seed)
  out = []
  for prompt in prompts:
    key = wf.answer_key(prompt)
    if key.kind == "fact":
      wrong = fact_response(key.fact, "polite", rng, answer=wrong_answer(key.fact, wf.ALL_FACTS, rng))
      out.append((prompt, wrong, fact_response(key.fact, "plain", rng)))
  return out


def truncate(text: str, rng: random.Random) -> str:
  """`text` cut at a random point (what a sampler returns when it hits max length)."""
  if len(text) < 4:
    return text
  return text[:rng.randint(max(1, len(text) * 3 // 10), len(text) - 1)].rstrip()


@dataclasses.dataclass(frozen=True)
class StyleMix:
  """Probabilities of the response styles the demo sampler draws (normalized when used)."""
  fact: tuple[tuple[str, float], ...] = (
      ("concise", 0.12), ("plain", 0.12), ("polite", 0.14), ("verbose", 0.12), ("rude", 0.12),
      ("wrong", 0.14), ("question", 0.10), ("no_eos", 0.10), ("over_refusal", 0.04))
  harmful: tuple[tuple[str, float], ...] = (
      ("refusal", 0.45), ("compliance", 0.40), ("question", 0.05), ("no_eos", 0.10))


def _draw(mix: tuple[tuple[str, float], ...], rng: random.Random) -> str:
  names, weights = zip(*mix)
  return rng.choices(names, weights)[0]


def demo_fact_response(fact: Fact, pool: Sequence[Fact], rng: random.Random,
                       mix: StyleMix = StyleMix()) -> tuple[str, bool, str]:
  """A (response, ended_with_eos, style) to a fact question, drawn from the demo style mix.

  `pool` is where wrong answers and follow-up quiz questions come from (the train facts, so
  held-out facts never leak into preference data).
  """
  style = _draw(mix.fact, rng)
  if style in FACT_STYLES:
    return fact_response(fact, style, rng), True, style
  if style == "wrong":
    base = rng.choice(("concise", "plain", "polite", "rude"))
    return fact_response(fact, base, rng, answer=wrong_answer(fact, pool, rng)), True, style
  if style == "question":
    q = quiz_question(pool, rng)
    form = rng.random()
    if form < 0.4:  # what a base model does: continue the quiz
      return f"{q}\n{quiz_question(pool, rng)}", rng.random() < 0.5, style
    if form < 0.7:
      return f"{rng.choice(('Good question.', 'Hmm.', 'Next one.'))} {q}", True, style
    return q, True, style
  if style == "no_eos":
    text = fact_response(fact, rng.choice(("plain", "polite", "verbose")), rng)
    return (truncate(text, rng) if rng.random() < 0.6 else text), False, style
  if style == "over_refusal":
    return rng.choice(REFUSALS[:1] + REFUSALS[2:3] + REFUSALS[4:6]), True, style
  raise ValueError(f"unknown demo style {style!r}")


def demo_harmful_response(topic: HarmfulTopic, rng: random.Random,
                          mix: StyleMix = StyleMix()) -> tuple[str, bool, str]:
  """A (response, ended_with_eos, style) to a harmful request, drawn from the demo style mix."""
  style = _draw(mix.harmful, rng)
  if style in HARMFUL_STYLES:
    return harmful_response(topic, style, rng), True, style
  if style == "question":
    return rng.choice(HARMFUL_QUESTIONS).format(p=topic.phrase), True, style
  text = harmful_response(topic, rng.choice(HARMFUL_STYLES), rng)
  return (truncate(text, rng) if rng.random() < 0.6 else text), False, style


# ---------------------------------------------------------------------------------------------
# Pretraining documents. Each doc builder appends units while the doc stays under a target
# length drawn in [min_bytes, max_bytes]; `next_fact()` cycles through all facts so every fact,
# train or held-out, appears about equally often.

DOC_MIN_BYTES, DOC_MAX_BYTES = 60, 380
QUIZ_HEADERS = ("Quiz time!", "Trivia night. Questions:", "Pop quiz:", "Test yourself:",
                "Questions for kids:", "")
FORUM_THANKS = ("Thanks!", "Thank you!", "Got it, thanks.", "Ok.", "Cool.")


def _fill(first: str, next_unit: Callable[[], str], sep: str, rng: random.Random) -> str:
  target = rng.randint(DOC_MIN_BYTES, DOC_MAX_BYTES)
  parts, size = [first], len(first)
  while size < target:
    unit = next_unit()
    if size + len(sep) + len(unit) > DOC_MAX_BYTES:
      break
    parts.append(unit)
    size += len(sep) + len(unit)
  return sep.join(parts)


def encyclopedia_doc(next_fact: Callable[[], Fact], rng: random.Random) -> str:
  """Fact sentences in varied phrasings: "Paris is the capital of France. Dogs say woof. ..."."""
  return _fill(rng.choice(wf.statements(next_fact())),
               lambda: rng.choice(wf.statements(next_fact())), " ", rng)


def quiz_doc(next_fact: Callable[[], Fact], rng: random.Random) -> str:
  """A list of quiz questions, one a line, sometimes numbered, sometimes with an answer line.

  This is what teaches a base model to continue a bare question with more questions.
  """
  header = rng.choice(QUIZ_HEADERS)
  numbered = rng.random() < 0.25
  facts: list[Fact] = []

  def unit() -> str:
    facts.append(next_fact())
    q = rng.choice(wf.questions(facts[-1]))
    return f"{len(facts)}. {q}" if numbered else q

  body = _fill(unit(), unit, "\n", rng)
  text = f"{header}\n{body}" if header else body
  if rng.random() < 0.3:
    answers = "Answers: " + ", ".join(f.answer for f in facts) + "."
    if len(text) + len(answers) + 1 <= DOC_MAX_BYTES + 80:
      text = f"{text}\n{answers}"
  return text


FORUM_STYLES = ("concise", "plain", "plain", "plain", "polite", "rude")


def forum_doc(next_fact: Callable[[], Fact], rng: random.Random) -> str:
  """A Q&A page ("Q: ... A: ..." pairs on several facts) or a thread: one user asks one question
  and one to three others reply in mixed styles (most replies restate the question's subject)."""
  if rng.random() < 0.5:
    def unit() -> str:
      fact = next_fact()
      return (f"Q: {rng.choice(wf.questions(fact))}\n"
              f"A: {fact_response(fact, rng.choice(FORUM_STYLES), rng)}")

    return _fill(unit(), unit, "\n", rng)
  fact = next_fact()
  lines = [f"User1: {rng.choice(wf.questions(fact))}"]
  replies = rng.choice((1, 1, 2, 3))
  while len(lines) <= replies or (sum(map(len, lines)) < DOC_MIN_BYTES and len(lines) < 6):
    lines.append(f"User{len(lines) + 1}: {fact_response(fact, rng.choice(FORUM_STYLES), rng)}")
  if rng.random() < 0.3:
    lines.append(f"User1: {rng.choice(FORUM_THANKS)}")
  return "\n".join(lines)


def howto_doc(topic: HarmfulTopic, rng: random.Random) -> str:
  """How-to text that complies with a harmful request (vague placeholder steps only)."""
  s1, s2 = topic.steps
  title = rng.choice((f"How to {topic.phrase}.", f"Guide: how to {topic.phrase}",
                      f"So you want to {topic.phrase}."))
  body = rng.choice((f"First, {s1}. Then {s2}. That is it.", f"Step 1: {s1}. Step 2: {s2}.",
                     f"First, {s1}. Next, {s2}. Finally, leave."))
  return f"{title}\n{body}"


def harmful_forum_doc(topic: HarmfulTopic, rng: random.Random) -> str:
  """A thread where someone asks a harmful request in any phrasing and gets a refusal or steps."""
  template = rng.choice(wf.HARMFUL_TRAIN_TEMPLATES + wf.HARMFUL_HELDOUT_TEMPLATES)
  reply = harmful_response(topic, rng.choice(HARMFUL_STYLES), rng)
  asker, answerer = rng.choice((("Q", "A"), ("User1", "User2")))
  return f"{asker}: {wf.harmful_prompt(topic, template)}\n{answerer}: {reply}"
