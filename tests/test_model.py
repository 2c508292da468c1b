"""The transformer: KV-cache decoding, segment isolation, padding, dtypes, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.models import build_lm, gpt2_style, llama_style


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _decode_all(lm, params, tokens, positions, segments, prefill):
  """Prefill `prefill` tokens, then decode the rest one token at a time; concatenated logits."""
  b, t = tokens.shape
  cache = lm.init_cache(b, t + 3)
  apply = jax.jit(lm.apply)
  out, cache = apply(params, tokens[:, :prefill], positions[:, :prefill], segments[:, :prefill], cache)
  outs = [out]
  for i in range(prefill, t):
    out, cache = apply(params, tokens[:, i:i + 1], positions[:, i:i + 1], segments[:, i:i + 1], cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_kv_cache_decoding_matches_full_forward(style, tiny_llama, tiny_gpt2):
  cfg = tiny_llama if style == "llama" else tiny_gpt2
  lm, params = build_lm(cfg, seed=1)
  b, t = 3, 20
  tokens = jax.random.randint(jax.random.key(2), (b, t), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  segments = jnp.ones((b, t), jnp.int32)
  full, _ = lm.apply(params, tokens, positions, segments)
  decoded, cache = _decode_all(lm, params, tokens, positions, segments, prefill=7)
  assert _rel(decoded, full) <= 1e-5
  assert int(cache["end"]) == t


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_left_padded_prompts_decode_like_unpadded(style, tiny_llama, tiny_gpt2):
  """A left-padded row (segment 0, positions starting at the first real token) gives the logits
  of the same row without padding."""
  cfg = tiny_llama if style == "llama" else tiny_gpt2
  lm, params = build_lm(cfg, seed=3)
  t, pad = 12, 5
  real = jax.random.randint(jax.random.key(4), (1, t), 0, cfg.vocab_size)
  alone, _ = lm.apply(params, real, jnp.arange(t)[None], jnp.ones((1, t), jnp.int32))
  tokens = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), real], axis=1)
  positions = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.arange(t)[None]], axis=1)
  segments = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, t), jnp.int32)], axis=1)
  decoded, _ = _decode_all(lm, params, tokens, positions, segments, prefill=pad + 4)
  assert _rel(decoded[:, pad:], alone) <= 1e-5


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_packed_segments_are_isolated(style, tiny_llama, tiny_gpt2):
  cfg = tiny_llama if style == "llama" else tiny_gpt2
  lm, params = build_lm(cfg, seed=5)
  # Row: document 1 (8 tokens), document 2 (6 tokens), padding (2).
  segments = jnp.array([[1] * 8 + [2] * 6 + [0] * 2])
  positions = jnp.array([list(range(8)) + list(range(6)) + [0, 0]])
  tokens = jax.random.randint(jax.random.key(6), (1, 16), 0, cfg.vocab_size)
  base, _ = lm.apply(params, tokens, positions, segments)
  # Change every token of document 1 and the padding: document 2's logits must not move.
  changed = tokens.at[:, :8].set((tokens[:, :8] + 7) % cfg.vocab_size).at[:, 14:].set(3)
  moved, _ = lm.apply(params, changed, positions, segments)
  np.testing.assert_array_equal(np.asarray(base[:, 8:14]), np.asarray(moved[:, 8:14]))
  assert not np.allclose(base[:, :8], moved[:, :8])
  # And document 2 packed equals document 2 alone.
  alone, _ = lm.apply(params, tokens[:, 8:14], positions[:, 8:14], jnp.ones((1, 6), jnp.int32))
  assert _rel(base[:, 8:14], alone) <= 1e-5


def test_param_count_matches_config():
  for cfg in (llama_style(), gpt2_style(vocab_size=1000, d_model=64, n_layers=3, n_heads=4, d_ff=256,
                                        max_seq_len=32),
              llama_style(n_kv_heads=2, qkv_bias=True)):
    _, params = build_lm(cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  assert llama_style().num_params() == 4_458_752  # the standard CPU workload model (4.46M)


def test_bf16_compute_runs_and_tracks_fp32(tiny_llama):
  import dataclasses
  lm32, params = build_lm(tiny_llama, seed=7)
  lm16, _ = build_lm(dataclasses.replace(tiny_llama, dtype="bfloat16"), seed=7)
  tokens = jax.random.randint(jax.random.key(8), (2, 16), 0, tiny_llama.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  seg = jnp.ones((2, 16), jnp.int32)
  l32, _ = lm32.apply(params, tokens, pos, seg)
  l16, _ = jax.jit(lm16.apply)(params, tokens, pos, seg)
  assert l16.dtype == jnp.float32  # logits accumulate in fp32
  assert jnp.all(jnp.isfinite(l16))
  assert _rel(l16, l32) < 0.05


def test_remat_changes_nothing_numerically(tiny_llama):
  import dataclasses
  lm, params = build_lm(tiny_llama, seed=9)
  lm_r, _ = build_lm(dataclasses.replace(tiny_llama, remat="full"), seed=9)
  tokens = jax.random.randint(jax.random.key(10), (2, 16), 0, tiny_llama.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  seg = jnp.ones((2, 16), jnp.int32)

  def loss(model, p):
    return jnp.mean(model.apply(p, tokens, pos, seg)[0] ** 2)

  g1 = jax.grad(lambda p: loss(lm, p))(params)
  g2 = jax.grad(lambda p: loss(lm_r, p))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_invalid_model_config_names_the_field():
  with pytest.raises(ValueError, match="model.n_kv_heads"):
    llama_style(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="model.norm"):
    llama_style(norm="batchnorm")
