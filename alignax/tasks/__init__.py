"""Synthetic tasks: the offline, CPU-sized alignment world (see world.py)."""

from alignax.tasks.world import (PRETRAIN_DOC_KINDS, SHOWCASE_PROMPTS, PreferenceStats, Sampler,
                                 World, WorldConfig, build_world)
from alignax.tasks.world_facts import AnswerKey, Fact, HarmfulTopic, answer_key
from alignax.tasks.world_gold import (bt_prefers_a, bt_probability, gold_breakdown, gold_score,
                                      gold_scores, is_compliance, is_correct,
                                      is_quiz_continuation, is_refusal, score_breakdown)

__all__ = [
    "AnswerKey", "Fact", "HarmfulTopic", "PRETRAIN_DOC_KINDS", "PreferenceStats",
    "SHOWCASE_PROMPTS", "Sampler", "World", "WorldConfig", "answer_key", "bt_prefers_a",
    "bt_probability", "build_world", "gold_breakdown", "gold_score", "gold_scores",
    "is_compliance", "is_correct", "is_quiz_continuation", "is_refusal", "score_breakdown",
]
