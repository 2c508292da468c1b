"""RoPE between config.json (`rope_theta`, `rope_scaling` / `rope_parameters`) and ModelConfig's
rope_* fields: plain, linear, dynamic, llama3, yarn, and Phi-3's LongRoPE."""

from __future__ import annotations

from alignax.models.config import ModelConfig
from alignax.models.hf.errors import HFError


def rope_fields(hf: dict, where: str, params: dict | None = None, model_type: str = "") -> dict:
  """ModelConfig's rope_* fields from `rope_parameters` (transformers >= 5) or `rope_theta` and
  `rope_scaling` (older), or from `params` (one layer type's); HFError for a variant alignax does
  not implement. Phi-3 (`model_type` "phi3") alone may rotate part of each head and use LongRoPE."""
  if params is None:
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  if any(isinstance(v, dict) for v in params.values()):
    raise HFError(f"{where}: per-layer-type rope_parameters are unsupported")
  phi3 = model_type == "phi3"
  rope_type = params.get("rope_type") or params.get("type") or "default"
  if phi3 and rope_type in ("su", "yarn"):  # Phi3Config reads both as LongRoPE
    rope_type = "longrope"
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  fields = dict(rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))))
  if partial not in (None, 1, 1.0):
    if not phi3:
      raise HFError(f"{where}: partial_rotary_factor={partial} is unsupported here (only 1.0; "
                    "alignax implements a partial rotary for Phi3ForCausalLM)")
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))
    rotary = int(head_dim * float(partial))  # transformers' int(head_dim * partial_rotary_factor)
    if rotary <= 0 or rotary % 2:
      raise HFError(f"{where}: partial_rotary_factor={partial} gives {rotary} rotary dimensions "
                    f"of head_dim={head_dim}; RoPE needs a positive even number")
    fields.update(rotary_dim=rotary)
  if rope_type == "default":
    return fields
  if rope_type == "longrope" and phi3:
    return {**fields, **longrope_fields(hf, params, where)}
  if rope_type not in ("linear", "dynamic", "llama3", "yarn") or phi3:
    raise HFError(f"{where}: RoPE scaling {rope_type!r} is unsupported here (alignax implements "
                  "'default', 'linear', 'dynamic', 'llama3' and 'yarn', and 'longrope' for "
                  "Phi3ForCausalLM, whose only scaling it is)")
  max_pos = int(hf["max_position_embeddings"])
  original = int(params.get("original_max_position_embeddings")
                 or hf.get("original_max_position_embeddings") or max_pos)
  factor = params.get("factor")
  if factor is None and rope_type == "yarn":
    factor = max_pos / original
  if factor is None:
    raise HFError(f"{where}: RoPE scaling {rope_type!r} needs a factor")
  fields.update(rope_scaling=rope_type, rope_factor=float(factor))
  if rope_type == "dynamic":  # transformers grows the base past max_position_embeddings
    fields.update(rope_original_max_len=max_pos)
  elif rope_type == "llama3":
    fields.update(rope_original_max_len=original,
                  rope_low_freq_factor=float(params["low_freq_factor"]),
                  rope_high_freq_factor=float(params["high_freq_factor"]))
  elif rope_type == "yarn":
    from alignax.models.rope import yarn_attention_factor
    attention = params.get("attention_factor")
    if attention is None:
      attention = yarn_attention_factor(float(factor), params.get("mscale"), params.get("mscale_all_dim"))
    fields.update(rope_original_max_len=original, rope_attention_factor=float(attention),
                  rope_beta_fast=float(params.get("beta_fast") or 32),
                  rope_beta_slow=float(params.get("beta_slow") or 1),
                  rope_truncate=bool(params.get("truncate", True)))
  return fields


def longrope_fields(hf: dict, params: dict, where: str) -> dict:
  """The rope_* fields of Phi-3's LongRoPE, as transformers reads its config: the top-level
  original_max_position_embeddings (Phi3Config's default 4096 when config.json has none) wins
  over rope_parameters'; factor defaults to max_position_embeddings / original."""
  from alignax.models.rope import longrope_attention_factor
  for key in ("short_factor", "long_factor"):
    if not isinstance(params.get(key), (list, tuple)):
      raise HFError(f"{where}: RoPE scaling 'longrope' needs a list {key} (got {params.get(key)!r})")
  original = int(hf.get("original_max_position_embeddings") or 4096)
  factor = params.get("factor")
  if factor is None:
    factor = int(hf.get("max_position_embeddings", 4096)) / original
  attention = params.get("attention_factor")
  if attention is None:
    attention = longrope_attention_factor(float(factor), original)
  return dict(rope_scaling="longrope", rope_factor=float(factor), rope_original_max_len=original,
              rope_attention_factor=float(attention),
              rope_short_factor=tuple(float(x) for x in params["short_factor"]),
              rope_long_factor=tuple(float(x) for x in params["long_factor"]))


def rope_to_hf(cfg: ModelConfig) -> dict:
  """`rope_parameters` (transformers 5) for cfg's rope_* fields."""
  out = dict(rope_type="default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
             rope_theta=cfg.rope_theta)
  if cfg.rotary_dim:
    out.update(partial_rotary_factor=cfg.rotary_dim / cfg.dim_per_head)
  if cfg.rope_scaling == "none":
    return out
  out.update(factor=cfg.rope_factor)
  if cfg.rope_scaling == "longrope":
    from alignax.models.rope import longrope_attention_factor
    out.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor),
               original_max_position_embeddings=cfg.rope_original_max_len,
               attention_factor=cfg.rope_attention_factor)
    # Left out when transformers derives the same (as Phi-3's own configs leave them out).
    if cfg.rope_factor == cfg.max_seq_len / cfg.rope_original_max_len:
      del out["factor"]
    default = longrope_attention_factor(cfg.rope_factor, cfg.rope_original_max_len)
    if not cfg.rope_attention_factor or cfg.rope_attention_factor == default:
      del out["attention_factor"]
  if cfg.rope_scaling == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_len)
  elif cfg.rope_scaling == "yarn":
    out.update(attention_factor=cfg.rope_attention_factor or None, beta_fast=cfg.rope_beta_fast,
               beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate,
               original_max_position_embeddings=cfg.rope_original_max_len)
    if out["attention_factor"] is None:
      del out["attention_factor"]
  return out
