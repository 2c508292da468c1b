"""Scalar-head models (reward and value models): the transformer backbone plus a linear head.

  model, params = build_scalar_model(model_config, seed, backbone=lm_params)
  values = model.values(params, tokens, positions, segment_ids)       # [B, T]
  rewards = last_token(values, segment_ids)                           # [B]

The head maps each final-norm hidden state to a scalar: v_t = h_t . w + b, with w ~ N(0, 1/(d+1))
(std 1/sqrt(d+1), as in Ziegler et al. / TRL's reward head) and b = 0. A reward is read at the last
real token of prompt + response, which `last_token` finds under left or right padding alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from alignax.models.config import ModelConfig
from alignax.models.lora import merge_module
from alignax.models.transformer import Transformer

Array = jax.Array


class ScalarModel(nnx.Module):
  """Transformer backbone + linear scalar head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.backbone = Transformer(cfg, rngs)
    std = 1.0 / (cfg.d_model + 1) ** 0.5
    self.head_w = nnx.Param((std * jax.random.normal(rngs.params(), (cfg.d_model,), jnp.float32)),
                            logical_axes=("embed",))
    self.head_b = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

  def __call__(self, tokens: Array, positions: Array, segment_ids: Array,
               shared_prefix: Array | None = None) -> Array:
    """[B, T] float32 scalars, one per position (`shared_prefix`: see `Transformer.hidden`)."""
    h, _ = self.backbone.hidden(tokens, positions, segment_ids, shared_prefix=shared_prefix)
    return jnp.einsum("btd,d->bt", h.astype(jnp.float32), self.head_w[...]) + self.head_b[...]


@dataclasses.dataclass(frozen=True)
class ScalarHeadModel:
  """Static face of a ScalarModel (config + graphdef); params travel separately."""

  config: ModelConfig
  graphdef: nnx.GraphDef

  def values(self, params, tokens, positions, segment_ids, shared_prefix=None) -> Array:
    """Per-token scalars [B, T] float32."""
    return merge_module(self.graphdef, params)(tokens, positions, segment_ids, shared_prefix)


ENSEMBLE_MODES = ("mean", "mean_minus_std", "mean_minus_var", "min")


def combine_members(values: Array, mode: str = "mean", coef: float | Array = 1.0) -> Array:
  """Reward-model ensemble scores [K, ...] -> [...] (Coste et al. 2023, "Reward model ensembles
  help mitigate overoptimization").

  mode: "mean"; "mean_minus_std": mean - coef * std over members (population std, ddof 0);
    "mean_minus_var": mean - coef * variance (the paper's uncertainty-weighted optimization,
    UWO); "min": the worst member (the paper's worst-case optimization, WCO).
  """
  if mode == "mean":
    return jnp.mean(values, axis=0)
  if mode == "mean_minus_std":
    return jnp.mean(values, axis=0) - coef * jnp.std(values, axis=0)
  if mode == "mean_minus_var":
    return jnp.mean(values, axis=0) - coef * jnp.var(values, axis=0)
  if mode == "min":
    return jnp.min(values, axis=0)
  raise ValueError(f"ensemble mode must be one of {ENSEMBLE_MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class RewardEnsemble:
  """K scalar models of one architecture as one reward model: params stacked [K, ...] on a
  leading member axis, per-position values combined over members (`combine_members`).

  Combining per position and then reading the last real token equals combining the K scores
  (the position is the same for every member), so everything that scores with a scalar model
  (`response_scores`, reward evaluation, PPO's reward) takes an ensemble unchanged.
  """

  member: ScalarHeadModel
  size: int
  mode: str = "mean"
  coef: float = 1.0

  @property
  def config(self) -> ModelConfig:
    return self.member.config

  def values(self, params, tokens, positions, segment_ids, shared_prefix=None) -> Array:
    """Combined per-token scalars [B, T] float32 of the stacked `params`."""
    per = jax.vmap(lambda p: self.member.values(p, tokens, positions, segment_ids,
                                                shared_prefix))(params)
    return combine_members(per, self.mode, self.coef)


def last_token_index(segment_ids: Array) -> Array:
  """[B] index of the last non-padding position of each row (segment_ids != 0), for left or
  right padding; 0 for an all-padding row."""
  t = segment_ids.shape[1]
  real = segment_ids != 0
  from_end = jnp.argmax(real[:, ::-1], axis=1)
  return jnp.where(jnp.any(real, axis=1), t - 1 - from_end, 0)


def last_token(values: Array, segment_ids: Array) -> Array:
  """values [B, T] read at each row's last real token -> [B]."""
  idx = last_token_index(segment_ids)
  return jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0]


def build_scalar_model(cfg: ModelConfig, seed: int | jax.Array = 0, backbone=None):
  """(ScalarHeadModel, params). With `backbone` (LM params, e.g. from SFT) the backbone starts
  from them and only the head is fresh."""
  key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
  graphdef, params = nnx.split(ScalarModel(cfg, nnx.Rngs(params=key)))
  if backbone is not None:
    params["backbone"] = backbone
  return ScalarHeadModel(cfg, graphdef), params


def abstract_scalar_model(cfg: ModelConfig):
  """The model and its params' shapes, computing nothing."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: ScalarModel(cfg, nnx.Rngs(params=0))))
  return ScalarHeadModel(cfg, graphdef), params
