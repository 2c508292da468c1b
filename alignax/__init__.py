"""alignax: a JAX research framework for LLM alignment."""

__version__ = "0.1.0"
