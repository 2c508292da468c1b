"""A decoder-only transformer in Flax NNX: GPT-2 and Llama styles from one `ModelConfig`.

Layers are created stacked (`nnx.vmap`) and run with `jax.lax.scan`, so compile time does not
grow with depth. Attention goes through `jax.nn.dot_product_attention` with a mask that is causal
in *slot* order and never crosses segments:

  allowed(q, k) = slot[k] <= slot[q]  and  segment[k] == segment[q]

Segment 0 is padding: real tokens (segment >= 1) never attend to it. A packed preference row
(`shared_prefix`) adds one exception: its prompt, the row's first slots, is seen by every
segment after it, so both responses of a pair read one copy of the prompt. Without a cache a token's slot
is its column; with a cache it is its index in the cache, so left-padded prompts, prefill and
one-token decoding share one rule. Positions (RoPE angle or learned-table row) come from the
caller and are independent of slots.

Local/global layers (Gemma's interleave, a Qwen2 window on some layers): both masks and both
RoPE tables are built once per call, and a per-layer flag scanned with the stacked params picks
one of each, so one compiled body serves every layer and compile time stays flat in depth.

Every parameter carries `logical_axes` metadata (e.g. ("embed", "mlp")); `alignax.parallel` maps
those names to mesh axes. Stacked block parameters have an extra leading "layers" axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignax.models.config import ModelConfig
from alignax.models.lora import matmul
from alignax.models.rope import rope, rotary_tables
from alignax.sharding import constrain

Array = jax.Array
RESIDUAL_AXES = ("batch", "length", "act_embed")


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, init: str = "normal", std: float | None = None):
  if init == "normal":
    value = (std if std is not None else cfg.init_std) * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(cfg.weight_dtype), logical_axes=axes)


def rms_normalize(xf: Array, eps: float) -> Array:
  """float32 `xf` divided by its root mean square over the last axis (eps inside the root)."""
  return xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + eps)


def norm_scale(scale, plus_one: bool) -> Array:
  """A norm's float32 multiplier: the weight, or (1 + weight) for Gemma's zero-centred ones."""
  w = scale[...].astype(jnp.float32)
  return 1.0 + w if plus_one else w


class Norm(nnx.Module):
  """LayerNorm (scale and bias) or RMSNorm (scale), computed in float32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.kind, self.eps, self.plus_one = cfg.norm, cfg.norm_eps, cfg.norm_plus_one
    self.scale = _param(rngs, (cfg.d_model,), ("embed",), cfg, "zeros" if cfg.norm_plus_one else "ones")
    if cfg.norm == "layernorm":
      self.bias = _param(rngs, (cfg.d_model,), ("embed",), cfg, "zeros")

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    if self.kind == "layernorm":
      xf = xf - xf.mean(-1, keepdims=True)
    y = rms_normalize(xf, self.eps) * norm_scale(self.scale, self.plus_one)
    if self.kind == "layernorm":
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def head_rms_norm(x: Array, scale, eps: float, plus_one: bool = False) -> Array:
  """RMSNorm of [B, T, H, Dh] over each head's Dh (Qwen3's and Gemma 3's q/k norm), in float32."""
  y = rms_normalize(x.astype(jnp.float32), eps) * norm_scale(scale, plus_one)
  return y.astype(x.dtype)


def all_heads_rms_norm(x: Array, scale, eps: float, plus_one: bool = False) -> Array:
  """RMSNorm of [B, T, H, Dh] over all of a token's H*Dh values at once, scale [H, Dh] (OLMo 2's
  q/k norm, on the projections before they are split into heads), in float32."""
  xf = x.astype(jnp.float32)
  b, t, h, dh = x.shape
  y = rms_normalize(xf.reshape(b, t, h * dh), eps).reshape(b, t, h, dh) * norm_scale(scale, plus_one)
  return y.astype(x.dtype)


def softcap(x: Array, cap: float) -> Array:
  """cap * tanh(x / cap): x squashed into (-cap, cap), near-identity for |x| << cap (Gemma 2)."""
  return cap * jnp.tanh(x / cap)


def cached_attention(q: Array, k: Array, v: Array, mask: Array, scale: float | None = None,
                     cap: float = 0.0) -> Array:
  """Softmax attention of queries over keys in [B, K, S, Dh] layout (grouped-query aware).

  Args:
    q: [B, T, H, Dh]; k, v: [B, K, S, Dh] with H a multiple of K; mask: [B, T, S] bool.
    scale: the q.k multiplier (None: 1/sqrt(Dh)).
    cap: soft-cap of the scaled scores before the mask (0: none).

  Returns:
    [B, T, H, Dh].
  """
  b, t, h, dh = q.shape
  kv = k.shape[1]
  q = q.reshape(b, t, kv, h // kv, dh)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(dh) if scale is None else scores * scale
  if cap:
    scores = softcap(scores, cap)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, dh)


class Attention(nnx.Module):
  """Multi-head / grouped-query self-attention with an optional KV cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, k, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    self.cfg = cfg
    self.wq = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), cfg)
    self.wk = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg)
    self.wv = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg)
    # GPT-2 scales residual-branch outputs by 1/sqrt(2 * n_layers) so the stream's variance stays flat.
    self.wo = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), cfg,
                     std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
    if cfg.qkv_biased:
      self.bq = _param(rngs, (h, dh), ("heads", "head_dim"), cfg, "zeros")
      self.bk = _param(rngs, (k, dh), ("kv_heads", "head_dim"), cfg, "zeros")
      self.bv = _param(rngs, (k, dh), ("kv_heads", "head_dim"), cfg, "zeros")
    if cfg.out_biased:
      self.bo = _param(rngs, (d,), ("embed",), cfg, "zeros")
    if cfg.qk_norm:
      init = "zeros" if cfg.norm_plus_one else "ones"
      if cfg.qk_norm_scope == "all":  # one norm over all heads' queries (keys): OLMo 2
        self.q_norm = _param(rngs, (h, dh), ("heads", "head_dim"), cfg, init)
        self.k_norm = _param(rngs, (k, dh), ("kv_heads", "head_dim"), cfg, init)
      else:
        self.q_norm = _param(rngs, (dh,), ("head_dim",), cfg, init)
        self.k_norm = _param(rngs, (dh,), ("head_dim",), cfg, init)

  def __call__(self, x: Array, rotary, mask: Array, kv_cache=None, cache_end=None):
    """Attends over x (or over the cache with x's keys written into it).

    Args:
      x: [B, T, d] normalized inputs in compute dtype.
      rotary: `rotary_tables(...)` of x's positions for this layer's kind, or None (no RoPE).
      mask: this layer's [B, T, S] bool, S = T without a cache, the cache length with one.
      kv_cache: None, or (k, v) each [B, K, S, Dh] for this layer (heads before slots: the
        layout the attention matmuls read without a transpose).
      cache_end: int32 scalar: slot where x's first token is written.

    Returns:
      (out [B, T, d], updated (k, v) or None).
    """
    cfg, dt = self.cfg, x.dtype
    b, t, d = x.shape
    # Projections as 2-D matmuls over all B*T tokens: XLA:CPU runs them (and their gradients)
    # far faster than the same contraction written over [B, T, d].
    x2 = x.reshape(b * t, d)
    def project(w, bias, heads):
      y = matmul(x2, w, dt)
      if bias is not None:
        y = y + bias[...].astype(dt).reshape(-1)
      return y.reshape(b, t, heads, -1)
    biased = cfg.qkv_biased
    q = project(self.wq, self.bq if biased else None, cfg.n_heads)
    k = project(self.wk, self.bk if biased else None, cfg.kv_heads)
    v = project(self.wv, self.bv if biased else None, cfg.kv_heads)
    if cfg.qk_norm and cfg.qk_norm_scope == "all":
      q = all_heads_rms_norm(q, self.q_norm, cfg.norm_eps, cfg.norm_plus_one)
      k = all_heads_rms_norm(k, self.k_norm, cfg.norm_eps, cfg.norm_plus_one)
    elif cfg.qk_norm:
      q = head_rms_norm(q, self.q_norm, cfg.norm_eps, cfg.norm_plus_one)
      k = head_rms_norm(k, self.k_norm, cfg.norm_eps, cfg.norm_plus_one)
    if rotary is not None:
      q, k = rope(q, rotary), rope(k, rotary)
    if kv_cache is None and cfg.attn_softcap:
      # dot_product_attention has no soft-cap: the explicit form, keys heads-first as a cache's.
      heads_first = lambda a: a.transpose(0, 2, 1, 3)
      out = cached_attention(q, heads_first(k), heads_first(v), mask, cfg.attn_scale, cfg.attn_softcap)
    elif kv_cache is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=cfg.attn_scale)
    else:
      k_all, v_all = kv_cache
      put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
          buf, new.transpose(0, 2, 1, 3).astype(buf.dtype), cache_end, axis=2)
      k_all, v_all = put(k_all, k), put(v_all, v)
      kv_cache = (k_all, v_all)
      out = cached_attention(q, k_all.astype(dt), v_all.astype(dt), mask, cfg.attn_scale,
                             cfg.attn_softcap)
    out = matmul(out.reshape(b * t, -1), self.wo, dt)
    if cfg.out_biased:
      out = out + self.bo[...].astype(dt)
    return out.reshape(b, t, d), kv_cache


class Mlp(nnx.Module):
  """GELU (two matrices), SwiGLU or GeGLU (gate, up, down) feed-forward block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    self.cfg = cfg
    self.w_in = _param(rngs, (d, f), ("embed", "mlp"), cfg)
    gated = cfg.mlp in ("swiglu", "geglu")
    if gated:
      self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), cfg)
    self.w_out = _param(rngs, (f, d), ("mlp", "embed"), cfg, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
    if cfg.mlp_biased:
      self.b_in = _param(rngs, (f,), ("mlp",), cfg, "zeros")
      self.b_out = _param(rngs, (d,), ("embed",), cfg, "zeros")
      if gated:
        self.b_gate = _param(rngs, (f,), ("mlp",), cfg, "zeros")

  def __call__(self, x: Array) -> Array:
    dt = x.dtype
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # 2-D matmuls (see Attention)
    biased = self.cfg.mlp_biased
    h = matmul(x, self.w_in, dt)
    if biased:
      h = h + self.b_in[...].astype(dt)
    if self.cfg.mlp in ("swiglu", "geglu"):
      gate = matmul(x, self.w_gate, dt)
      if biased:
        gate = gate + self.b_gate[...].astype(dt)
      act = jax.nn.silu if self.cfg.mlp == "swiglu" else lambda g: jax.nn.gelu(g, approximate=True)
      h = act(gate) * h
    else:
      h = jax.nn.gelu(h, approximate=True)
    out = matmul(h, self.w_out, dt)
    if biased:
      out = out + self.b_out[...].astype(dt)
    return out.reshape(shape)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)); with `post_norms` each
  sublayer's output is normalized too before it is added (Gemma), and without `pre_norms` only
  that one is (OLMo 2: x + norm(attn(x)))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.post_norms, self.pre_norms = cfg.post_norms, cfg.pre_norms
    if cfg.pre_norms:
      self.attn_norm = Norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    if cfg.pre_norms:
      self.mlp_norm = Norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs)
    if cfg.post_norms:
      self.attn_out_norm = Norm(cfg, rngs)
      self.mlp_out_norm = Norm(cfg, rngs)

  def __call__(self, x, rotary, mask, kv_cache=None, cache_end=None):
    # The residual stream is split by rows only at block boundaries: under FSDP this makes XLA
    # gather weights rather than whole-batch activations (a no-op without a jit mesh).
    x = constrain(x, RESIDUAL_AXES)
    a, kv_cache = self.attn(self.attn_norm(x) if self.pre_norms else x, rotary, mask, kv_cache,
                            cache_end)
    if self.post_norms:
      a = self.attn_out_norm(a)
    x = x + a
    m = self.mlp(self.mlp_norm(x) if self.pre_norms else x)
    if self.post_norms:
      m = self.mlp_out_norm(m)
    x = x + m
    return constrain(x, RESIDUAL_AXES), kv_cache


def attention_mask(q_segments: Array, k_segments: Array, q_slots: Array, k_slots: Array,
                   window: int = 0, shared_prefix: Array | None = None,
                   positions: Array | None = None) -> Array:
  """[B, T, S] bool: causal in slot order, within one segment, and (window > 0) at most
  `window - 1` slots back.

  Args:
    q_segments: [B, T]; k_segments: [B, S]; q_slots: [T] or [B, T]; k_slots: [S].
    window: a sliding window in tokens (0: none). Within a segment slots advance with
      positions (padding has its own segment), so the window counts tokens of the sequence.
    shared_prefix: None, or [B] int: the row's slots below it are a prefix that every real
      token of the row may also attend to (a prompt packed once, followed by several responses
      in their own segments). The window is then measured in `positions` ([B, T], no cache,
      S = T): a response after another one is that many slots but not tokens away from the
      prompt.
  """
  q_slots = jnp.broadcast_to(q_slots, q_segments.shape)
  causal = k_slots[None, None, :] <= q_slots[:, :, None]
  if window:
    if shared_prefix is None:
      dist = q_slots[:, :, None] - k_slots[None, None, :]
    else:
      dist = positions[:, :, None] - positions[:, None, :]
    causal = causal & (dist < window)
  visible = q_segments[:, :, None] == k_segments[:, None, :]
  if shared_prefix is not None:
    in_prefix = k_slots[None, None, :] < shared_prefix[:, None, None]
    visible = visible | (in_prefix & (q_segments[:, :, None] > 0))
  return causal & visible


class Transformer(nnx.Module):
  """Token + position embeddings, scanned blocks, final norm, output projection."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
    if cfg.position == "learned":
      self.pos_embed = _param(rngs, (cfg.max_seq_len, cfg.d_model), ("positions", "embed"), cfg, std=0.01)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = Norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

  def hidden(self, tokens: Array, positions: Array, segment_ids: Array, cache=None,
             shared_prefix: Array | None = None):
    """Final-norm hidden states.

    Args:
      tokens, positions, segment_ids: [B, T] int32.
      cache: None, or a dict from `init_cache` (updated functionally).
      shared_prefix: None, or [B] int32 (no cache): each row's first `shared_prefix` slots are a
        prompt that every segment of the row sees (`attention_mask`).

    Returns:
      (h [B, T, d] in compute dtype, new cache or None).
    """
    cfg = self.cfg
    dt = cfg.compute_dtype
    length = tokens.shape[1] if cache is None else cache["segment_ids"].shape[1]
    if length > cfg.max_seq_len:
      # Beyond the learned table a lookup reads NaN, and beyond it RoPE runs where the model was
      # never trained: refuse at trace time rather than return such logits.
      what = "sequence" if cache is None else "KV cache"
      raise ValueError(f"a {what} of {length} tokens exceeds model.max_seq_len={cfg.max_seq_len}")
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
    if cfg.scale_embeddings:
      # transformers rounds sqrt(d) to a float32 tensor, then casts it to the compute dtype.
      x = x * jnp.asarray(np.float32(math.sqrt(cfg.d_model))).astype(dt)
    if cfg.position == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
    t = tokens.shape[1]
    if shared_prefix is not None and cache is not None:
      raise ValueError("shared_prefix is for packed training rows, not cached decoding")
    if cache is None:
      slots = jnp.arange(t)
      q_slots, k_slots, k_segments = slots, slots, segment_ids
    else:
      end = cache["end"]
      k_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, end, axis=1)
      q_slots, k_slots = end + jnp.arange(t), jnp.arange(k_segments.shape[1])

    # (rotary, mask) of each layer kind, built once and only for the kinds the model has.
    local = cfg.local_layers
    def inputs_of(is_local):
      rotary = rotary_tables(positions, cfg, local=is_local) if cfg.position == "rope" else None
      window = cfg.sliding_window if is_local else 0
      return rotary, attention_mask(segment_ids, k_segments, q_slots, k_slots, window,
                                    shared_prefix, positions)
    kinds = {kind: inputs_of(kind) for kind in sorted(set(local))}
    mixed = len(kinds) == 2
    graphdef, stacked = nnx.split(self.blocks)

    def layer(x, layer_params, kv, is_local):
      # is_local: a traced per-layer flag in the scan (this layer's tables and mask selected
      # elementwise, inside the remat so the backward pass recomputes rather than stores them),
      # a static bool in the cached loop, None when every layer is of one kind.
      if is_local is None:
        rotary, mask = kinds[local[0]]
      elif isinstance(is_local, bool):
        rotary, mask = kinds[is_local]
      else:
        rotary, mask = jax.tree.map(lambda a, b: jnp.where(is_local, a, b), kinds[True], kinds[False])
      block = nnx.merge(graphdef, layer_params)
      return block(x, rotary, mask, kv, None if cache is None else cache["end"])

    def remat(fn, static=()):
      if cfg.remat == "full":
        return jax.checkpoint(fn, static_argnums=static)
      if cfg.remat == "dots":
        return jax.checkpoint(fn, static_argnums=static,
                              policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
      return fn

    if cache is None:
      scanned_layer = remat(layer)
      def body(x, scanned):
        layer_params, is_local = scanned
        x, _ = scanned_layer(x, layer_params, None, is_local)
        return x, None
      # The per-layer kind rides with the stacked params (None when every layer is alike).
      flags = jnp.asarray(local) if mixed else None
      x, _ = jax.lax.scan(body, x, (stacked, flags), unroll=cfg.scan_unroll)
      new_cache = None
    else:
      # Cached calls (prefill, decode) loop over layers with a static index, each layer owning its
      # cache arrays: no per-step slicing or restacking of the whole cache, and each update is an
      # in-place write of the new tokens' keys and values. The layer's kind is static here too.
      cached_layer = remat(layer, static=(3,))
      ks, vs = [], []
      layers = cache.get("layers")
      for i in range(cfg.n_layers):
        layer_params = layers[i] if layers is not None else jax.tree.map(lambda a: a[i], stacked)
        x, (k_i, v_i) = cached_layer(x, layer_params, (cache["k"][i], cache["v"][i]),
                                     local[i] if mixed else None)
        ks.append(k_i)
        vs.append(v_i)
      new_cache = dict(k=tuple(ks), v=tuple(vs), segment_ids=k_segments, end=cache["end"] + t)
      if layers is not None:
        new_cache["layers"] = layers
    return self.final_norm(x), new_cache

  def layer_params(self) -> tuple:
    """Each layer's params sliced out of the stacked blocks (n_layers states), for a cache's
    "layers" (`init_cache`)."""
    _, stacked = nnx.split(self.blocks)
    return tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(self.cfg.n_layers))

  def unembed(self, h: Array) -> Array:
    """[B, T, d] hidden -> [B, T, V] float32 logits (matmul in compute dtype, fp32 accumulate;
    soft-capped with `final_softcap`)."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    b, t, d = h.shape
    logits = jnp.matmul(h.reshape(b * t, d), w.astype(h.dtype), preferred_element_type=jnp.float32)
    if self.cfg.final_softcap:
      logits = softcap(logits, self.cfg.final_softcap)
    return logits.reshape(b, t, -1)

  def __call__(self, tokens: Array, positions: Array, segment_ids: Array, cache=None,
               shared_prefix: Array | None = None):
    """(logits [B, T, V] float32, cache) for tokens [B, T]; see `hidden`."""
    h, cache = self.hidden(tokens, positions, segment_ids, cache, shared_prefix)
    return self.unembed(h), cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty KV cache for `batch` rows and `max_len` slots.

  Returns a dict: k, v: tuples of n_layers arrays [B, K, S, Dh] (compute dtype); segment_ids
  [B, S] int32 (0 = empty slot); end int32 scalar (next slot to write; shared by all rows, so
  prompts are left-padded). A decode loop may add "layers", each layer's params sliced once
  before the loop (`LanguageModel.with_layers`): sliced inside the loop body, XLA:CPU copies
  every weight out of the stacked params at every step (most of a small batch's decode step).
  """
  dtype = dtype or cfg.compute_dtype
  shape = (batch, cfg.kv_heads, max_len, cfg.dim_per_head)
  layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return dict(k=layers(), v=layers(), segment_ids=jnp.zeros((batch, max_len), jnp.int32),
              end=jnp.zeros((), jnp.int32))
