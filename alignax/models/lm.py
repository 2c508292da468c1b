"""The functional face of the transformer: a static `graphdef` plus a `params` pytree.

  lm, params = build_lm(model_config, seed)
  logits, cache = lm.apply(params, tokens, positions, segment_ids, cache=None)

`LanguageModel` is a frozen, hashable value (config + graphdef), so jitted functions can close
over it; `params` is an `nnx.State` of arrays that train steps take and return.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from alignax.models.config import ModelConfig
from alignax.models.lora import merge_module
from alignax.models.transformer import Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  config: ModelConfig
  graphdef: nnx.GraphDef

  def module(self, params) -> Transformer:
    """The module of `params` (plain, or holding LoRA adapters: `alignax.models.lora`)."""
    return merge_module(self.graphdef, params)

  def apply(self, params, tokens, positions, segment_ids, cache=None, shared_prefix=None):
    """(logits [B, T, V] float32, cache). See `Transformer.hidden` for the arguments."""
    return self.module(params)(tokens, positions, segment_ids, cache, shared_prefix)

  def hidden(self, params, tokens, positions, segment_ids, cache=None, shared_prefix=None):
    """(final-norm hidden states [B, T, d], cache)."""
    return self.module(params).hidden(tokens, positions, segment_ids, cache, shared_prefix)

  def unembed(self, params, h):
    """[B, T, d] -> [B, T, V] float32 logits."""
    return self.module(params).unembed(h)

  def with_layers(self, params, cache: dict) -> dict:
    """`cache` carrying each layer's params, sliced from `params` once (see `init_cache`): for
    a loop that calls `apply` with this cache and the same `params` at every step."""
    return dict(cache, layers=self.module(params).layer_params())

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    return init_cache(self.config, batch, max_len, dtype)


def build_lm(cfg: ModelConfig, seed: int | jax.Array = 0) -> tuple[LanguageModel, nnx.State]:
  """Initializes a transformer; returns the static model and its params pytree."""
  key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(params=key)))
  return LanguageModel(cfg, graphdef), params


def abstract_lm(cfg: ModelConfig) -> tuple[LanguageModel, nnx.State]:
  """The model and the shapes/dtypes of its params (`jax.ShapeDtypeStruct` leaves), computing nothing."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0))))
  return LanguageModel(cfg, graphdef), params


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
