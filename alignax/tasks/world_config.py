"""`WorldConfig`: the size and seed of the synthetic world (the `world.*` config section)."""

from __future__ import annotations

import dataclasses
import math

from alignax.errors import ConfigError
from alignax.tasks import world_gold as wg

PRETRAIN_DOC_KINDS = ("encyclopedia", "quiz", "forum", "howto", "harmful_forum")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Size and seed of the world. Everything is a deterministic function of these fields.

  seed: the one seed; every dataset draws from its own stream derived from it.
  num_capitals, num_animal_sounds, num_arithmetic, num_opposites, num_colors: facts per
    category, drawn from the tables in world_facts (45, 22, 117, 30, 21 available; the pinned
    showcase facts are always included).
  num_harmful_topics: harmful request topics (12 available).
  heldout_fraction: fraction of the facts (and harmful topics) of each category held out: they
    appear in the pretraining corpus and eval prompts, never in SFT, preference or train-prompt
    data. At least one per category is held out when > 0, and one is always kept for training.
  pretrain_bytes: size of the pretraining train split (sum of UTF-8 bytes of the texts; the
    last document may overshoot by < 400 bytes).
  pretrain_eval_bytes: size of the held-out pretraining split (same distribution, other docs).
  pretrain_mix: relative frequency of each kind of pretraining document (PRETRAIN_DOC_KINDS).
    Forum Q&A is half of the default mix: its answers restate the question's subject ("Q: What
    is the capital of France? A: The capital of France is Paris."), which is what teaches a
    small base model to answer a question about the subject it was asked (the README's "The
    world's defaults" gives the measurements behind this and the other defaults).
  num_sft, num_sft_eval: SFT demonstrations per split.
  harmful_fraction: fraction of harmful requests among SFT demonstrations and preference prompts.
  num_preference_pairs, num_preference_eval: pairs *attempted* per split; pairs whose two
    responses are the same text are dropped (and counted), so slightly fewer come out.
  label_temperature: Bradley-Terry noise temperature in gold-score units,
    P(a > b) = sigmoid((g_a - g_b) / T); 0 is noiseless.
  rater_bias, rater_bias_strength: how the simulated raters who label preference pairs deviate
    from the gold labeler (world_gold.rater_score): "none" (they see the gold score), or
    "confident" (they reward a confident, flattering tone and credit it as correct, scaled by
    the strength; 1: a confident wrong answer ties a confident correct one). Labels then
    follow Bradley-Terry noise on the raters' scores; `chosen_gold` / `rejected_gold` and
    every metric stay gold.
  feedback_demos: AI-feedback demonstrations (comparisons, critiques, revisions against the
    principles of `constitution`, written from the gold rubric; `alignax.tasks.feedback`) added to the
    SFT train split, and a tenth as many to its eval split; 0 (the default) adds none.
  constitution: the constitution those demonstrations follow: "world" (the built-in one) or a
    path; its principles must name rubric components of the gold labeler.
  num_eval_prompts: size of the eval prompt set (~30% held-out facts, 20% harmful requests in
    held-out phrasings or topics, the rest train facts).
  """
  seed: int = 0
  num_capitals: int = 30
  num_animal_sounds: int = 16
  num_arithmetic: int = 30
  num_opposites: int = 20
  num_colors: int = 14
  num_harmful_topics: int = 12
  heldout_fraction: float = 0.2
  pretrain_bytes: int = 3_000_000
  pretrain_eval_bytes: int = 150_000
  pretrain_mix: tuple[tuple[str, float], ...] = (
      ("encyclopedia", 0.15), ("quiz", 0.2), ("forum", 0.5), ("howto", 0.06),
      ("harmful_forum", 0.09))
  num_sft: int = 4000
  num_sft_eval: int = 400
  harmful_fraction: float = 0.15
  num_preference_pairs: int = 8000
  num_preference_eval: int = 400
  label_temperature: float = 0.75
  num_eval_prompts: int = 200
  rater_bias: str = "none"
  rater_bias_strength: float = 1.0
  feedback_demos: int = 0
  constitution: str = "world"

  @classmethod
  def from_mapping(cls, section) -> "WorldConfig":
    """From a `world.*` section (a ConfigDict, or a dict read back from JSON, where tuples
    are lists). Raises ConfigError naming the problem."""
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    if "pretrain_mix" in values:
      values["pretrain_mix"] = tuple((str(k), float(v)) for k, v in values["pretrain_mix"])
    try:
      return cls(**values)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.world: {e}") from None

  def __post_init__(self):
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}")
    if not 0.0 <= self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
    if not 0.0 <= self.harmful_fraction <= 1.0:
      raise ValueError(f"harmful_fraction must be in [0, 1], got {self.harmful_fraction}")
    if self.rater_bias not in wg.RATER_BIASES:
      raise ValueError(f"rater_bias must be one of {wg.RATER_BIASES}, got {self.rater_bias!r}")
    if not (math.isfinite(self.rater_bias_strength) and self.rater_bias_strength >= 0):
      raise ValueError(f"rater_bias_strength must be finite and >= 0, got {self.rater_bias_strength}")
    if self.label_temperature < 0:
      raise ValueError(f"label_temperature must be >= 0, got {self.label_temperature}")
    for name in ("num_capitals", "num_animal_sounds", "num_arithmetic", "num_opposites",
                 "num_colors", "num_harmful_topics", "pretrain_bytes", "pretrain_eval_bytes",
                 "num_sft", "num_sft_eval", "num_preference_pairs", "num_preference_eval",
                 "num_eval_prompts", "feedback_demos"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    unknown = {k for k, _ in self.pretrain_mix} - set(PRETRAIN_DOC_KINDS)
    if unknown:
      raise ValueError(f"unknown pretrain_mix kinds {sorted(unknown)}; know {PRETRAIN_DOC_KINDS}")

  @property
  def category_sizes(self) -> dict[str, int]:
    return {"capital": self.num_capitals, "animal_sound": self.num_animal_sounds,
            "arithmetic": self.num_arithmetic, "opposite": self.num_opposites,
            "color": self.num_colors}
