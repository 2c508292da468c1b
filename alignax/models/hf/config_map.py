"""config.json <-> ModelConfig for the Hugging Face architectures alignax implements.

Supported architectures (`config.json` `architectures`, or `model_type` when that is absent):
  GPT2LMHeadModel (gpt2)       layernorm, learned positions, GELU (tanh), biases, tied or untied head
  LlamaForCausalLM (llama)     rmsnorm, RoPE, SwiGLU, grouped-query attention
  MistralForCausalLM (mistral) as Llama; sliding-window attention only where the window covers
                               every position used (sliding_window >= max_seq_len)
  Qwen2ForCausalLM (qwen2)     as Llama, with q/k/v biases
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


def _rope_theta(hf: dict, where: str) -> float:
  """RoPE base from `rope_parameters` (transformers >= 5) or `rope_theta` (older); only plain
  RoPE is supported (no scaling, full rotary dimension)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  if any(isinstance(v, dict) for v in params.values()):
    raise HFError(f"{where}: per-layer-type rope_parameters are unsupported")
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type != "default":
    raise HFError(f"{where}: RoPE scaling {rope_type!r} is unsupported (alignax implements plain "
                  f"RoPE only: rope_type 'default')")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise HFError(f"{where}: partial_rotary_factor={partial} is unsupported (only 1.0)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _sliding_window_check(hf: dict, model_type: str, max_seq_len: int, where: str) -> None:
  """Full attention equals sliding-window attention when the window covers every position used:
  HF lets query q see keys k with q - k < window, so window >= max_seq_len suffices."""
  window = hf.get("sliding_window")
  if model_type == "qwen2":
    layer_types = hf.get("layer_types")
    if layer_types is not None:
      sliding = "sliding_attention" in layer_types
    else:  # before transformers 5: layers >= max_window_layers slide when use_sliding_window
      sliding = bool(hf.get("use_sliding_window")) and (
          hf.get("max_window_layers", 0) < hf["num_hidden_layers"])
    if not sliding:
      return
  if window is not None and int(window) < max_seq_len:
    raise HFError(
        f"{where}: sliding_window={window} < max_seq_len={max_seq_len}: sliding-window attention "
        f"is unsupported. Pass max_seq_len <= {window} (import-hf --max_seq_len) to use the model "
        f"with full attention within one window, where the two are the same")


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
      for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
          raise HFError(f"{where}: {key}=true is unsupported (alignax has biases on q/k/v only, "
                        f"as in Qwen2, or on every projection with GPT-2's layout)")
      seq = int(max_seq_len or hf["max_position_embeddings"])
      if model_type in ("mistral", "qwen2"):
        _sliding_window_check(hf, model_type, seq, where)
      heads = int(hf["num_attention_heads"])
      cfg = ModelConfig(
          vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
          n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
          n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or 0),
          d_ff=int(hf["intermediate_size"]), max_seq_len=seq, norm="rmsnorm",
          norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope",
          rope_theta=_rope_theta(hf, where), mlp="swiglu",
          tie_embeddings=bool(hf.get("tie_word_embeddings", False)), use_bias=False,
          qkv_bias=model_type == "qwen2", dtype=compute, param_dtype=dtype)
  except KeyError as e:
    raise HFError(f"{where}: {arch} config is missing {e.args[0]!r}") from None
  except ValueError as e:  # ModelConfig.validate
    raise HFError(f"{where}: {e}") from None
  return cfg, arch


def config_to_hf(cfg: ModelConfig, architecture: str | None = None, tokenizer=None) -> dict:
  """A Hugging Face `config.json` dict for an alignax ModelConfig.

  Args:
    architecture: None picks GPT2LMHeadModel for GPT-2 style configs, LlamaForCausalLM for Llama
      style ones and Qwen2ForCausalLM when they have q/k/v biases. Naming one checks it fits.
    tokenizer: optional alignax tokenizer whose bos/eos/pad ids go into the config.
  """
  gpt2_like = (cfg.norm, cfg.position, cfg.mlp, cfg.use_bias) == ("layernorm", "learned", "gelu", True)
  llama_like = (cfg.norm, cfg.position, cfg.mlp, cfg.use_bias) == ("rmsnorm", "rope", "swiglu", False)
  if architecture is None:
    if gpt2_like:
      architecture = "GPT2LMHeadModel"
    elif llama_like:
      architecture = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
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
  if model_type in ("llama", "mistral") and cfg.qkv_bias:
    raise HFError(f"{architecture} has no q/k/v-only biases (qkv_bias=True); export as Qwen2ForCausalLM")
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
        # Both spellings: `rope_theta` for transformers 4, `rope_parameters` for 5.
        rope_theta=cfg.rope_theta, rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if model_type == "llama":
      hf.update(attention_bias=False, mlp_bias=False)
    if model_type in ("mistral", "qwen2"):
      hf.update(sliding_window=None, use_sliding_window=False)
  hf.update(ids)
  # "torch_dtype" for transformers 4, "dtype" for 5.
  hf.update(torch_dtype=cfg.param_dtype, dtype=cfg.param_dtype)
  return hf
