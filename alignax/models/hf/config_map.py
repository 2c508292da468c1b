"""config.json <-> ModelConfig for the Hugging Face architectures alignax implements.

Supported architectures (`config.json` `architectures`, or `model_type` when that is absent):
  GPT2LMHeadModel (gpt2)       layernorm, learned positions, GELU (tanh), biases, tied or untied head
  LlamaForCausalLM (llama)     rmsnorm, RoPE (plain, or scaled: linear, dynamic, llama3, yarn),
                               SwiGLU, grouped-query attention, optional attention/MLP biases
                               (Llama 2, Llama 3.x)
  MistralForCausalLM (mistral) as Llama, with sliding-window attention
  Qwen2ForCausalLM (qwen2)     as Llama, with q/k/v biases; sliding windows on every layer or none
  Qwen3ForCausalLM (qwen3)     as Llama, with RMSNorm on each head's queries and keys
"""

from __future__ import annotations

import json

from alignax.errors import CheckpointError
from alignax.models.config import ModelConfig

# architectures entry -> (family, model_type)
ARCHITECTURES = {
    "GPT2LMHeadModel": ("gpt2", "gpt2"),
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("llama", "mistral"),
    "Qwen2ForCausalLM": ("llama", "qwen2"),
    "Qwen3ForCausalLM": ("llama", "qwen3"),
}
MODEL_TYPES = {model_type: arch for arch, (_, model_type) in ARCHITECTURES.items()}
# Tensors some checkpoints carry that are not weights (GPT-2's causal-mask buffers, old Llama
# checkpoints' RoPE frequencies): skipped on import.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation


class HFError(CheckpointError):
  """A Hugging Face checkpoint (or export target) alignax cannot map; the message says why."""


def _supported() -> str:
  return ", ".join(f"{a} ({m})" for a, (_, m) in ARCHITECTURES.items())


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise HFError(f"{path} not found: a Hugging Face checkpoint directory needs config.json") from None
  except (OSError, ValueError) as e:
    raise HFError(f"{path}: cannot be read as JSON ({e})") from None


def architecture_of(hf: dict) -> str:
  """The supported architecture `config.json` names, or HFError listing the supported ones."""
  archs = hf.get("architectures") or []
  if archs:
    unsupported = [a for a in archs if a not in ARCHITECTURES]
    if unsupported:
      raise HFError(f"unsupported architecture {unsupported[0]!r} (config.json architectures); "
                    f"supported: {_supported()}")
    return archs[0]
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise HFError(f"unsupported model_type {model_type!r} (config.json has no architectures); "
                  f"supported: {_supported()}")
  return MODEL_TYPES[model_type]


def _rope_fields(hf: dict, where: str) -> dict:
  """ModelConfig's rope_* fields from `rope_parameters` (transformers >= 5) or `rope_theta` and
  `rope_scaling` (older); HFError for a variant alignax does not implement."""
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  if any(isinstance(v, dict) for v in params.values()):
    raise HFError(f"{where}: per-layer-type rope_parameters are unsupported")
  rope_type = params.get("rope_type") or params.get("type") or "default"
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise HFError(f"{where}: partial_rotary_factor={partial} is unsupported (only 1.0)")
  fields = dict(rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))))
  if rope_type == "default":
    return fields
  if rope_type not in ("linear", "dynamic", "llama3", "yarn"):
    raise HFError(f"{where}: RoPE scaling {rope_type!r} is unsupported (alignax implements "
                  "'default', 'linear', 'dynamic', 'llama3' and 'yarn')")
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


def _rope_to_hf(cfg: ModelConfig) -> dict:
  """`rope_parameters` (transformers 5) for cfg's rope_* fields."""
  out = dict(rope_type="default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
             rope_theta=cfg.rope_theta)
  if cfg.rope_scaling == "none":
    return out
  out.update(factor=cfg.rope_factor)
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


def _sliding_window(hf: dict, model_type: str, max_seq_len: int, where: str) -> int:
  """The sliding window every layer uses (0: none, or one that covers every position used,
  which is the same as full attention); HFError when only some layers slide."""
  window = hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3"):
    layer_types = hf.get("layer_types")
    if layer_types is not None:
      sliding = [t == "sliding_attention" for t in layer_types]
    else:  # before transformers 5: layers >= max_window_layers slide when use_sliding_window
      first = int(hf.get("max_window_layers", 0)) if hf.get("use_sliding_window") else None
      sliding = [first is not None and i >= first for i in range(int(hf["num_hidden_layers"]))]
    if not any(sliding):
      return 0
    if not all(sliding) and window is not None and int(window) < max_seq_len:
      raise HFError(
          f"{where}: sliding-window attention on {sum(sliding)} of {len(sliding)} layers is "
          f"unsupported (alignax slides on every layer or none). Pass max_seq_len <= {window} "
          "(import-hf --max_seq_len), where the window covers every position")
  if window is None or int(window) >= max_seq_len:
    return 0
  return int(window)


def config_from_hf(hf: dict, dtype: str = "float32", *, max_seq_len: int | None = None,
                   where: str = "config.json") -> tuple[ModelConfig, str]:
  """(ModelConfig, architecture) for a Hugging Face `config.json` dict; HFError when unsupported.

  Args:
    hf: the parsed config.json.
    dtype: alignax parameter dtype.
    max_seq_len: alignax `max_seq_len` (default: the checkpoint's max positions). With learned
      positions it must not exceed them (the table keeps its first `max_seq_len` rows).
  """
  arch = architecture_of(hf)
  family, model_type = ARCHITECTURES[arch]
  compute = "bfloat16" if dtype == "bfloat16" else "float32"
  try:
    if family == "gpt2":
      for key, ok in (("add_cross_attention", False), ("scale_attn_weights", True),
                      ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, ok) != ok:
          raise HFError(f"{where}: GPT-2 with {key}={hf[key]} is unsupported (needs {ok})")
      act = hf.get("activation_function", "gelu_new")
      if act not in GELU_TANH:
        raise HFError(f"{where}: GPT-2 activation_function {act!r} is unsupported; alignax's GELU is "
                      f"the tanh approximation ({', '.join(GELU_TANH)})")
      positions = int(hf["n_positions"])
      seq = int(max_seq_len or positions)
      if seq > positions:
        raise HFError(f"{where}: max_seq_len={seq} exceeds the learned position table "
                      f"(n_positions={positions})")
      d = int(hf["n_embd"])
      cfg = ModelConfig(
          vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["n_layer"]),
          n_heads=int(hf["n_head"]), d_ff=int(hf.get("n_inner") or 4 * d), max_seq_len=seq,
          norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned",
          mlp="gelu", tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=True,
          dtype=compute, param_dtype=dtype)
    else:
      act = hf.get("hidden_act", "silu")
      if act not in ("silu", "swish"):
        raise HFError(f"{where}: hidden_act {act!r} is unsupported (alignax's SwiGLU uses silu)")
      seq = int(max_seq_len or hf["max_position_embeddings"])
      window = _sliding_window(hf, model_type, seq, where) if model_type != "llama" else 0
      heads = int(hf["num_attention_heads"])
      cfg = ModelConfig(
          vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
          n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
          n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or 0),
          d_ff=int(hf["intermediate_size"]), max_seq_len=seq, norm="rmsnorm",
          norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope", **_rope_fields(hf, where),
          mlp="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)), use_bias=False,
          qkv_bias=model_type == "qwen2", attention_bias=bool(hf.get("attention_bias", False)),
          mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
          sliding_window=window, dtype=compute, param_dtype=dtype)
  except KeyError as e:
    raise HFError(f"{where}: {arch} config is missing {e.args[0]!r}") from None
  except ValueError as e:  # ModelConfig.validate
    raise HFError(f"{where}: {e}") from None
  return cfg, arch


def _check_llama_family(cfg: ModelConfig, architecture: str, model_type: str) -> None:
  """HFError when `architecture` has no place for one of cfg's choices."""
  has = {"qkv_bias": cfg.qkv_bias, "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias,
         "qk_norm": cfg.qk_norm, "sliding_window": bool(cfg.sliding_window)}
  allowed = {"llama": {"attention_bias", "mlp_bias"}, "mistral": {"sliding_window"},
             "qwen2": {"qkv_bias", "sliding_window"},
             "qwen3": {"qk_norm", "attention_bias", "sliding_window"}}[model_type]
  for name, present in has.items():
    if present and name not in allowed:
      where = {"qkv_bias": "Qwen2ForCausalLM", "qk_norm": "Qwen3ForCausalLM",
               "sliding_window": "MistralForCausalLM", "mlp_bias": "LlamaForCausalLM",
               "attention_bias": "LlamaForCausalLM"}[name]
      raise HFError(f"{architecture} has no {name} ({name}={getattr(cfg, name)}); export as {where}")
  if model_type == "qwen3" and not cfg.qk_norm:
    raise HFError("Qwen3ForCausalLM always normalizes queries and keys (qk_norm=True)")


def config_to_hf(cfg: ModelConfig, architecture: str | None = None, tokenizer=None) -> dict:
  """A Hugging Face `config.json` dict for an alignax ModelConfig.

  Args:
    architecture: None picks GPT2LMHeadModel for GPT-2 style configs; for Llama style ones
      Qwen3ForCausalLM with q/k norms, Qwen2ForCausalLM with q/k/v biases, MistralForCausalLM with
      a sliding window, otherwise LlamaForCausalLM. Naming one checks it fits.
    tokenizer: optional alignax tokenizer whose bos/eos/pad ids go into the config.
  """
  gpt2_like = (cfg.norm, cfg.position, cfg.mlp, cfg.use_bias) == ("layernorm", "learned", "gelu", True)
  llama_like = (cfg.norm, cfg.position, cfg.mlp, cfg.use_bias) == ("rmsnorm", "rope", "swiglu", False)
  if architecture is None:
    if gpt2_like:
      architecture = "GPT2LMHeadModel"
    elif llama_like:
      architecture = ("Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias
                      else "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM")
  choices = (f"norm={cfg.norm}, position={cfg.position}, mlp={cfg.mlp}, use_bias={cfg.use_bias}")
  needs = ("GPT-2 needs layernorm/learned/gelu/use_bias, the others rmsnorm/rope/swiglu without "
           "use_bias")
  if architecture is None:
    raise HFError(f"cannot export {choices}: no Hugging Face architecture matches ({needs})")
  if architecture not in ARCHITECTURES:
    raise HFError(f"cannot export as {architecture!r}; supported: {_supported()}")
  family, model_type = ARCHITECTURES[architecture]
  if family == "gpt2" and not gpt2_like or family == "llama" and not llama_like:
    raise HFError(f"cannot export {choices} as {architecture} ({needs})")
  if family == "llama":
    _check_llama_family(cfg, architecture, model_type)
  ids = {}
  if tokenizer is not None:
    ids = dict(bos_token_id=int(tokenizer.bos_id), eos_token_id=int(tokenizer.eos_id),
               pad_token_id=int(tokenizer.pad_id))
  if family == "gpt2":
    if cfg.kv_heads != cfg.n_heads or cfg.dim_per_head * cfg.n_heads != cfg.d_model:
      raise HFError("GPT2LMHeadModel needs n_kv_heads == n_heads and head_dim == d_model / n_heads")
    hf = dict(
        architectures=[architecture], model_type="gpt2", vocab_size=cfg.vocab_size,
        n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
        n_positions=cfg.max_seq_len, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        add_cross_attention=False,
        # alignax trains without dropout; HF's GPT-2 defaults (0.1) would change fine-tuning there.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
  else:
    hf = dict(
        architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        # Both spellings: `rope_theta` (and `rope_scaling`) for transformers 4, `rope_parameters`
        # for 5.
        rope_theta=cfg.rope_theta, rope_parameters=_rope_to_hf(cfg),
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.rope_scaling != "none":
      hf.update(rope_scaling=hf["rope_parameters"])
    if model_type == "llama":
      hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if model_type == "qwen3":
      hf.update(attention_bias=cfg.attention_bias)
    window = cfg.sliding_window or None
    if model_type == "mistral":
      hf.update(sliding_window=window)
    if model_type in ("qwen2", "qwen3"):
      hf.update(sliding_window=window, use_sliding_window=window is not None, max_window_layers=0,
                layer_types=[("sliding_attention" if window else "full_attention")] * cfg.n_layers)
  hf.update(ids)
  # "torch_dtype" for transformers 4, "dtype" for 5.
  hf.update(torch_dtype=cfg.param_dtype, dtype=cfg.param_dtype)
  return hf
