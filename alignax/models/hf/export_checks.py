"""What an export target can hold: each ModelConfig choice an architecture has no place for is
refused by name, saying which architecture can hold it."""

from __future__ import annotations

from alignax.models.config import ModelConfig
from alignax.models.hf.errors import HFError


# ModelConfig fields only Gemma's architectures have a place for.
GEMMA_ONLY = ("norm_plus_one", "post_norms", "scale_embeddings", "query_pre_attn_scalar",
              "attn_softcap", "final_softcap", "rope_local_theta")


def partial_window(cfg: ModelConfig) -> bool:
  """Whether some layers slide and others do not."""
  return len(set(cfg.local_layers)) == 2


def check_gemma_only(cfg: ModelConfig, architecture: str, skip: tuple[str, ...] = ()) -> None:
  for name in GEMMA_ONLY:
    if getattr(cfg, name) and name not in skip:
      raise HFError(f"{architecture} has no {name} ({name}={getattr(cfg, name)}); export as "
                    "Gemma2ForCausalLM or Gemma3ForCausalLM")


# The choices only OLMo 2 and Phi-3 have a place for: name -> (present in cfg, where it exports).
def olmo_phi_choices(cfg: ModelConfig) -> dict[str, tuple[bool, str]]:
  return {"pre_norms": (not cfg.pre_norms, "Olmo2ForCausalLM"),
          "qk_norm_scope": (cfg.qk_norm and cfg.qk_norm_scope == "all", "Olmo2ForCausalLM"),
          "rotary_dim": (cfg.rotary_dim not in (0, cfg.dim_per_head), "Phi3ForCausalLM"),
          "rope_scaling": (cfg.rope_scaling == "longrope", "Phi3ForCausalLM")}


def check_olmo_phi(cfg: ModelConfig, architecture: str, allowed=()) -> None:
  for name, (present, where) in olmo_phi_choices(cfg).items():
    if present and name not in allowed:
      raise HFError(f"{architecture} has no {name} ({name}={getattr(cfg, name)!r}); export as {where}")


def check_llama_family(cfg: ModelConfig, architecture: str, model_type: str) -> None:
  """HFError when `architecture` has no place for one of cfg's choices."""
  olmo2 = model_type == "olmo2"
  check_olmo_phi(cfg, architecture, {"olmo2": ("pre_norms", "qk_norm_scope"),
                                      "phi3": ("rotary_dim", "rope_scaling")}.get(model_type, ()))
  check_gemma_only(cfg, architecture, skip=("post_norms",) if olmo2 else ())
  has = {"qkv_bias": cfg.qkv_bias, "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias,
         "qk_norm": cfg.qk_norm, "sliding_window": any(cfg.local_layers),
         "layer_pattern": partial_window(cfg)}
  allowed = {"llama": {"attention_bias", "mlp_bias"}, "mistral": {"sliding_window"},
             "qwen2": {"qkv_bias", "sliding_window", "layer_pattern"},
             "qwen3": {"qk_norm", "attention_bias", "sliding_window", "layer_pattern"},
             "olmo2": {"qk_norm", "attention_bias"},
             "phi3": {"sliding_window"}}[model_type]
  for name, present in has.items():
    if present and name not in allowed:
      where = {"qkv_bias": "Qwen2ForCausalLM", "qk_norm": "Qwen3ForCausalLM",
               "sliding_window": "MistralForCausalLM", "mlp_bias": "LlamaForCausalLM",
               "attention_bias": "LlamaForCausalLM", "layer_pattern": "Qwen2ForCausalLM"}[name]
      raise HFError(f"{architecture} has no {name} ({name}={getattr(cfg, name)}); export as {where}")
  if model_type == "qwen3" and not cfg.qk_norm:
    raise HFError("Qwen3ForCausalLM always normalizes queries and keys (qk_norm=True)")
  if olmo2 and not (cfg.qk_norm and cfg.qk_norm_scope == "all" and cfg.post_norms
                    and not cfg.pre_norms):
    raise HFError("Olmo2ForCausalLM always has q/k norms over all heads (qk_norm=True, "
                  "qk_norm_scope='all') and norms after, not before, each sublayer (post_norms=True, "
                  f"pre_norms=False); got qk_norm={cfg.qk_norm}, qk_norm_scope={cfg.qk_norm_scope!r}, "
                  f"post_norms={cfg.post_norms}, pre_norms={cfg.pre_norms}")


def check_gemma_family(cfg: ModelConfig, architecture: str, model_type: str) -> None:
  """HFError when `architecture` has no place for one of cfg's choices."""
  gemma3 = model_type == "gemma3_text"
  check_olmo_phi(cfg, architecture)
  refusals = [
      (cfg.mlp_bias, "mlp_bias", "LlamaForCausalLM"),
      (cfg.qkv_bias and not cfg.attention_bias, "qkv_bias", "Qwen2ForCausalLM"),
      (cfg.qk_norm and not gemma3, "qk_norm", "Gemma3ForCausalLM"),
      (cfg.rope_local_theta and not gemma3, "rope_local_theta", "Gemma3ForCausalLM"),
      # transformers' Gemma 3 attention ignores attn_logit_softcapping.
      (cfg.attn_softcap and gemma3, "attn_softcap", "Gemma2ForCausalLM"),
  ]
  for present, name, where in refusals:
    if present:
      raise HFError(f"{architecture} has no {name} ({name}={getattr(cfg, name)}); export as {where}")
  if gemma3 and not cfg.qk_norm:
    raise HFError("Gemma3ForCausalLM always normalizes queries and keys (qk_norm=True)")
  if gemma3 and not cfg.rope_local_theta and cfg.rope_scaling != "none":
    raise HFError("Gemma3ForCausalLM's local layers use plain RoPE: set rope_local_theta (with "
                  f"rope_scaling={cfg.rope_scaling!r} on the global layers)")
