"""SFT masking, the Bradley-Terry loss against float64 NumPy, and the reward head's read-out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.algorithms.pretrain import lm_loss
from alignax.data import pipeline
from alignax.data.tokenizer import ByteTokenizer
from alignax.losses.preference import bradley_terry_loss
from alignax.models import build_lm
from alignax.models.heads import build_scalar_model, last_token, last_token_index


def _sft_batch(user_text):
  tok = ByteTokenizer()
  records = [{"messages": [{"role": "user", "content": user_text},
                           {"role": "assistant", "content": "Paris."},
                           {"role": "user", "content": "And Spain?"},
                           {"role": "assistant", "content": "Madrid."}]}]
  return next(pipeline.sft_pipeline(records, tok, batch_size=1, seq_len=64, shuffle=False))


def test_sft_loss_counts_assistant_tokens_only(tiny_llama):
  lm, params = build_lm(tiny_llama, seed=0)
  loss_fn = jax.jit(lambda p, b: lm_loss(lm)(p, b, None, None, None))
  batch = _sft_batch("Capital of France?")
  tok = ByteTokenizer()
  targets = batch["tokens"][0][batch["loss_mask"][0] > 0]
  assert tok.decode(targets, skip_special=False) == "Paris.<eos>Madrid.<eos>"
  total, count, _ = loss_fn(params, batch)
  assert float(count) == len("Paris.") + len("Madrid.") + 2
  # The SFT loss is the masked CE over exactly those targets (float64 reference).
  logits, _ = lm.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
  lp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0, :-1], np.float64)))
  t = batch["tokens"][0]
  ref = -sum(lp[i - 1, t[i]] for i in range(1, t.size) if batch["loss_mask"][0, i] > 0)
  np.testing.assert_allclose(float(total), ref, rtol=1e-5)


def test_changing_a_user_tokens_target_leaves_the_sft_loss_unchanged(tiny_llama):
  """With the model's logits fixed, the targets at user (and system, marker, padding) positions
  do not enter the loss; the targets at assistant positions do."""
  from alignax.losses.lm import masked_cross_entropy
  lm, params = build_lm(tiny_llama, seed=0)
  batch = _sft_batch("Capital of France?")
  logits, _ = lm.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
  mask = batch["loss_mask"]
  base = float(masked_cross_entropy(logits, batch["tokens"], mask)[0])
  user_cols = np.where((mask[0] == 0) & (batch["segment_ids"][0] > 0))[0][1:]
  assistant_cols = np.where(mask[0] > 0)[0]
  for col in user_cols:
    targets = np.array(batch["tokens"])
    targets[0, col] = (targets[0, col] + 13) % tiny_llama.vocab_size
    assert float(masked_cross_entropy(logits, targets, mask)[0]) == base
  targets = np.array(batch["tokens"])
  targets[0, assistant_cols[0]] = (targets[0, assistant_cols[0]] + 13) % tiny_llama.vocab_size
  assert float(masked_cross_entropy(logits, targets, mask)[0]) != base


def _np_bt(rc, rr, margin, coef):
  rc, rr, m = (np.asarray(x, np.float64) for x in (rc, rr, margin))
  d = rc - rr - m
  loss = np.log1p(np.exp(-d)) + coef * (rc + rr) ** 2
  sig = 1.0 / (1.0 + np.exp(-d))
  grad_rc = -(1 - sig) + 2 * coef * (rc + rr)
  grad_rr = (1 - sig) + 2 * coef * (rc + rr)
  return loss, grad_rc, grad_rr


@pytest.mark.parametrize("coef,use_margin", [(0.0, False), (0.0, True), (0.01, True)])
def test_bradley_terry_loss_and_gradient_match_float64(coef, use_margin):
  rng = np.random.default_rng(0)
  rc, rr = rng.normal(size=6).astype(np.float32) * 2, rng.normal(size=6).astype(np.float32) * 2
  margin = rng.uniform(0, 1, 6).astype(np.float32) if use_margin else np.zeros(6, np.float32)
  weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last pair is filler
  fn = lambda a, b: bradley_terry_loss(a, b, margin=jnp.asarray(margin) if use_margin else None,
                                       center_coef=coef, weights=jnp.asarray(weights))
  (total, count, metrics) = fn(jnp.asarray(rc), jnp.asarray(rr))
  loss, g_rc, g_rr = _np_bt(rc, rr, margin, coef)
  np.testing.assert_allclose(float(total), (loss * weights).sum(), rtol=1e-5)
  assert float(count) == 5
  grads = jax.grad(lambda a, b: fn(a, b)[0], argnums=(0, 1))(jnp.asarray(rc), jnp.asarray(rr))
  np.testing.assert_allclose(grads[0], g_rc * weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[1], g_rr * weights, rtol=1e-5, atol=1e-6)
  assert float(metrics["accuracy"]) == pytest.approx(np.mean((rc > rr)[:5]))
  assert float(metrics["margin"]) == pytest.approx(np.mean((rc - rr)[:5]), rel=1e-5)


def test_head_reads_the_last_real_token_under_left_and_right_padding(tiny_llama):
  model, params = build_scalar_model(tiny_llama, seed=0)
  rng = np.random.default_rng(1)
  real = rng.integers(0, tiny_llama.vocab_size, 9).astype(np.int32)
  alone = model.values(params, real[None], np.arange(9)[None], np.ones((1, 9), np.int32))
  expected = float(alone[0, -1])
  pad = 5
  right = (np.concatenate([real, np.zeros(pad, np.int32)])[None],
           np.concatenate([np.arange(9), np.zeros(pad, np.int32)])[None],
           np.concatenate([np.ones(9, np.int32), np.zeros(pad, np.int32)])[None])
  left = (np.concatenate([np.zeros(pad, np.int32), real])[None],
          np.concatenate([np.zeros(pad, np.int32), np.arange(9)])[None],
          np.concatenate([np.zeros(pad, np.int32), np.ones(9, np.int32)])[None])
  for tokens, positions, segments in (right, left):
    values = model.values(params, tokens, positions, segments)
    assert float(last_token(values, jnp.asarray(segments))[0]) == pytest.approx(expected, rel=1e-5)
  assert list(np.asarray(last_token_index(jnp.asarray([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])))) == [1, 3, 0]


def test_reward_head_init_scale():
  from alignax.models import llama_style
  cfg = llama_style(d_model=256, n_heads=4, vocab_size=300, n_layers=1, d_ff=64)
  _, params = build_scalar_model(cfg, seed=0)
  w = np.asarray(params["head_w"][...])
  assert w.shape == (256,) and abs(w.std() - 1 / np.sqrt(257)) < 0.2 / np.sqrt(257)
  assert float(params["head_b"][...]) == 0.0
