"""config.json <-> ModelConfig for the Hugging Face architectures alignax implements.

Supported architectures (`config.json` `architectures`, or `model_type` when that is absent):
  GPT2LMHeadModel (gpt2)       layernorm, learned positions, GELU (tanh), biases, tied or untied head
  LlamaForCausalLM (llama)     rmsnorm, RoPE (plain, or scaled: linear, dynamic, llama3, yarn),
                               SwiGLU, grouped-query attention, optional attention/MLP biases
                               (Llama 2, Llama 3.x)
  MistralForCausalLM (mistral) as Llama, with sliding-window attention
  Qwen2ForCausalLM (qwen2)     as Llama, with q/k/v biases; a sliding window on every layer, on
                               some (`max_window_layers` / `layer_types`) or none
  Qwen3ForCausalLM (qwen3)     as Llama, with RMSNorm on each head's queries and keys
  Gemma2ForCausalLM (gemma2)   GeGLU, (1 + w) RMSNorms before and after each sublayer, embeddings
                               scaled by sqrt(d), local/global layers (`layer_types`), attention
                               and final logit soft-capping, `query_pre_attn_scalar`
  Gemma3ForCausalLM (gemma3_text)  as Gemma 2 with (1 + w) q/k norms, no soft-capping, and a
                               separate RoPE base for local layers (`rope_local_base_freq`)
  Gemma3ForConditionalGeneration (gemma3)  its text model (`text_config`, weights under
                               `language_model.model.` or `model.language_model.`), as
                               Gemma3ForCausalLM; the vision tower and multimodal projector are
                               skipped (counted in the import's info); exported as Gemma3ForCausalLM
  Olmo2ForCausalLM (olmo2)     as Llama, with no norm before the sublayers but one on each
                               sublayer's output (post_attention / post_feedforward), and q/k
                               RMSNorm over all heads' projected queries / keys at once
  Phi3ForCausalLM (phi3)       as Mistral, with fused qkv_proj / gate_up_proj weights (split on
                               import, fused on export), partial rotary (`partial_rotary_factor`)
                               and LongRoPE scaling (`longrope`: short/long factors)
"""

from __future__ import annotations

import json

from alignax.models.config import ModelConfig
from alignax.models.hf.errors import HFError
from alignax.models.hf.export_checks import (check_gemma_family, check_gemma_only, check_llama_family,
                                             check_olmo_phi, partial_window)
from alignax.models.hf.rope_map import rope_fields, rope_to_hf

# architectures entry -> (family, model_type)
ARCHITECTURES = {
    "GPT2LMHeadModel": ("gpt2", "gpt2"),
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("llama", "mistral"),
    "Qwen2ForCausalLM": ("llama", "qwen2"),
    "Qwen3ForCausalLM": ("llama", "qwen3"),
    "Gemma2ForCausalLM": ("gemma", "gemma2"),
    "Gemma3ForCausalLM": ("gemma", "gemma3_text"),
    "Gemma3ForConditionalGeneration": ("gemma", "gemma3"),
    "Olmo2ForCausalLM": ("llama", "olmo2"),
    "Phi3ForCausalLM": ("phi3", "phi3"),
}
# Import-only architectures and what their import exports as (the text model alone).
EXPORTED_AS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
# Tensors of a multimodal checkpoint outside its text model: skipped (and counted) on import.
SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")
MODEL_TYPES = {model_type: arch for arch, (_, model_type) in ARCHITECTURES.items()}
# Tensors some checkpoints carry that are not weights (GPT-2's causal-mask buffers, old Llama
# checkpoints' RoPE frequencies): skipped on import.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation


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


def _sliding_window(hf: dict, model_type: str, max_seq_len: int, where: str) -> tuple[int, str]:
  """(sliding_window, layer_pattern) of a Mistral/Qwen2/Qwen3 config: (0, "") when no layer
  slides or the window covers every position used (the same as full attention), (window, "")
  when every layer slides, else the window and one "L"/"G" per layer."""
  window = hf.get("sliding_window")
  n = int(hf["num_hidden_layers"])
  sliding = [True] * n
  if model_type in ("qwen2", "qwen3"):
    if not hf.get("use_sliding_window", False):
      window = None  # transformers drops the window unless use_sliding_window
    layer_types = hf.get("layer_types")
    if layer_types is not None:
      sliding = _sliding_layers(layer_types, n, where)
    else:  # before transformers 5: layers >= max_window_layers slide
      first = int(hf.get("max_window_layers", 0))
      sliding = [i >= first for i in range(n)]
  if window is None or int(window) >= max_seq_len or not any(sliding):
    return 0, ""
  return int(window), "" if all(sliding) else "".join("L" if s else "G" for s in sliding)


def _sliding_layers(layer_types, n: int, where: str) -> list[bool]:
  """Per layer, whether `layer_types` (transformers' names) makes it a sliding-window layer."""
  kinds = ("sliding_attention", "full_attention")
  if len(layer_types) != n or any(t not in kinds for t in layer_types):
    raise HFError(f"{where}: layer_types must give one of {kinds} for each of the {n} layers, "
                  f"got {layer_types}")
  return [t == "sliding_attention" for t in layer_types]


def _gemma_fields(hf: dict, model_type: str, max_seq_len: int | None, where: str) -> dict:
  """ModelConfig fields of a Gemma 2 / Gemma 3 text config (transformers' class defaults where
  config.json leaves a key out)."""
  gemma3 = model_type == "gemma3_text"
  if hf.get("use_bidirectional_attention"):
    raise HFError(f"{where}: use_bidirectional_attention=True (an encoder) is unsupported")
  act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
  if act not in GELU_TANH:
    raise HFError(f"{where}: hidden_activation {act!r} is unsupported; alignax's GeGLU is the tanh "
                  f"approximation ({', '.join(GELU_TANH)})")
  n = int(hf["num_hidden_layers"])
  layer_types = hf.get("layer_types")
  if layer_types is None:  # older configs: every `sliding_window_pattern`-th layer is global
    pattern = int(hf.get("sliding_window_pattern") or 6) if gemma3 else 2
    layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
  sliding = _sliding_layers(layer_types, n, where)
  window = hf.get("sliding_window", 4096)
  if any(sliding) and not window:
    raise HFError(f"{where}: sliding-window layers need a sliding_window (got {window!r})")
  # The window is kept even when it covers max_seq_len: the layer kinds also choose the RoPE.
  window = int(window) if any(sliding) else 0
  max_pos = int(hf.get("max_position_embeddings") or (131072 if gemma3 else 8192))
  seq = int(max_seq_len or max_pos)
  hf = {**hf, "max_position_embeddings": max_pos}
  if gemma3:
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers >= 5
      full = dict(params.get("full_attention") or {})
      local = dict(params.get("sliding_attention") or {})
    else:  # transformers 4: rope_theta and rope_scaling for the global layers
      full, local = {**(hf.get("rope_scaling") or {}), **params}, {}
    full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 1e4))
    if (local.get("rope_type") or local.get("type") or "default") != "default":
      raise HFError(f"{where}: RoPE scaling on the sliding-window layers is unsupported (alignax "
                    "scales the global layers' RoPE only)")
    rope = dict(rope_fields(hf, where, full), rope_local_theta=float(local["rope_theta"]))
  else:
    rope = rope_fields(hf, where)

  def cap(key, default):
    return float(hf.get(key, default) or 0.0)

  heads = int(hf["num_attention_heads"])
  return dict(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), n_layers=n, n_heads=heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or 256),
      d_ff=int(hf["intermediate_size"]), max_seq_len=seq, norm="rmsnorm",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_plus_one=True, post_norms=True,
      position="rope", **rope, mlp="geglu",
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=False,
      attention_bias=bool(hf.get("attention_bias", False)), qk_norm=gemma3,
      sliding_window=window, layer_pattern="".join("L" if s else "G" for s in sliding),
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256),
      # transformers' Gemma 3 attention never applies attn_logit_softcapping: neither does alignax.
      attn_softcap=0.0 if gemma3 else cap("attn_logit_softcapping", 50.0),
      final_softcap=cap("final_logit_softcapping", None if gemma3 else 30.0),
      scale_embeddings=True)


def _text_config(hf: dict, where: str) -> dict:
  """A multimodal config's `text_config`, with the top-level tie_word_embeddings (the one
  transformers ties the head by) when config.json gives one."""
  text = hf.get("text_config")
  if not isinstance(text, dict):
    raise HFError(f"{where}: {hf.get('architectures') or hf.get('model_type')} needs a text_config "
                  f"dict (got {text!r})")
  if text.get("model_type", "gemma3_text") != "gemma3_text":
    raise HFError(f"{where}: text_config model_type {text.get('model_type')!r} is unsupported "
                  "(alignax imports a Gemma 3 text model, gemma3_text)")
  text = dict(text)
  if "tie_word_embeddings" in hf:
    text["tie_word_embeddings"] = hf["tie_word_embeddings"]
  return text


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
    elif family == "gemma":
      if model_type == "gemma3":  # Gemma3ForConditionalGeneration: its text model
        hf = _text_config(hf, where)
        model_type = "gemma3_text"
      cfg = ModelConfig(**_gemma_fields(hf, model_type, max_seq_len, where), dtype=compute,
                        param_dtype=dtype)
    else:
      act = hf.get("hidden_act", "silu")
      if act not in ("silu", "swish"):
        raise HFError(f"{where}: hidden_act {act!r} is unsupported (alignax's SwiGLU uses silu)")
      seq = int(max_seq_len or hf["max_position_embeddings"])
      window, pattern = ((0, "") if model_type in ("llama", "olmo2")
                         else _sliding_window(hf, model_type, seq, where))
      heads = int(hf["num_attention_heads"])
      olmo2 = model_type == "olmo2"
      # transformers' class defaults where config.json leaves the key out.
      eps = hf.get("rms_norm_eps", 1e-5 if model_type in ("olmo2", "phi3") else 1e-6)
      cfg = ModelConfig(
          vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
          n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
          n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or 0),
          d_ff=int(hf["intermediate_size"]), max_seq_len=seq, norm="rmsnorm",
          norm_eps=float(eps), position="rope", **rope_fields(hf, where, model_type=model_type),
          mlp="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)), use_bias=False,
          qkv_bias=model_type == "qwen2", attention_bias=bool(hf.get("attention_bias", False)),
          mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=model_type in ("qwen3", "olmo2"),
          qk_norm_scope="all" if olmo2 else "head", pre_norms=not olmo2, post_norms=olmo2,
          sliding_window=window, layer_pattern=pattern, dtype=compute, param_dtype=dtype)
  except KeyError as e:
    raise HFError(f"{where}: {arch} config is missing {e.args[0]!r}") from None
  except ValueError as e:  # ModelConfig.validate
    raise HFError(f"{where}: {e}") from None
  return cfg, arch


def _number(x: float):
  """An integral float as an int (transformers' strict configs type some of these `int`)."""
  return int(x) if float(x).is_integer() else float(x)


def _gemma_to_hf(cfg: ModelConfig, architecture: str, model_type: str) -> dict:
  local = cfg.local_layers
  hf = dict(
      architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      hidden_activation="gelu_pytorch_tanh",
      query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar or cfg.dim_per_head),
      # Without local layers the window is unused, but transformers builds its mask regardless.
      sliding_window=cfg.sliding_window if any(local) else cfg.max_seq_len,
      layer_types=["sliding_attention" if s else "full_attention" for s in local],
      attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None,
      attention_bias=cfg.attention_bias, tie_word_embeddings=cfg.tie_embeddings,
      attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None,
      # Both spellings, as for Llama: rope_theta (and rope_scaling) for transformers 4.
      rope_theta=cfg.rope_theta)
  if cfg.rope_scaling != "none":
    hf.update(rope_scaling=rope_to_hf(cfg))
  if model_type == "gemma3_text":
    theta = cfg.rope_local_theta or cfg.rope_theta
    hf.update(rope_local_base_freq=theta, rope_parameters=dict(
        full_attention=rope_to_hf(cfg), sliding_attention=dict(rope_type="default", rope_theta=theta)))
    # transformers 4 before layer_types read every `sliding_window_pattern`-th layer as global.
    for pattern in range(1, cfg.n_layers + 2):
      if all(s == bool((i + 1) % pattern) for i, s in enumerate(local)):
        hf.update(sliding_window_pattern=pattern)
        break
  else:
    hf.update(rope_parameters=rope_to_hf(cfg))
  return hf


def config_to_hf(cfg: ModelConfig, architecture: str | None = None, tokenizer=None) -> dict:
  """A Hugging Face `config.json` dict for an alignax ModelConfig.

  Args:
    architecture: None picks GPT2LMHeadModel for GPT-2 style configs; for Llama style ones
      Olmo2ForCausalLM without pre-norms or with q/k norms over all heads, Phi3ForCausalLM with a
      partial rotary or LongRoPE, Qwen3ForCausalLM with q/k norms, Qwen2ForCausalLM with q/k/v
      biases or a window on some layers only, MistralForCausalLM with a sliding window, otherwise
      LlamaForCausalLM; for Gemma style ones (GeGLU, (1 + w) norms before and after each
      sublayer, scaled embeddings) Gemma3ForCausalLM with q/k norms, otherwise
      Gemma2ForCausalLM. Naming one checks it fits; Gemma3ForConditionalGeneration (an import of
      its text model) exports as Gemma3ForCausalLM.
    tokenizer: optional alignax tokenizer whose bos/eos/pad ids go into the config.
  """
  style = (cfg.norm, cfg.position, cfg.mlp, cfg.use_bias)
  gpt2_like = style == ("layernorm", "learned", "gelu", True)
  llama_like = style == ("rmsnorm", "rope", "swiglu", False)
  gemma_like = (style == ("rmsnorm", "rope", "geglu", False) and cfg.norm_plus_one and cfg.post_norms
                and cfg.scale_embeddings)
  if architecture is None:
    if gpt2_like:
      architecture = "GPT2LMHeadModel"
    elif llama_like:
      olmo2 = not cfg.pre_norms or (cfg.qk_norm and cfg.qk_norm_scope == "all")
      architecture = ("Olmo2ForCausalLM" if olmo2
                      else "Phi3ForCausalLM" if cfg.rotary_dim or cfg.rope_scaling == "longrope"
                      else "Qwen3ForCausalLM" if cfg.qk_norm
                      else "Qwen2ForCausalLM" if cfg.qkv_bias or partial_window(cfg)
                      else "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM")
    elif gemma_like:
      architecture = "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
  choices = (f"norm={cfg.norm}, position={cfg.position}, mlp={cfg.mlp}, use_bias={cfg.use_bias}")
  needs = ("GPT-2 needs layernorm/learned/gelu/use_bias, Llama/Mistral/Qwen rmsnorm/rope/swiglu "
           "without use_bias, Gemma rmsnorm/rope/geglu without use_bias, with norm_plus_one, "
           "post_norms and scale_embeddings")
  if architecture is None:
    raise HFError(f"cannot export {choices}: no Hugging Face architecture matches ({needs})")
  if architecture not in ARCHITECTURES:
    raise HFError(f"cannot export as {architecture!r}; supported: {_supported()}")
  architecture = EXPORTED_AS.get(architecture, architecture)
  family, model_type = ARCHITECTURES[architecture]
  fits = {"gpt2": gpt2_like, "llama": llama_like, "phi3": llama_like, "gemma": gemma_like}[family]
  if not fits:
    raise HFError(f"cannot export {choices} as {architecture} ({needs})")
  if family == "gpt2":
    check_gemma_only(cfg, architecture)
    check_olmo_phi(cfg, architecture)
    if any(cfg.local_layers):
      raise HFError(f"{architecture} has no sliding_window ({cfg.sliding_window}); export as "
                    "MistralForCausalLM")
  elif family in ("llama", "phi3"):
    check_llama_family(cfg, architecture, model_type)
  else:
    check_gemma_family(cfg, architecture, model_type)
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
  elif family == "gemma":
    hf = _gemma_to_hf(cfg, architecture, model_type)
  else:
    hf = dict(
        architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        # Both spellings: `rope_theta` (and `rope_scaling`) for transformers 4, `rope_parameters`
        # for 5.
        rope_theta=cfg.rope_theta, rope_parameters=rope_to_hf(cfg),
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.rope_scaling != "none":
      hf.update(rope_scaling=hf["rope_parameters"])
    if cfg.rope_scaling == "dynamic":
      # transformers grows the dynamic base past max_position_embeddings, so it must be the length
      # the frequencies were trained for, not alignax's own cap (max_seq_len).
      hf.update(max_position_embeddings=cfg.rope_original_max_len)
    if model_type == "llama":
      hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if model_type in ("qwen3", "olmo2"):
      hf.update(attention_bias=cfg.attention_bias)
    local = cfg.local_layers
    window = cfg.sliding_window if any(local) else None
    if model_type in ("mistral", "phi3"):
      hf.update(sliding_window=window)
    if model_type == "phi3":
      # Top-level: Phi3Config reads original_max_position_embeddings there (over rope_parameters'),
      # and transformers 4 partial_rotary_factor; no dropout (alignax trains without).
      hf.update(original_max_position_embeddings=cfg.rope_original_max_len or cfg.max_seq_len,
                resid_pdrop=0.0, embd_pdrop=0.0)
      if cfg.rotary_dim:
        factor = cfg.rotary_dim / cfg.dim_per_head
        if int(cfg.dim_per_head * factor) != cfg.rotary_dim:
          raise HFError(f"Phi3ForCausalLM: rotary_dim={cfg.rotary_dim} has no partial_rotary_factor "
                        f"that transformers reads back exactly (head_dim={cfg.dim_per_head})")
        hf.update(partial_rotary_factor=factor)
    if model_type in ("qwen2", "qwen3"):
      # max_window_layers for transformers 4 (layers from it on slide): exact when the window is
      # on the top layers, as Qwen2 puts it; layer_types (transformers 5) says it for any pattern.
      first = next((i for i, s in enumerate(local) if s), 0)
      hf.update(sliding_window=window, use_sliding_window=window is not None, max_window_layers=first,
                layer_types=["sliding_attention" if s else "full_attention" for s in local])
  hf.update(ids)
  # "torch_dtype" for transformers 4, "dtype" for 5.
  hf.update(torch_dtype=cfg.param_dtype, dtype=cfg.param_dtype)
  return hf
