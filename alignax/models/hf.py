"""Bring your own model: import and export Hugging Face checkpoints (safetensors only).

  cfg, params, info = import_hf("path/to/hf_dir")     # config.json + *.safetensors
  lm, _ = abstract_lm(cfg)
  logits, _ = lm.apply(params, tokens, positions, segment_ids)
  export_hf(params, cfg, "path/to/out")                # AutoModelForCausalLM.from_pretrained loads it

  alignax import-hf --src=HF_DIR --dst=WORKDIR [--dtype=bfloat16]   # an export any stage starts from

Supported architectures (`config.json` `architectures`, or `model_type` when that is absent):
  GPT2LMHeadModel (gpt2)       layernorm, learned positions, GELU (tanh), biases, tied or untied head
  LlamaForCausalLM (llama)     rmsnorm, RoPE, SwiGLU, grouped-query attention
  MistralForCausalLM (mistral) as Llama; sliding-window attention only where the window covers
                               every position used (sliding_window >= max_seq_len)
  Qwen2ForCausalLM (qwen2)     as Llama, with q/k/v biases

Weights are read with `safetensors` (numpy), never with pickle: a directory holding only
`pytorch_model.bin` is refused. Sharded checkpoints (`model.safetensors.index.json`) and bf16
tensors (as `ml_dtypes.bfloat16`) are read directly.

Name mapping (i = layer; alignax block params are stacked on a leading layer axis; d = d_model,
H/K = query/kv heads, Dh = head dim, F = d_ff, V = vocab, P = positions). Torch `nn.Linear`
stores [out, in], alignax [in, out], hence the transposes; GPT-2's `Conv1D` is already [in, out].

  Llama / Mistral / Qwen2                         alignax                transform
  model.embed_tokens.weight [V, d]                embed [V, d]           -
  model.layers.i.input_layernorm.weight [d]       blocks.attn_norm.scale -
  model.layers.i.self_attn.q_proj.weight [H*Dh, d] blocks.attn.wq [d, H, Dh]  .T, reshape
  model.layers.i.self_attn.k_proj.weight [K*Dh, d] blocks.attn.wk [d, K, Dh]  .T, reshape
  model.layers.i.self_attn.v_proj.weight [K*Dh, d] blocks.attn.wv [d, K, Dh]  .T, reshape
  model.layers.i.self_attn.{q,k,v}_proj.bias      blocks.attn.b{q,k,v} [H|K, Dh]  reshape (Qwen2)
  model.layers.i.self_attn.o_proj.weight [d, H*Dh] blocks.attn.wo [H, Dh, d]  .T, reshape
  model.layers.i.post_attention_layernorm.weight  blocks.mlp_norm.scale  -
  model.layers.i.mlp.gate_proj.weight [F, d]      blocks.mlp.w_gate [d, F]  .T
  model.layers.i.mlp.up_proj.weight [F, d]        blocks.mlp.w_in [d, F]    .T
  model.layers.i.mlp.down_proj.weight [d, F]      blocks.mlp.w_out [F, d]   .T
  model.norm.weight [d]                           final_norm.scale       -
  lm_head.weight [V, d] (untied only)             lm_head [d, V]         .T

  GPT-2 ("transformer." prefix optional)          alignax                transform
  transformer.wte.weight [V, d]                   embed                  -
  transformer.wpe.weight [P, d]                   pos_embed [P, d]       - (first max_seq_len rows)
  transformer.h.i.ln_1.{weight,bias}              blocks.attn_norm.{scale,bias}  -
  transformer.h.i.attn.c_attn.weight [d, 3d]      blocks.attn.w{q,k,v} [d, H, Dh]  split thirds, reshape
  transformer.h.i.attn.c_attn.bias [3d]           blocks.attn.b{q,k,v} [H, Dh]     split thirds, reshape
  transformer.h.i.attn.c_proj.weight [d, d]       blocks.attn.wo [H, Dh, d]        reshape
  transformer.h.i.attn.c_proj.bias [d]            blocks.attn.bo         -
  transformer.h.i.ln_2.{weight,bias}              blocks.mlp_norm.{scale,bias}   -
  transformer.h.i.mlp.c_fc.{weight [d, F], bias}  blocks.mlp.{w_in, b_in}        -
  transformer.h.i.mlp.c_proj.{weight [F, d], bias} blocks.mlp.{w_out, b_out}     -
  transformer.ln_f.{weight,bias}                  final_norm.{scale,bias} -
  lm_head.weight [V, d] (untied only)             lm_head [d, V]         .T

RoPE needs no permutation: alignax rotates the two halves of each head (HF's `rotate_half`) with
the same inverse frequencies, so q/k weights map as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from alignax.checkpoint import CheckpointError
from alignax.models.config import DTYPES, ModelConfig
from alignax.models.lm import abstract_lm, count_params

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


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


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


# ---------------------------------------------------------------------------------------------
# The mapping: one rule per HF tensor.


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor <-> one or more alignax params.

  Attributes:
    hf: tensor name; "{i}" marks a per-layer tensor (alignax stacks those on axis 0).
    paths: alignax param paths ("blocks/attn/wq") it maps to.
    hf_shape: the shape config.json implies.
    to_alignax: HF array -> tuple of alignax arrays (one layer's, for per-layer rules).
    to_hf: alignax arrays (one layer's) -> HF array.
  """
  hf: str
  paths: tuple[str, ...]
  hf_shape: tuple[int, ...]
  to_alignax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]


def _same(path: str, hf: str, shape) -> Rule:
  return Rule(hf, (path,), tuple(shape), lambda x: (x,), lambda x: x)


def _linear(path: str, hf: str, n_in: int, out_shape: tuple[int, ...]) -> Rule:
  """torch nn.Linear weight [out, in] <-> alignax [in, *out_shape]."""
  n_out = int(np.prod(out_shape))
  return Rule(hf, (path,), (n_out, n_in), lambda x: (x.T.reshape(n_in, *out_shape),),
              lambda w: w.reshape(n_in, n_out).T)


def _linear_out(path: str, hf: str, in_shape: tuple[int, ...], n_out: int) -> Rule:
  """torch nn.Linear weight [out, in] <-> alignax [*in_shape, out] (the attention output)."""
  n_in = int(np.prod(in_shape))
  return Rule(hf, (path,), (n_out, n_in), lambda x: (x.T.reshape(*in_shape, n_out),),
              lambda w: w.reshape(n_in, n_out).T)


def _reshaped(path: str, hf: str, hf_shape, shape) -> Rule:
  return Rule(hf, (path,), tuple(hf_shape), lambda x: (x.reshape(shape),),
              lambda w: w.reshape(hf_shape))


def _split3(paths: tuple[str, str, str], hf: str, hf_shape, shape) -> Rule:
  """GPT-2's fused q/k/v (last axis = [q | k | v]) <-> three alignax params."""
  def to_alignax(x):
    return tuple(p.reshape(shape) for p in np.split(x, 3, axis=-1))
  def to_hf(*ws):
    return np.concatenate([w.reshape(*hf_shape[:-1], -1) for w in ws], axis=-1)
  return Rule(hf, paths, tuple(hf_shape), to_alignax, to_hf)


def rules_for(cfg: ModelConfig, family: str, hf_positions: int | None = None) -> list[Rule]:
  """The tensor rules of an HF checkpoint of `family` ("gpt2" or "llama") for `cfg`.

  Args:
    hf_positions: GPT-2's n_positions when it differs from cfg.max_seq_len (import keeps the
      first max_seq_len rows of the table).
  """
  d, h, k, dh, f, v = (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_ff,
                       cfg.vocab_size)
  rules: list[Rule] = []
  if family == "gpt2":
    p, t = hf_positions or cfg.max_seq_len, "transformer."
    seq = cfg.max_seq_len
    rules += [
        _same("embed", t + "wte.weight", (v, d)),
        Rule(t + "wpe.weight", ("pos_embed",), (p, d), lambda x: (x[:seq],), lambda w: w),
    ]
    for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
      rules += [_same(f"blocks/{norm}/scale", f"{t}h.{{i}}.{hf_norm}.weight", (d,)),
                _same(f"blocks/{norm}/bias", f"{t}h.{{i}}.{hf_norm}.bias", (d,))]
    a = "blocks/attn/"
    rules += [
        _split3((a + "wq", a + "wk", a + "wv"), t + "h.{i}.attn.c_attn.weight", (d, 3 * d), (d, h, dh)),
        _split3((a + "bq", a + "bk", a + "bv"), t + "h.{i}.attn.c_attn.bias", (3 * d,), (h, dh)),
        _reshaped(a + "wo", t + "h.{i}.attn.c_proj.weight", (d, d), (h, dh, d)),
        _same(a + "bo", t + "h.{i}.attn.c_proj.bias", (d,)),
        _same("blocks/mlp/w_in", t + "h.{i}.mlp.c_fc.weight", (d, f)),
        _same("blocks/mlp/b_in", t + "h.{i}.mlp.c_fc.bias", (f,)),
        _same("blocks/mlp/w_out", t + "h.{i}.mlp.c_proj.weight", (f, d)),
        _same("blocks/mlp/b_out", t + "h.{i}.mlp.c_proj.bias", (d,)),
        _same("final_norm/scale", t + "ln_f.weight", (d,)),
        _same("final_norm/bias", t + "ln_f.bias", (d,)),
    ]
  else:
    m, a = "model.layers.{i}.", "blocks/attn/"
    rules += [
        _same("embed", "model.embed_tokens.weight", (v, d)),
        _same("blocks/attn_norm/scale", m + "input_layernorm.weight", (d,)),
        _linear(a + "wq", m + "self_attn.q_proj.weight", d, (h, dh)),
        _linear(a + "wk", m + "self_attn.k_proj.weight", d, (k, dh)),
        _linear(a + "wv", m + "self_attn.v_proj.weight", d, (k, dh)),
        _linear_out(a + "wo", m + "self_attn.o_proj.weight", (h, dh), d),
        _same("blocks/mlp_norm/scale", m + "post_attention_layernorm.weight", (d,)),
        _linear("blocks/mlp/w_gate", m + "mlp.gate_proj.weight", d, (f,)),
        _linear("blocks/mlp/w_in", m + "mlp.up_proj.weight", d, (f,)),
        _linear("blocks/mlp/w_out", m + "mlp.down_proj.weight", f, (d,)),
        _same("final_norm/scale", "model.norm.weight", (d,)),
    ]
    if cfg.qkv_bias:
      rules += [_reshaped(a + "bq", m + "self_attn.q_proj.bias", (h * dh,), (h, dh)),
                _reshaped(a + "bk", m + "self_attn.k_proj.bias", (k * dh,), (k, dh)),
                _reshaped(a + "bv", m + "self_attn.v_proj.bias", (k * dh,), (k, dh))]
  if not cfg.tie_embeddings:
    rules.append(_linear("lm_head", "lm_head.weight", d, (v,)))
  return rules


# ---------------------------------------------------------------------------------------------
# Reading safetensors


def weight_files(src_dir: str) -> list[str]:
  """The safetensors files of a checkpoint directory; HFError for pickle-only or empty ones."""
  index = os.path.join(src_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map") or {}
    files = sorted({os.path.join(src_dir, name) for name in weight_map.values()})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise HFError(f"{index} names {os.path.basename(missing[0])}, which is missing")
    return files
  single = os.path.join(src_dir, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  files = sorted(glob.glob(os.path.join(src_dir, "*.safetensors")))
  if files:
    return files
  pickled = sorted(os.path.basename(p) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                   for p in glob.glob(os.path.join(src_dir, pattern)))
  if pickled:
    raise HFError(f"{src_dir} has only pickle weights ({', '.join(pickled)}): safetensors are "
                  f"required (alignax never unpickles files, which can run arbitrary code). Convert "
                  f"with transformers: AutoModelForCausalLM.from_pretrained(dir)"
                  f".save_pretrained(out, safe_serialization=True)")
  raise HFError(f"{src_dir} has no *.safetensors weights")


def _safetensors():
  try:
    import safetensors
    import safetensors.numpy  # noqa: F401  (export's save_file)
  except ImportError:
    raise HFError("Hugging Face checkpoints need the `safetensors` package "
                  "(pip install safetensors)") from None
  return safetensors


class SafetensorsReader:
  """Name -> array over one or more safetensors files, read lazily with `safetensors` (numpy)."""

  def __init__(self, files: Sequence[str]):
    self._open = _safetensors().safe_open
    self.files = list(files)
    self._stack = contextlib.ExitStack()
    self._handles = []
    self._where: dict[str, int] = {}
    for n, file in enumerate(self.files):
      try:
        handle = self._stack.enter_context(self._open(file, framework="numpy"))
      except Exception as e:  # safetensors raises its own error types for damaged headers
        self.close()
        raise HFError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
      self._handles.append(handle)
      for name in handle.keys():
        self._where[name] = n

  def close(self) -> None:
    self._stack.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False

  def names(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._handles[self._where[name]].get_slice(name).get_dtype()  # "F32", "BF16", ...

  def get(self, name: str) -> np.ndarray:
    n = self._where[name]
    try:
      return self._handles[n].get_tensor(name)
    except (TypeError, ValueError):
      # Older safetensors cannot build bf16 numpy arrays; read through jax instead.
      with self._open(self.files[n], framework="flax") as f:
        return np.asarray(f.get_tensor(name))


# ---------------------------------------------------------------------------------------------
# Import


def _flatten(pure: dict) -> dict[str, Any]:
  """{"blocks/attn/wq": leaf, ...} from a nested params dict."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _flat_abstract(cfg: ModelConfig) -> tuple[nnx.State, dict[str, jax.ShapeDtypeStruct]]:
  _, abstract = abstract_lm(cfg)
  return abstract, _flatten(nnx.to_pure_dict(abstract))


def _unflatten(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for path, x in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


def params_from_flat(cfg: ModelConfig, flat: dict[str, np.ndarray]) -> nnx.State:
  """The params `nnx.State` of `abstract_lm(cfg)` filled from {"blocks/attn/wq": array, ...}."""
  abstract, expected = _flat_abstract(cfg)
  if set(flat) != set(expected):
    raise HFError(f"params do not match the model: missing {sorted(set(expected) - set(flat))}, "
                  f"unexpected {sorted(set(flat) - set(expected))}")
  for path, x in flat.items():
    if tuple(x.shape) != tuple(expected[path].shape):
      raise HFError(f"param {path}: shape {tuple(x.shape)}, the model expects {tuple(expected[path].shape)}")
  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, _unflatten(
      {p: jnp.asarray(x, dtype=expected[p].dtype) for p, x in flat.items()}))
  return state


def _stored_name(reader: SafetensorsReader, family: str) -> Callable[[str], str]:
  """Expected name -> stored name: the original GPT-2 checkpoints omit the "transformer." prefix."""
  prefix = "transformer."
  if family == "gpt2" and prefix + "wte.weight" not in reader and "wte.weight" in reader:
    return lambda name: name[len(prefix):] if name.startswith(prefix) else name
  return lambda name: name


def _layer_names(rule: Rule, n_layers: int) -> list[str]:
  return [rule.hf.format(i=i) for i in range(n_layers)] if "{i}" in rule.hf else [rule.hf]


def _check_tensors(reader, rules, stored, cfg, arch, src_dir) -> tuple[list[str], list[str]]:
  """(stored names used, stored names skipped); HFError for a missing, misshapen or unexpected
  tensor. Runs on headers only, before any tensor is read (large checkpoints read slowly)."""
  wanted = []
  for rule in rules:
    for name in _layer_names(rule, cfg.n_layers):
      if stored(name) not in reader:
        raise HFError(f"{src_dir}: tensor {name!r} is missing (expected shape {rule.hf_shape} for "
                      f"{arch} with this config.json)")
      shape = reader.shape(stored(name))
      if shape != rule.hf_shape:
        raise HFError(f"{src_dir}: tensor {name!r} has shape {shape}, but config.json implies "
                      f"{rule.hf_shape}")
      wanted.append(stored(name))
  leftover = sorted(set(reader.names()) - set(wanted))
  # A tied checkpoint may still store lm_head.weight; HF ignores it (ties to the embedding) too.
  ignored = [n for n in leftover
             if n.endswith(IGNORED_SUFFIXES) or (cfg.tie_embeddings and n == "lm_head.weight")]
  unexpected = [n for n in leftover if n not in ignored]
  if unexpected:
    raise HFError(f"{src_dir}: tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} have "
                  f"no place in alignax's {arch} mapping (a variant alignax does not implement)")
  return wanted, ignored


def _read_tensors(reader, rules, stored, n_layers: int, target) -> dict[str, np.ndarray]:
  """{alignax path: array in `target` dtype}, per-layer tensors stacked on a leading axis."""
  flat: dict[str, np.ndarray] = {}
  for rule in rules:
    per_path = [[] for _ in rule.paths]
    for name in _layer_names(rule, n_layers):
      for acc, x in zip(per_path, rule.to_alignax(reader.get(stored(name)))):
        acc.append(np.ascontiguousarray(x.astype(target)))  # cast per tensor: one copy at a time
    for path, acc in zip(rule.paths, per_path):
      flat[path] = np.stack(acc) if "{i}" in rule.hf else acc[0]
  return flat


def import_hf(src_dir: str, dtype: str = "float32", *, pad_vocab_to: int | None = None,
              mean_init_ids: Sequence[int] = (), max_seq_len: int | None = None):
  """Reads a local Hugging Face checkpoint into alignax params.

  Args:
    src_dir: directory with `config.json` and `model.safetensors` (or shards listed by
      `model.safetensors.index.json`).
    dtype: alignax parameter dtype ("float32", "bfloat16", "float16"), or "auto" for the
      checkpoint's own (`torch_dtype` / `dtype` in config.json).
    pad_vocab_to: grow the vocabulary to at least this many rows (e.g. a tokenizer that added
      chat markers); new embedding rows (and untied lm_head columns) are the mean embedding
      (column), a neutral start that keeps the new tokens' logits at the average.
    mean_init_ids: existing rows to reset to the mean the same way (markers a tokenizer added
      inside a vocabulary the checkpoint already padded, as Qwen2's is).
    max_seq_len: alignax max_seq_len (default: the checkpoint's max positions).

  Returns:
    (cfg, params, info): the ModelConfig; an `nnx.State` shaped like `abstract_lm(cfg)`; a dict
    with architecture, model_type, num_params, dtype, source_dtypes, files, hf_vocab_size,
    ignored_tensors and hf_config.
  """
  src_dir = os.path.abspath(src_dir)
  hf = _read_json(os.path.join(src_dir, "config.json"))
  if dtype == "auto":
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
  if dtype not in DTYPES:
    raise HFError(f"dtype must be one of {DTYPES} or 'auto', got {dtype!r}")
  where = os.path.join(src_dir, "config.json")
  cfg, arch = config_from_hf(hf, dtype, max_seq_len=max_seq_len, where=where)
  family, model_type = ARCHITECTURES[arch]
  files = weight_files(src_dir)
  hf_positions = int(hf["n_positions"]) if family == "gpt2" else None
  rules = rules_for(cfg, family, hf_positions)
  with SafetensorsReader(files) as reader:
    stored = _stored_name(reader, family)
    wanted, ignored = _check_tensors(reader, rules, stored, cfg, arch, src_dir)
    source_dtypes = sorted({reader.dtype(n) for n in wanted})
    flat = _read_tensors(reader, rules, stored, cfg.n_layers, jnp.dtype(dtype))

  hf_vocab = cfg.vocab_size
  new_vocab = max(hf_vocab, int(pad_vocab_to or 0))
  if new_vocab > hf_vocab or len(mean_init_ids):
    cfg = dataclasses.replace(cfg, vocab_size=new_vocab)
    flat = _grow_vocab(flat, hf_vocab, new_vocab, mean_init_ids)

  params = params_from_flat(cfg, flat)
  info = dict(architecture=arch, model_type=model_type, num_params=count_params(params), dtype=dtype,
              source_dtypes=source_dtypes, files=files, hf_vocab_size=hf_vocab,
              vocab_size=cfg.vocab_size, ignored_tensors=ignored, hf_config=hf)
  return cfg, params, info


def _grow_vocab(flat: dict[str, np.ndarray], old: int, new: int, mean_ids: Sequence[int]) -> dict:
  """Embedding rows (and untied lm_head columns) old..new-1 and `mean_ids` set to the mean."""
  out = dict(flat)
  ids = sorted({int(i) for i in mean_ids if 0 <= int(i) < old})
  for path, axis in (("embed", 0), ("lm_head", 1)):
    if path not in flat:
      continue
    w = flat[path]
    mean = w.astype(np.float32).mean(axis=axis, keepdims=True).astype(w.dtype)
    extra = np.repeat(mean, new - old, axis=axis)
    w = np.concatenate([w, extra], axis=axis)
    if ids:
      index = (ids, slice(None)) if axis == 0 else (slice(None), ids)
      w[index] = mean
    out[path] = w
  return out


# ---------------------------------------------------------------------------------------------
# Export


def export_hf(params, cfg: ModelConfig, dst_dir: str, architecture: str | None = None,
              tokenizer=None) -> str:
  """Writes `config.json` + `model.safetensors` that `AutoModelForCausalLM.from_pretrained` loads.

  Args:
    params: the model's params (`nnx.State` or its pure dict), fully addressable on this host.
    cfg: their ModelConfig.
    dst_dir: directory to write (created).
    architecture: see `config_to_hf` (default: from the config's style).
    tokenizer: optional alignax tokenizer: its bos/eos/pad ids go into config.json, and an
      `HFTokenizer` is saved beside the weights (tokenizer.json with the added role markers).

  Returns:
    dst_dir.
  """
  save_file = _safetensors().numpy.save_file
  hf = config_to_hf(cfg, architecture, tokenizer)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise HFError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the model's "
                  f"vocab_size ({cfg.vocab_size})")
  family, _ = ARCHITECTURES[hf["architectures"][0]]
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  _, expected = _flat_abstract(cfg)
  flat = _flatten(pure)
  for path, spec in expected.items():
    if path not in flat:
      raise HFError(f"params have no {path} (expected shape {tuple(spec.shape)} for this config)")
    if tuple(flat[path].shape) != tuple(spec.shape):
      raise HFError(f"param {path}: shape {tuple(flat[path].shape)}, the config implies {tuple(spec.shape)}")
  tensors: dict[str, np.ndarray] = {}
  for rule in rules_for(cfg, family):
    arrays = [np.asarray(jax.device_get(flat[p])) for p in rule.paths]
    if "{i}" in rule.hf:
      for i in range(cfg.n_layers):
        tensors[rule.hf.format(i=i)] = np.ascontiguousarray(rule.to_hf(*(a[i] for a in arrays)))
    else:
      tensors[rule.hf] = np.ascontiguousarray(rule.to_hf(*arrays))
  dt = np.asarray(flat["embed"]).dtype
  if hf["model_type"] == "qwen2" and not cfg.qkv_bias:
    # Qwen2 always has q/k/v biases: zeros give the same function.
    for name, n in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
      for i in range(cfg.n_layers):
        tensors[f"model.layers.{i}.self_attn.{name}_proj.bias"] = np.zeros(n * cfg.dim_per_head, dt)
  # The dtype the weights are stored in (params may have been cast since cfg was written).
  hf.update(torch_dtype=str(dt), dtype=str(dt))
  os.makedirs(dst_dir, exist_ok=True)
  save_file(tensors, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(dst_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None and hasattr(tokenizer, "save"):
    tokenizer.save(dst_dir)
  return dst_dir


# ---------------------------------------------------------------------------------------------
# CLI: alignax import-hf --src=HF_DIR --dst=WORKDIR [--dtype=...]


def _tokenizer_for(src: str):
  """(kind, tokenizer or None, warning or None) for the tokenizer files in `src`."""
  if os.path.isfile(os.path.join(src, "tokenizer.json")):
    from alignax.data.hf_tokenizer import HFTokenizer
    return "tokenizer.json", HFTokenizer(src), None
  if os.path.isfile(os.path.join(src, "tokenizer.model")):
    from alignax.data.schemas import DataError
    from alignax.data.sentencepiece_tokenizer import SentencePieceTokenizer
    try:
      return "tokenizer.model", SentencePieceTokenizer(os.path.join(src, "tokenizer.model")), None
    except DataError as e:
      return "tokenizer.model", None, (
          f"alignax's SentencePiece tokenizer cannot use this tokenizer.model ({e}); stages will "
          f"reject it: provide the model's tokenizer.json instead")
  return "bytes", None, (f"{src} has no tokenizer.json or tokenizer.model: using the byte tokenizer, "
                         f"which the pretrained embeddings were not trained with")


def import_hf_main(flags) -> None:
  """`alignax import-hf`: import `flags.src` and write an alignax export to `flags.dst`.

  The tokenizer spec of the export is `DST/tokenizer.json` (copied, with tokenizer_config.json
  and special_tokens_map.json), else `DST/tokenizer.model`, else "bytes" (with a warning). The
  vocabulary grows to the tokenizer's when it added chat role markers.
  """
  from alignax.checkpoint import save_export
  from alignax.data.tokenizer import ByteTokenizer

  src, dst = os.path.abspath(flags.src), os.path.abspath(flags.dst)
  dtype = flags.dtype or "float32"
  max_seq_len = getattr(flags, "max_seq_len", None) or None  # only if the CLI defines it
  if not os.path.isdir(src):
    raise HFError(f"--src={flags.src}: not a directory")
  kind, tok, warning = _tokenizer_for(src)
  if kind == "bytes":
    tok = ByteTokenizer()
  added = [tok.role_ids[name[2:-2]] for name in getattr(tok, "added_tokens", [])]
  cfg, params, info = import_hf(src, dtype, pad_vocab_to=tok.vocab_size if tok else None,
                                mean_init_ids=added, max_seq_len=max_seq_len)

  os.makedirs(dst, exist_ok=True)
  if kind == "bytes":
    spec = "bytes"
  else:
    spec = os.path.join(dst, kind)
    extras = ("tokenizer_config.json", "special_tokens_map.json") if kind == "tokenizer.json" else ()
    for name in (kind,) + extras:
      if os.path.isfile(os.path.join(src, name)):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
  if warning:
    logging.warning("%s", warning)
  path = save_export(dst, params, model=cfg, stage="import", tokenizer=spec,
                     extra={"hf": {k: info[k] for k in ("architecture", "model_type", "hf_vocab_size")},
                            "source": src})

  heads = f"{cfg.n_heads} heads" + (f" / {cfg.kv_heads} kv" if cfg.kv_heads != cfg.n_heads else "")
  vocab = (f"{cfg.vocab_size} (grown from {info['hf_vocab_size']})"
           if cfg.vocab_size != info["hf_vocab_size"] else str(cfg.vocab_size))
  print(f"imported {info['architecture']} from {src}")
  print(f"  model: d_model={cfg.d_model}, n_layers={cfg.n_layers}, {heads}, head_dim={cfg.dim_per_head}, "
        f"d_ff={cfg.d_ff}, vocab_size={vocab}, max_seq_len={cfg.max_seq_len}")
  print(f"  params: {info['num_params']:,} in {info['dtype']} "
        f"(checkpoint: {', '.join(info['source_dtypes'])})")
  line = f"  tokenizer: {spec}"
  if tok is not None and kind != "bytes":
    line += f" (vocab {tok.vocab_size}"
    if getattr(tok, "added_tokens", None):
      line += f"; added {', '.join(tok.added_tokens)} at ids {', '.join(map(str, added))}"
    line += ")"
  print(line)
  if warning:
    print(f"  warning: {warning}")
  print(f"  export: {path}")
  print(f"  next: start a stage with --config.init.workdir={dst} --config.tokenizer={spec}")
