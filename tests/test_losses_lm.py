"""LM losses against a float64 NumPy re-derivation."""

import jax
import jax.numpy as jnp
import numpy as np

from alignax.losses import lm


def _np_logprobs(logits, tokens):
  logits = np.asarray(logits, np.float64)
  shifted = logits[:, :-1]
  m = shifted.max(-1, keepdims=True)
  logz = np.log(np.exp(shifted - m).sum(-1)) + m[..., 0]
  picked = np.take_along_axis(shifted, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
  return np.pad(picked - logz, ((0, 0), (1, 0)))


def test_next_token_logprobs_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 9, 37)).astype(np.float32) * 4
  tokens = rng.integers(0, 37, size=(3, 9))
  got = lm.next_token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))
  np.testing.assert_allclose(got, _np_logprobs(logits, tokens), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got[:, 0]) == 0)


def test_masked_cross_entropy_matches_numpy_and_counts():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 11, 50)).astype(np.float32) * 3
  tokens = rng.integers(0, 50, size=(4, 11))
  mask = (rng.random((4, 11)) < 0.6).astype(np.float32)
  mask[:, 0] = 0
  total, count, _ = lm.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  ref = -(_np_logprobs(logits, tokens) * mask).sum()
  np.testing.assert_allclose(float(total), ref, rtol=1e-5)
  assert float(count) == mask.sum()


def test_masked_cross_entropy_gradient_matches_closed_form():
  """d(-log softmax(z)_y)/dz = softmax(z) - onehot(y), on the masked positions only."""
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 6, 13)).astype(np.float32)
  tokens = rng.integers(0, 13, size=(2, 6))
  mask = np.array([[0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0]], np.float32)
  grad = jax.grad(lambda z: lm.masked_cross_entropy(z, jnp.asarray(tokens), jnp.asarray(mask))[0])(
      jnp.asarray(logits))
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = np.zeros_like(z)
  for b in range(2):
    for t in range(1, 6):
      if mask[b, t]:
        ref[b, t - 1] = p[b, t - 1]
        ref[b, t - 1, tokens[b, t]] -= 1
  np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-6)


def test_entropy_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  z = logits[:, :-1].astype(np.float64)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  ref = np.pad(-(p * np.log(p)).sum(-1), ((0, 0), (1, 0)))
  np.testing.assert_allclose(lm.next_token_entropy(jnp.asarray(logits)), ref, rtol=1e-5)
