"""Rotary position embeddings: plain RoPE and the scaled variants long-context checkpoints use.

`model.rope_scaling` picks how the inverse frequencies are built (the formulas of Hugging Face's
`modeling_rope_utils`, so an imported checkpoint keeps its numbers):

  "none"     theta ** (-2i / D)                                   (Llama 2, Mistral, Qwen2/3)
  "linear"   the plain frequencies / factor                       (position interpolation)
  "dynamic"  NTK-aware: the base grows with the sequence once it exceeds `rope_original_max_len`,
             theta' = theta * (factor * L / L0 - (factor - 1)) ** (D / (D - 2)), L = the largest
             position of the call + 1 (as transformers computes it on each forward)
  "llama3"   Llama 3.1+: wavelengths above L0 / low_freq_factor divided by factor, below
             L0 / high_freq_factor kept, a smooth blend in between
  "yarn"     YaRN: per-dimension blend of interpolated and extrapolated frequencies over the
             correction range set by beta_fast / beta_slow, and cos/sin scaled by the attention
             factor (0.1 ln(factor) + 1 unless given)
  "longrope" LongRoPE (Phi-3): the plain frequencies divided per dimension by the short factors,
             or by the long ones once the call's largest position + 1 exceeds L0 (one choice for
             the whole call, as transformers makes it on each forward), cos/sin scaled by the
             attention factor (sqrt(1 + ln(factor) / ln(L0)) unless given). A cached decode that
             crosses L0 keeps the keys already cached as they were rotated (transformers instead
             recomputes its cache at that step).

`rotary_dim` (Phi-3's partial_rotary_factor) makes every variant's frequencies those of a head of
`rotary_dim` dimensions, rotating the first `rotary_dim` of each head and passing the rest through.

Gemma 3's local (sliding-window) layers use plain RoPE of their own base, `rope_local_theta`
(`rotary_tables(..., local=True)`), while its global layers keep rope_theta and the scaling.

The static variants are computed on the host once per trace (numpy, float64, then cast to float32
as transformers' float32 buffers are); "dynamic" depends on the call's positions, so it is
computed inside the traced function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from alignax.models.config import ModelConfig

Array = jax.Array


def _plain(dim: int, theta: float) -> np.ndarray:
  # float32 exponents as transformers computes them (torch.arange(...).float() / dim).
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def yarn_attention_factor(factor: float, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
  """YaRN's cos/sin scale: 0.1 * mscale * ln(factor) + 1 (ratio of two when both are given)."""
  def get(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
  if mscale and mscale_all_dim:
    return float(get(factor, mscale) / get(factor, mscale_all_dim))
  return get(factor)


def longrope_attention_factor(factor: float, original: int) -> float:
  """LongRoPE's cos/sin scale: sqrt(1 + ln(factor) / ln(original)), 1 when factor <= 1."""
  return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _longrope(cfg: ModelConfig, dim: int, factors) -> np.ndarray:
  # float32 exponents and factors as transformers computes them.
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (1.0 / (np.asarray(factors, np.float32) * np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)


def _yarn(cfg: ModelConfig, dim: int) -> np.ndarray:
  base, factor, original = cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_len

  def correction_dim(rotations):
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: no zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = (1 - ramp).astype(np.float32)
  pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
  inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
  return (inv_inter * (1 - extrapolate) + inv_extra * extrapolate).astype(np.float32)


def _llama3(cfg: ModelConfig, dim: int) -> np.ndarray:
  inv = _plain(dim, cfg.rope_theta)
  factor, low_f, high_f = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old = cfg.rope_original_max_len
  low_wavelen, high_wavelen = old / low_f, old / high_f
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old / wavelen - low_f) / (high_f - low_f)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def static_inverse_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """([D/2] float32 inverse frequencies, cos/sin scale) for every variant but "dynamic" and
  "longrope" (D = cfg.rope_dim)."""
  dim = cfg.rope_dim
  if cfg.rope_scaling == "linear":
    return (_plain(dim, cfg.rope_theta) / np.float32(cfg.rope_factor)).astype(np.float32), 1.0
  if cfg.rope_scaling == "llama3":
    return _llama3(cfg, dim), 1.0
  if cfg.rope_scaling == "yarn":
    scale = cfg.rope_attention_factor or yarn_attention_factor(cfg.rope_factor)
    return _yarn(cfg, dim), scale
  raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r} is not a static variant")


def _traced_plain(dim: int, base) -> Array:
  """[D/2] float32 plain inverse frequencies, computed in the trace (`base` may be traced)."""
  return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _dynamic_inverse_frequencies(cfg: ModelConfig, positions: Array) -> Array:
  """[D/2] float32: NTK-aware frequencies for this call's longest position (traced)."""
  dim, factor, original = cfg.rope_dim, cfg.rope_factor, cfg.rope_original_max_len
  seq_len = jnp.maximum(jnp.max(positions) + 1, original).astype(jnp.float32)
  base = cfg.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
  return _traced_plain(dim, base)


def _longrope_inverse_frequencies(cfg: ModelConfig, positions: Array) -> tuple[Array, float]:
  """([D/2] float32 LongRoPE frequencies for this call's longest position (traced), cos/sin scale)."""
  dim, original = cfg.rope_dim, cfg.rope_original_max_len
  short = jnp.asarray(_longrope(cfg, dim, cfg.rope_short_factor))
  long = jnp.asarray(_longrope(cfg, dim, cfg.rope_long_factor))
  scale = cfg.rope_attention_factor or longrope_attention_factor(cfg.rope_factor, original)
  return jnp.where(jnp.max(positions) + 1 > original, long, short), scale


def rotary_tables(positions: Array, cfg: ModelConfig, local: bool = False) -> tuple[Array, Array]:
  """RoPE (cos, sin), each [B, T, 1, D] float32 (D = cfg.rope_dim), in the half-split layout (as in
  Hugging Face Llama).

  Computed once per forward pass and shared by every layer of its kind (the angles depend only on
  positions). `local`: the tables of the local layers, plain RoPE of base `rope_local_theta`
  when that is set (otherwise the same as the global layers').
  """
  if local and cfg.rope_local_theta:
    inv_freq, scale = _traced_plain(cfg.rope_dim, cfg.rope_local_theta), 1.0
  elif cfg.rope_scaling == "none":
    # Plain RoPE computed in the trace, exactly as before the scaled variants existed.
    inv_freq, scale = _traced_plain(cfg.rope_dim, cfg.rope_theta), 1.0
  elif cfg.rope_scaling == "dynamic":
    inv_freq, scale = _dynamic_inverse_frequencies(cfg, positions), 1.0
  elif cfg.rope_scaling == "longrope":
    inv_freq, scale = _longrope_inverse_frequencies(cfg, positions)
  else:
    inv_freq, scale = static_inverse_frequencies(cfg)
    inv_freq = jnp.asarray(inv_freq)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  return cos, sin


def rope(x: Array, rotary: tuple[Array, Array]) -> Array:
  """Rotates [B, T, H, Dh] queries or keys by `rotary_tables` (x * cos + rotate_half(x) * sin) on
  their first D = cos.shape[-1] dimensions; the rest (a partial rotary) pass through."""
  cos, sin = rotary
  d = cos.shape[-1]
  xf = x.astype(jnp.float32)
  rest = None
  if d < x.shape[-1]:
    xf, rest = xf[..., :d], xf[..., d:]
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = xf * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
  if rest is not None:
    out = jnp.concatenate([out, rest], axis=-1)
  return out.astype(x.dtype)
