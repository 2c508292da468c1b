"""One config dataclass for every decoder-only transformer alignax builds.

GPT-2 style: layernorm, learned positions, GELU MLP, biases, tied embeddings.
Llama style: rmsnorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head.
Mistral/Qwen2 are Llama style with (optionally) q/k/v biases.
Gemma 2/3 style: GeGLU, RMSNorm scaling by (1 + weight), a norm before and after each sublayer,
embeddings scaled by sqrt(d_model), local sliding-window layers interleaved with global ones,
logit soft-capping.
OLMo 2 is Llama style with norms after each sublayer only and q/k norms over all heads at once;
Phi-3 is Llama style, optionally with RoPE on part of each head and LongRoPE scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu", "geglu")
REMATS = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn", "longrope")
QK_NORM_SCOPES = ("head", "all")
LAYER_KINDS = "LG"  # layer_pattern: L = local (sliding window), G = global (full attention)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and choices of a decoder-only transformer.

  Attributes:
    vocab_size: rows of the embedding table (>= the tokenizer's vocabulary).
    d_model: residual stream width.
    n_layers: number of blocks (stacked and scanned).
    n_heads: query heads.
    n_kv_heads: key/value heads (grouped-query attention); 0 means n_heads.
    head_dim: per-head width; 0 means d_model // n_heads.
    d_ff: hidden width of the MLP.
    max_seq_len: longest sequence (learned position table size; cache length bound).
    norm: "layernorm" (with bias) or "rmsnorm".
    norm_eps: epsilon inside the norm.
    norm_plus_one: every RMSNorm/LayerNorm scale (q/k norms included) is (1 + weight), in
      float32 (Gemma): weights are stored zero-centred, as Gemma checkpoints hold them, and
      initialized at zero.
    post_norms: a norm after each sublayer too, on its output before the residual add (Gemma's
      post_attention / post_feedforward norms): x + norm(attn(norm(x))), then the same for the MLP.
    pre_norms: the norm before each sublayer (on its input); False with post_norms is OLMo 2's
      block, x + norm(attn(x)), then x + norm(mlp(x)).
    position: "learned" absolute positions or "rope".
    rope_theta: RoPE base frequency.
    rope_scaling: "none", "linear", "dynamic", "llama3", "yarn" or "longrope" (see
      `alignax.models.rope`).
    rope_factor: the scaling factor of the scaled variants.
    rope_original_max_len: the context length the frequencies were trained for
      (original_max_position_embeddings; for "dynamic", the length beyond which the base grows).
    rope_low_freq_factor, rope_high_freq_factor: "llama3"'s wavelength band.
    rope_beta_fast, rope_beta_slow, rope_truncate: "yarn"'s correction range.
    rope_attention_factor: "yarn"'s and "longrope"'s cos/sin scale; 0 means 0.1 ln(rope_factor) + 1
      (yarn), sqrt(1 + ln(rope_factor) / ln(rope_original_max_len)) (longrope; 1 if factor <= 1).
    rope_short_factor, rope_long_factor: "longrope"'s per-frequency divisors (rope_dim / 2 each):
      the short ones while every position of the call is below rope_original_max_len, else the
      long ones (Phi-3).
    rotary_dim: RoPE rotates the first rotary_dim dimensions of each head and passes the rest
      through (Phi-3's partial_rotary_factor); 0 = the whole head.
    rope_local_theta: plain-RoPE base of the local (sliding-window) layers, which then ignore
      rope_scaling (Gemma 3's rope_local_base_freq); 0 = every layer uses rope_theta/rope_scaling.
    mlp: "gelu" (tanh approximation, GPT-2), "swiglu" (silu(gate) * up) or "geglu"
      (gelu_tanh(gate) * up, Gemma).
    tie_embeddings: reuse the embedding table as the output projection.
    use_bias: biases on every projection (GPT-2).
    qkv_bias: biases on the q/k/v projections only (Qwen2); implied by use_bias.
    attention_bias: biases on q/k/v and the output projection (Llama `attention_bias`).
    mlp_bias: biases on the MLP's projections (Llama `mlp_bias`).
    qk_norm: RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norm_scope: "head" (the norm runs over each head's Dh, scales [Dh]) or "all" (over the
      whole projected query / key vector, H*Dh and K*Dh, scales [H, Dh] / [K, Dh]: OLMo 2).
    sliding_window: on local layers each token attends to itself and the `sliding_window - 1`
      tokens before it (Mistral); 0 = full causal attention everywhere.
    layer_pattern: one letter per layer, "L" local (sliding window, `rope_local_theta`) or "G"
      global (full attention, rope_theta/rope_scaling), e.g. Gemma 3's "LLLLLG..." or a Qwen2
      window on the top layers only; "" = every layer local when sliding_window > 0, else global.
    query_pre_attn_scalar: attention scores are q.k * query_pre_attn_scalar ** -0.5 (Gemma);
      0 = head_dim.
    attn_softcap: attention scores soft-capped to cap * tanh(score / cap) before the mask
      (Gemma 2); 0 = none.
    final_softcap: output logits soft-capped the same way (Gemma 2); 0 = none.
    scale_embeddings: token embeddings multiplied by sqrt(d_model) (rounded to float32, then to
      the compute dtype, as transformers does) before the first block (Gemma); the tied output
      projection uses the unscaled table.
    dtype: compute dtype of activations and matmuls.
    param_dtype: storage dtype of parameters.
    remat: what the backward pass recomputes. "dots" (default): matmul outputs are saved, the
      elementwise ops between them (norms, activations, softmax) are recomputed, so the layer
      scan stacks far fewer [L, B*T, d_ff] residuals (less activation memory; on CPU also
      faster than "none", see the README's benchmarks). "none" saves everything; "full"
      recomputes each block from its input (least memory).
    scan_unroll: layers per iteration of the layer scan (1 = rolled: compile time flat in
      depth).
    init_std: std of the normal initializer for weight matrices.
  """

  vocab_size: int = 512
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0
  head_dim: int = 0
  d_ff: int = 1024
  max_seq_len: int = 256
  norm: str = "rmsnorm"
  norm_eps: float = 1e-5
  norm_plus_one: bool = False
  post_norms: bool = False
  pre_norms: bool = True
  position: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_original_max_len: int = 0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_truncate: bool = True
  rope_attention_factor: float = 0.0
  rope_short_factor: tuple[float, ...] = ()
  rope_long_factor: tuple[float, ...] = ()
  rotary_dim: int = 0
  rope_local_theta: float = 0.0
  mlp: str = "swiglu"
  tie_embeddings: bool = False
  use_bias: bool = False
  qkv_bias: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  qk_norm_scope: str = "head"
  sliding_window: int = 0
  layer_pattern: str = ""
  query_pre_attn_scalar: float = 0.0
  attn_softcap: float = 0.0
  final_softcap: float = 0.0
  scale_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "dots"
  scan_unroll: int = 1
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("rope_short_factor", "rope_long_factor"):  # lists from JSON / ConfigDict
      object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
    self.validate()

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def rope_dim(self) -> int:
    """Dimensions of each head RoPE rotates (the rest pass through)."""
    return self.rotary_dim or self.dim_per_head

  @property
  def qkv_biased(self) -> bool:
    return self.use_bias or self.qkv_bias or self.attention_bias

  @property
  def out_biased(self) -> bool:
    return self.use_bias or self.attention_bias

  @property
  def mlp_biased(self) -> bool:
    return self.use_bias or self.mlp_bias

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it is local (sliding window, local RoPE), in layer order."""
    if self.layer_pattern:
      return tuple(c == "L" for c in self.layer_pattern)
    return (self.sliding_window > 0,) * self.n_layers

  @property
  def attn_scale(self) -> float | None:
    """The attention-score multiplier, or None for the default 1/sqrt(head_dim)."""
    return self.query_pre_attn_scalar ** -0.5 if self.query_pre_attn_scalar else None

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def validate(self) -> None:
    """Raises ValueError naming the field for any inconsistent setting."""
    def check(ok, field, msg):
      if not ok:
        raise ValueError(f"model.{field}: {msg}")
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      check(getattr(self, field) > 0, field, f"must be positive, got {getattr(self, field)}")
    check(self.norm in NORMS, "norm", f"must be one of {NORMS}, got {self.norm!r}")
    check(self.position in POSITIONS, "position", f"must be one of {POSITIONS}, got {self.position!r}")
    check(self.mlp in MLPS, "mlp", f"must be one of {MLPS}, got {self.mlp!r}")
    check(self.remat in REMATS, "remat", f"must be one of {REMATS}, got {self.remat!r}")
    check(self.scan_unroll >= 1, "scan_unroll", f"must be >= 1, got {self.scan_unroll}")
    check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
    check(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}")
    check(self.head_dim > 0 or self.d_model % self.n_heads == 0, "n_heads",
          f"d_model={self.d_model} is not divisible by n_heads={self.n_heads} (or set head_dim)")
    check(self.n_heads % self.kv_heads == 0, "n_kv_heads",
          f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
    check(self.position != "rope" or self.dim_per_head % 2 == 0, "head_dim",
          f"RoPE needs an even head dimension, got {self.dim_per_head}")
    check(self.rotary_dim >= 0 and self.rotary_dim <= self.dim_per_head and self.rotary_dim % 2 == 0,
          "rotary_dim", f"must be even and in [0, head_dim={self.dim_per_head}], got {self.rotary_dim}")
    check(not self.rotary_dim or self.position == "rope", "rotary_dim", "needs position='rope'")
    check(self.pre_norms or self.post_norms, "pre_norms",
          "a block needs norms before its sublayers, after them (post_norms), or both")
    check(self.qk_norm_scope in QK_NORM_SCOPES, "qk_norm_scope",
          f"must be one of {QK_NORM_SCOPES}, got {self.qk_norm_scope!r}")
    check(self.rope_scaling in ROPE_SCALINGS, "rope_scaling",
          f"must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
    if self.rope_scaling != "none":
      check(self.position == "rope", "rope_scaling", "needs position='rope'")
      check(self.rope_factor > 0, "rope_factor", f"must be > 0, got {self.rope_factor}")
    if self.rope_scaling in ("dynamic", "llama3", "yarn", "longrope"):
      check(self.rope_original_max_len > 0, "rope_original_max_len",
            f"rope_scaling={self.rope_scaling!r} needs the original context length (> 0)")
    if self.rope_scaling == "llama3":
      check(self.rope_high_freq_factor > self.rope_low_freq_factor > 0, "rope_high_freq_factor",
            "must be > rope_low_freq_factor > 0")
    if self.rope_scaling == "longrope":
      half = self.rope_dim // 2
      for name in ("rope_short_factor", "rope_long_factor"):
        factors = getattr(self, name)
        check(len(factors) == half and all(x > 0 for x in factors), name,
              f"rope_scaling='longrope' needs {half} positive factors (rope_dim / 2), got {len(factors)}")
    else:
      check(not self.rope_short_factor and not self.rope_long_factor, "rope_short_factor",
            "only rope_scaling='longrope' uses rope_short_factor / rope_long_factor")
    check(self.sliding_window >= 0, "sliding_window", f"must be >= 0, got {self.sliding_window}")
    if self.layer_pattern:
      check(len(self.layer_pattern) == self.n_layers and set(self.layer_pattern) <= set(LAYER_KINDS),
            "layer_pattern", f"must be one of {'/'.join(LAYER_KINDS)} per layer ({self.n_layers} "
            f"letters), got {self.layer_pattern!r}")
      check("L" not in self.layer_pattern or self.sliding_window > 0, "layer_pattern",
            "local layers ('L') need sliding_window > 0")
    for field in ("rope_local_theta", "query_pre_attn_scalar", "attn_softcap", "final_softcap"):
      check(getattr(self, field) >= 0, field, f"must be >= 0, got {getattr(self, field)}")
    check(not self.rope_local_theta or self.position == "rope", "rope_local_theta",
          "needs position='rope'")

  def num_params(self, include_embeddings: bool = True) -> int:
    """Exact parameter count of the model this config builds."""
    d, h, k, dh, f, v = (self.d_model, self.n_heads, self.kv_heads, self.dim_per_head, self.d_ff,
                         self.vocab_size)
    attn = d * h * dh + 2 * d * k * dh + h * dh * d
    if self.qkv_biased:
      attn += h * dh + 2 * k * dh
    if self.out_biased:
      attn += d
    if self.qk_norm:
      attn += (h + k) * dh if self.qk_norm_scope == "all" else 2 * dh
    gated = self.mlp in ("swiglu", "geglu")
    mlp = (3 if gated else 2) * d * f
    if self.mlp_biased:
      mlp += (2 * f if gated else f) + d
    norm = d * (2 if self.norm == "layernorm" else 1)
    per_layer = attn + mlp + 2 * (int(self.pre_norms) + int(self.post_norms)) * norm
    total = self.n_layers * per_layer + norm
    if include_embeddings:
      total += v * d
      if self.position == "learned":
        total += self.max_seq_len * d
      if not self.tie_embeddings:
        total += d * v
    return total

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a dict or ConfigDict, rejecting keys that are not fields."""
    fields = {f.name for f in dataclasses.fields(cls)}
    # `model.lora.*` is LoraConfig's (see `alignax.config.split_model_section`), not a field here.
    values = {k: v for k, v in values.items() if k != "lora"}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"model.{unknown[0]}: unknown model field (known: {', '.join(sorted(fields))})")
    return cls(**dict(values))


def gpt2_style(**overrides) -> ModelConfig:
  """GPT-2 architecture choices; sizes from `overrides` (defaults: GPT-2 small, 124M)."""
  base = dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024,
              norm="layernorm", position="learned", mlp="gelu", tie_embeddings=True, use_bias=True)
  base.update(overrides)
  return ModelConfig(**base)


def llama_style(**overrides) -> ModelConfig:
  """Llama architecture choices; sizes from `overrides` (defaults: the 4.46M CPU workload model)."""
  base = dict(vocab_size=512, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256,
              norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=False, use_bias=False)
  base.update(overrides)
  return ModelConfig(**base)
