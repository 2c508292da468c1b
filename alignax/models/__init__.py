"""Models: the decoder-only transformer, its config, and scalar heads."""

from alignax.models.config import ModelConfig, gpt2_style, llama_style
from alignax.models.lm import LanguageModel, abstract_lm, build_lm, count_params
from alignax.models.transformer import init_cache

__all__ = ["ModelConfig", "gpt2_style", "llama_style", "LanguageModel", "abstract_lm", "build_lm",
           "count_params", "init_cache"]
