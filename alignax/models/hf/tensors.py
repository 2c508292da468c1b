"""The tensor mapping between Hugging Face checkpoints and alignax params: one rule per HF tensor.

Name mapping (i = layer; alignax block params are stacked on a leading layer axis; d = d_model,
H/K = query/kv heads, Dh = head dim, F = d_ff, V = vocab, P = positions). Torch `nn.Linear`
stores [out, in], alignax [in, out], hence the transposes; GPT-2's `Conv1D` is already [in, out].

  Llama / Mistral / Qwen2                         alignax                transform
  model.embed_tokens.weight [V, d]                embed [V, d]           -
  model.layers.i.input_layernorm.weight [d]       blocks.attn_norm.scale -
  model.layers.i.self_attn.q_proj.weight [H*Dh, d] blocks.attn.wq [d, H, Dh]  .T, reshape
  model.layers.i.self_attn.k_proj.weight [K*Dh, d] blocks.attn.wk [d, K, Dh]  .T, reshape
  model.layers.i.self_attn.v_proj.weight [K*Dh, d] blocks.attn.wv [d, K, Dh]  .T, reshape
  model.layers.i.self_attn.{q,k,v}_proj.bias      blocks.attn.b{q,k,v} [H|K, Dh]  reshape (Qwen2,
                                                  attention_bias)
  model.layers.i.self_attn.o_proj.weight [d, H*Dh] blocks.attn.wo [H, Dh, d]  .T, reshape
  model.layers.i.self_attn.o_proj.bias [d]        blocks.attn.bo         - (attention_bias)
  model.layers.i.self_attn.{q,k}_norm.weight [Dh] blocks.attn.{q,k}_norm - (Qwen3)
  model.layers.i.post_attention_layernorm.weight  blocks.mlp_norm.scale  -
  model.layers.i.mlp.gate_proj.weight [F, d]      blocks.mlp.w_gate [d, F]  .T
  model.layers.i.mlp.up_proj.weight [F, d]        blocks.mlp.w_in [d, F]    .T
  model.layers.i.mlp.down_proj.weight [d, F]      blocks.mlp.w_out [F, d]   .T
  model.layers.i.mlp.{gate,up,down}_proj.bias     blocks.mlp.b_{gate,in,out}  - (mlp_bias)
  model.norm.weight [d]                           final_norm.scale       -
  lm_head.weight [V, d] (untied only)             lm_head [d, V]         .T

  Gemma 2 / 3: as Llama (q/k norms as Qwen3's, Gemma 3), but four norms per layer; every norm
  weight is stored zero-centred on both sides (the scale is 1 + w: `norm_plus_one`), so it maps
  as it is and round-trips exactly:
  model.layers.i.input_layernorm.weight           blocks.attn_norm.scale      -
  model.layers.i.post_attention_layernorm.weight  blocks.attn_out_norm.scale  -
  model.layers.i.pre_feedforward_layernorm.weight blocks.mlp_norm.scale       -
  model.layers.i.post_feedforward_layernorm.weight blocks.mlp_out_norm.scale  -

  OLMo 2: as Llama, with q/k/v/o biases under attention_bias, no input_layernorm, and:
  model.layers.i.post_attention_layernorm.weight  blocks.attn_out_norm.scale  - (attention output)
  model.layers.i.post_feedforward_layernorm.weight blocks.mlp_out_norm.scale  - (MLP output)
  model.layers.i.self_attn.q_norm.weight [H*Dh]   blocks.attn.q_norm [H, Dh]  reshape
  model.layers.i.self_attn.k_norm.weight [K*Dh]   blocks.attn.k_norm [K, Dh]  reshape

  Phi-3: as Llama, with two fused projections (rows: [q | k | v] and [gate | up]):
  model.layers.i.self_attn.qkv_proj.weight [(H+2K)*Dh, d]  blocks.attn.w{q,k,v}  split rows, .T, reshape
  model.layers.i.mlp.gate_up_proj.weight [2F, d]  blocks.mlp.{w_gate, w_in}  split rows in half, .T

  Gemma3ForConditionalGeneration: the Gemma 3 names under "language_model." (transformers'
  save: language_model.model.layers..., language_model.lm_head.weight) or with "model." become
  "model.language_model." (model.language_model.layers..., lm_head.weight); see importer.

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

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models.config import ModelConfig
from alignax.models.hf.config_map import HFError
from alignax.models.lm import abstract_lm


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


def _split_rows(paths: tuple[str, ...], hf: str, n_in: int, outs: tuple[tuple[int, ...], ...]) -> Rule:
  """A fused torch nn.Linear weight [sum(out), in] (rows: one block per param) <-> alignax params
  [in, *out] each (Phi-3's qkv_proj and gate_up_proj)."""
  sizes = [int(np.prod(o)) for o in outs]
  cuts = np.cumsum(sizes)[:-1]
  def to_alignax(x):
    return tuple(p.T.reshape(n_in, *o) for p, o in zip(np.split(x, cuts, axis=0), outs))
  def to_hf(*ws):
    return np.concatenate([w.reshape(n_in, n).T for w, n in zip(ws, sizes)], axis=0)
  return Rule(hf, paths, (sum(sizes), n_in), to_alignax, to_hf)


def rules_for(cfg: ModelConfig, family: str, hf_positions: int | None = None) -> list[Rule]:
  """The tensor rules of an HF checkpoint of `family` ("gpt2", "llama", "phi3" or "gemma") for
  `cfg`.

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
    if cfg.post_norms and not cfg.pre_norms:  # OLMo 2
      norms = (("attn_out_norm", "post_attention_layernorm"),
               ("mlp_out_norm", "post_feedforward_layernorm"))
    elif cfg.post_norms:
      norms = (("attn_norm", "input_layernorm"), ("attn_out_norm", "post_attention_layernorm"),
               ("mlp_norm", "pre_feedforward_layernorm"), ("mlp_out_norm", "post_feedforward_layernorm"))
    else:
      norms = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
    rules.append(_same("embed", "model.embed_tokens.weight", (v, d)))
    rules += [_same(f"blocks/{norm}/scale", f"{m}{hf_norm}.weight", (d,)) for norm, hf_norm in norms]
    if family == "phi3":
      rules += [
          _split_rows((a + "wq", a + "wk", a + "wv"), m + "self_attn.qkv_proj.weight", d,
                      ((h, dh), (k, dh), (k, dh))),
          _split_rows(("blocks/mlp/w_gate", "blocks/mlp/w_in"), m + "mlp.gate_up_proj.weight", d,
                      ((f,), (f,))),
      ]
    else:
      rules += [
          _linear(a + "wq", m + "self_attn.q_proj.weight", d, (h, dh)),
          _linear(a + "wk", m + "self_attn.k_proj.weight", d, (k, dh)),
          _linear(a + "wv", m + "self_attn.v_proj.weight", d, (k, dh)),
          _linear("blocks/mlp/w_gate", m + "mlp.gate_proj.weight", d, (f,)),
          _linear("blocks/mlp/w_in", m + "mlp.up_proj.weight", d, (f,)),
      ]
    rules += [
        _linear_out(a + "wo", m + "self_attn.o_proj.weight", (h, dh), d),
        _linear("blocks/mlp/w_out", m + "mlp.down_proj.weight", f, (d,)),
        _same("final_norm/scale", "model.norm.weight", (d,)),
    ]
    if cfg.qkv_biased:
      rules += [_reshaped(a + "bq", m + "self_attn.q_proj.bias", (h * dh,), (h, dh)),
                _reshaped(a + "bk", m + "self_attn.k_proj.bias", (k * dh,), (k, dh)),
                _reshaped(a + "bv", m + "self_attn.v_proj.bias", (k * dh,), (k, dh))]
    if cfg.out_biased:
      rules.append(_same(a + "bo", m + "self_attn.o_proj.bias", (d,)))
    if cfg.qk_norm and cfg.qk_norm_scope == "all":
      rules += [_reshaped(a + "q_norm", m + "self_attn.q_norm.weight", (h * dh,), (h, dh)),
                _reshaped(a + "k_norm", m + "self_attn.k_norm.weight", (k * dh,), (k, dh))]
    elif cfg.qk_norm:
      rules += [_same(a + "q_norm", m + "self_attn.q_norm.weight", (dh,)),
                _same(a + "k_norm", m + "self_attn.k_norm.weight", (dh,))]
    if cfg.mlp_biased:
      rules += [_same("blocks/mlp/b_gate", m + "mlp.gate_proj.bias", (f,)),
                _same("blocks/mlp/b_in", m + "mlp.up_proj.bias", (f,)),
                _same("blocks/mlp/b_out", m + "mlp.down_proj.bias", (d,))]
  if not cfg.tie_embeddings:
    rules.append(_linear("lm_head", "lm_head.weight", d, (v,)))
  return rules


# ---------------------------------------------------------------------------------------------
# Flat params: {"blocks/attn/wq": array, ...}


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
