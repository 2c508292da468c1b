"""RL estimators against float64 NumPy / Python-loop references."""

import jax.numpy as jnp
import numpy as np
import pytest

from alignax.losses import rl


def _rand(seed, shape=(3, 7)):
  rng = np.random.default_rng(seed)
  mask = np.ones(shape, np.float32)
  lengths = [7, 4, 1]
  for b, n in enumerate(lengths):
    mask[b, n:] = 0
  return rng, mask


def test_gae_matches_python_loop():
  rng, mask = _rand(0)
  rewards = rng.normal(size=mask.shape).astype(np.float32) * mask
  values = rng.normal(size=mask.shape).astype(np.float32)
  gamma, lam = 0.97, 0.9
  adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  ref_adv = np.zeros(mask.shape)
  for b in range(mask.shape[0]):
    n = int(mask[b].sum())
    last = 0.0
    for t in reversed(range(n)):
      next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
      delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
      last = delta + gamma * lam * last
      ref_adv[b, t] = last
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, (ref_adv + values * mask) * mask, rtol=1e-5, atol=1e-6)


def test_policy_loss_matches_numpy():
  rng, mask = _rand(1)
  logp = rng.normal(size=mask.shape) * 0.3
  old = logp + rng.normal(size=mask.shape) * 0.3
  adv = rng.normal(size=mask.shape)
  total, count, m = rl.ppo_policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)), 0.2)
  ratio = np.exp(logp - old)
  per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
  np.testing.assert_allclose(float(total), (per * mask).sum(), rtol=1e-5)
  assert float(count) == mask.sum()
  clipped = (-adv * np.clip(ratio, 0.8, 1.2)) > (-adv * ratio)
  np.testing.assert_allclose(float(m["clipfrac"]), (clipped * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(m["approx_kl"]), (0.5 * (logp - old) ** 2 * mask).sum() / mask.sum(),
                             rtol=1e-5)


def test_value_loss_matches_numpy():
  rng, mask = _rand(2)
  v, old, ret = (rng.normal(size=mask.shape) for _ in range(3))
  total, count, _ = rl.ppo_value_loss(*(jnp.asarray(x, jnp.float32) for x in (v, old, ret, mask)), 0.2)
  clipped = old + np.clip(v - old, -0.2, 0.2)
  per = 0.5 * np.maximum((v - ret) ** 2, (clipped - ret) ** 2)
  np.testing.assert_allclose(float(total), (per * mask).sum(), rtol=1e-5)


def test_kl_estimators_match_numpy():
  rng, mask = _rand(3)
  logp, ref = rng.normal(size=mask.shape) - 2, rng.normal(size=mask.shape) - 2
  k1 = rl.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k1")
  k3 = rl.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k3")
  r = np.exp(ref - logp)
  np.testing.assert_allclose(k1, logp - ref, rtol=1e-5)
  np.testing.assert_allclose(k3, (r - 1) - np.log(r), rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(k3) >= 0)
  with pytest.raises(ValueError, match="k1"):
    rl.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k2")


def test_score_lands_on_the_last_real_token():
  _, mask = _rand(4)
  kl = np.full(mask.shape, 0.5, np.float32)
  scores = np.array([3.0, -2.0, 7.0], np.float32)
  r = np.asarray(rl.token_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), 0.1))
  expected = -0.1 * kl * mask
  for b, last in enumerate([6, 3, 0]):
    expected[b, last] += scores[b]
  np.testing.assert_allclose(r, expected, rtol=1e-6)
  # An empty response gets no score anywhere.
  empty = np.asarray(rl.token_rewards(jnp.asarray([5.0]), jnp.zeros((1, 4)), jnp.zeros((1, 4)), 0.1))
  assert np.all(empty == 0)


def test_adaptive_kl_controller_follows_the_formula():
  beta = 0.1
  for kl, target, n, horizon in [(12.0, 6.0, 64, 10000), (1.0, 6.0, 64, 10000), (6.3, 6.0, 512, 1000)]:
    err = np.clip(kl / target - 1, -0.2, 0.2)
    expected = beta * (1 + err * n / horizon)
    got = float(rl.adaptive_kl_coef(jnp.float32(beta), jnp.float32(kl), target, horizon, n))
    assert got == pytest.approx(expected, rel=1e-6)


def test_whiten_and_explained_variance():
  rng, mask = _rand(5)
  x = rng.normal(size=mask.shape) * 3 + 1
  w = np.asarray(rl.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
  sel = mask > 0
  assert abs(w[sel].mean()) < 1e-5 and abs(w[sel].std() - 1) < 1e-3 and np.all(w[~sel] == 0)
  ev = float(rl.explained_variance(jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
  assert ev == pytest.approx(1.0)
