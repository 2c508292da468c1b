"""RL estimators against float64 NumPy / Python-loop references."""

import itertools

import jax
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
  k2 = rl.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k2")
  k3 = rl.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k3")
  k3w = rl.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k3_weighted")
  r = np.exp(ref - logp)
  np.testing.assert_allclose(k1, logp - ref, rtol=1e-5)
  np.testing.assert_allclose(k2, 0.5 * (logp - ref) ** 2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(k3, (r - 1) - np.log(r), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(k3w, k3)
  assert np.all(np.asarray(k3) >= 0) and np.all(np.asarray(k2) >= 0)
  with pytest.raises(ValueError, match="k1"):
    rl.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k4")


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


# ---------------------------------------------------------------------------------------------
# KL in the loss, KL options, group advantages, asymmetric clipping, aggregation.


def _k3_np(logp, ref):
  r = np.exp(ref - logp)
  return (r - 1) - np.log(r)


def test_kl_loss_values_and_gradients_match_hand_formulas():
  rng, mask = _rand(6)
  logp, ref = rng.normal(size=mask.shape) - 2, rng.normal(size=mask.shape) - 2
  old = logp + rng.normal(size=mask.shape) * 0.2
  with jax.enable_x64(True):
    args = [jnp.asarray(x, jnp.float64) for x in (logp, ref, old)]
    expected = {"k2": 0.5 * (logp - ref) ** 2, "k3": _k3_np(logp, ref),
                "k3_weighted": np.exp(logp - old) * _k3_np(logp, ref)}
    # d/dlogp by hand: k2 -> L; k3 -> 1 - ref/pi; k3_weighted -> w k3 + w (1 - ref/pi), w = pi/old.
    w = np.exp(logp - old)
    hand = {"k2": logp - ref, "k3": 1 - np.exp(ref - logp),
            "k3_weighted": w * _k3_np(logp, ref) + w * (1 - np.exp(ref - logp))}
    for est in ("k2", "k3", "k3_weighted"):
      val = rl.kl_loss_per_token(*args, est)
      np.testing.assert_allclose(val, expected[est], rtol=1e-12, atol=1e-14)
      grads = jax.grad(lambda a, b, c: jnp.sum(rl.kl_loss_per_token(a, b, c, est) * mask),
                       argnums=(0, 1, 2))(*args)
      np.testing.assert_allclose(grads[0], hand[est] * mask, rtol=1e-12, atol=1e-14)
      # ref_logp and old_logp are constants.
      assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)
    with pytest.raises(ValueError, match="zero expected gradient"):
      rl.kl_loss_per_token(*args, "k1")
    with pytest.raises(ValueError, match="old_logp"):
      rl.kl_loss_per_token(args[0], args[1], None, "k3_weighted")


def _categorical(seed=0, k=5):
  """(policy logits theta [K], reference logprobs [K])."""
  rng = np.random.default_rng(seed)
  theta, z = rng.normal(size=k), rng.normal(size=k)
  return theta, z - np.log(np.exp(z).sum())


def test_expected_kl_gradients_are_the_documented_divergences():
  """Exact expectation over a K-way categorical pi = softmax(theta) (sampling probabilities held
  constant): the loss terms and the reward penalties have the gradients the docstrings derive."""
  theta0, ref = _categorical()
  with jax.enable_x64(True):
    theta0, ref = jnp.asarray(theta0), jnp.asarray(ref)

    def rev_kl(t):
      lp = jax.nn.log_softmax(t)
      return jnp.sum(jnp.exp(lp) * (lp - ref))

    def fwd_kl(t):
      return jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(t)))

    def expected_loss(t, est):
      lp = jax.nn.log_softmax(t)[None, :]
      p = jax.lax.stop_gradient(jnp.exp(lp))
      return jnp.sum(p * rl.kl_loss_per_token(lp, ref[None, :], jax.lax.stop_gradient(lp), est))

    def expected_reward_penalty(t, est):
      # Score-function gradient of a constant per-sample penalty k(y): E[k(y) grad log pi(y)].
      lp = jax.nn.log_softmax(t)
      k = rl.kl_per_token(jax.lax.stop_gradient(lp), ref, est)
      return jnp.sum(jax.lax.stop_gradient(jnp.exp(lp)) * k * lp)

    g = lambda f, *a: np.asarray(jax.grad(f)(theta0, *a))
    np.testing.assert_allclose(g(expected_loss, "k2"), g(rev_kl), atol=1e-12)
    np.testing.assert_allclose(g(expected_loss, "k3_weighted"), g(rev_kl), atol=1e-12)
    np.testing.assert_allclose(g(expected_loss, "k3"), g(fwd_kl), atol=1e-12)
    np.testing.assert_allclose(g(expected_reward_penalty, "k1"), g(rev_kl), atol=1e-12)
    np.testing.assert_allclose(g(expected_reward_penalty, "k3"), g(rev_kl) - g(fwd_kl), atol=1e-12)
    assert np.abs(g(expected_reward_penalty, "k3") - g(rev_kl)).max() > 1e-2

    # k2 in the reward: the gradient of sum_y ref f(pi/ref), f(u) = u (log^2 u / 2 - log u + 1) - 1.
    def k2_potential(t):
      u = jnp.exp(jax.nn.log_softmax(t) - ref)
      lu = jnp.log(u)
      return jnp.sum(jnp.exp(ref) * (u * (0.5 * lu ** 2 - lu + 1) - 1))
    np.testing.assert_allclose(g(expected_reward_penalty, "k2"), g(k2_potential), atol=1e-12)


def test_kl_options():
  allowed = {("reward", "k1"), ("loss", "k2"), ("loss", "k3"), ("loss", "k3_weighted")}
  allowed |= {("none", e) for e in rl.KL_ESTIMATORS}
  for placement, est in itertools.product(rl.KL_PLACEMENTS, rl.KL_ESTIMATORS):
    err = rl.kl_option_error(placement, est)
    if (placement, est) in allowed:
      assert err is None, (placement, est)
    else:
      assert isinstance(err, str) and err, (placement, est)
      with pytest.raises(ValueError):
        rl.kl_objective(placement, est)
  assert "unbounded" in rl.kl_option_error("reward", "k3")
  assert "unbounded" in rl.kl_option_error("reward", "k3_weighted")
  assert "zero expected gradient" in rl.kl_option_error("loss", "k1")
  assert rl.kl_option_error("loss", "k5") and rl.kl_option_error("value", "k1")
  assert rl.kl_objective("reward", "k1") == "E[r] - beta*KL(pi||ref)"
  assert rl.kl_objective("loss", "k2") == "E[r] - beta*KL(pi||ref)"
  assert rl.kl_objective("loss", "k3_weighted") == "E[r] - beta*KL(pi||ref)"
  assert rl.kl_objective("loss", "k3") == "E[r] - beta*KL(ref||pi)"
  assert rl.kl_objective("none", "k3") == "E[r]"


def _group_scores(seed=7, groups=5, g=4):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(groups, g))
  scores[1] = 0.5                      # a zero-variance group
  scores[3] = [1.0, 0.0, 1.0, 1.0]     # binary rewards
  return scores.reshape(-1)


def test_group_advantages_match_python_loops():
  scores, g = _group_scores(), 4
  ref_std, ref_centred, ref_rloo = np.zeros_like(scores), np.zeros_like(scores), np.zeros_like(scores)
  for start in range(0, len(scores), g):
    grp = [float(x) for x in scores[start:start + g]]
    mean = sum(grp) / g
    std = (sum((x - mean) ** 2 for x in grp) / (g - 1)) ** 0.5   # ddof = 1
    for i, x in enumerate(grp):
      ref_centred[start + i] = x - mean
      ref_std[start + i] = (x - mean) / (std + 1e-4)
      ref_rloo[start + i] = x - sum(grp[j] for j in range(g) if j != i) / (g - 1)
  with jax.enable_x64(True):
    s = jnp.asarray(scores)
    np.testing.assert_allclose(rl.group_advantages(s, g), ref_std, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rl.group_advantages(s, g, scale_by_std=False), ref_centred,
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rl.rloo_advantages(s, g), ref_rloo, rtol=1e-12, atol=1e-14)
    # Mean-centring is (G-1)/G times leave-one-out.
    np.testing.assert_allclose(ref_centred, (g - 1) / g * ref_rloo, rtol=1e-12, atol=1e-14)
    # ddof = 1, not 0: the binary group [1, 0, 1, 1] has std sqrt(0.25) = 0.5 vs. 0.433 with ddof 0.
    np.testing.assert_allclose(rl.group_advantages(s, g)[13], -0.75 / (0.5 + 1e-4), rtol=1e-12)
  with pytest.raises(ValueError):
    rl.group_advantages(jnp.zeros(6), 4)
  with pytest.raises(ValueError):
    rl.rloo_advantages(jnp.zeros(4), 1)


def test_group_zero_variance():
  scores, g = _group_scores(), 4
  expected = np.repeat([len(set(scores[i:i + g])) == 1 for i in range(0, len(scores), g)], g)
  got = np.asarray(rl.group_zero_variance(jnp.asarray(scores, jnp.float32), g))
  np.testing.assert_array_equal(got, expected)
  assert got.sum() == 4 and got.dtype == bool
  np.testing.assert_array_equal(rl.group_advantages(jnp.asarray(scores), g)[got], 0.0)


def test_clipped_surrogate_asymmetric_with_traced_clips():
  rng, mask = _rand(8)
  logp = rng.normal(size=mask.shape) * 0.3
  old = logp + rng.normal(size=mask.shape) * 0.3
  clip_low, clip_high = 0.2, 0.28
  ratio = np.exp(logp - old)
  with jax.enable_x64(True):
    f = jax.jit(rl.clipped_surrogate)
    for adv in (rng.normal(size=mask.shape), rng.normal(size=mask.shape[0])):
      a2 = adv if adv.ndim == 2 else np.repeat(adv[:, None], mask.shape[1], axis=1)
      per, m = f(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                 jnp.asarray(clip_low), jnp.asarray(clip_high))
      ref = np.zeros(mask.shape)
      clipped = np.zeros(mask.shape)
      for b, t in itertools.product(*map(range, mask.shape)):
        r, a = ratio[b, t], a2[b, t]
        l1, l2 = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
        ref[b, t] = max(l1, l2) * mask[b, t]
        clipped[b, t] = l2 > l1
      np.testing.assert_allclose(per, ref, rtol=1e-12, atol=1e-14)
      n = mask.sum()
      np.testing.assert_allclose(m["clipfrac"], (clipped * mask).sum() / n, rtol=1e-6)
      np.testing.assert_allclose(m["approx_kl"], (0.5 * (logp - old) ** 2 * mask).sum() / n, rtol=1e-6)
      np.testing.assert_allclose(m["ratio"], (ratio * mask).sum() / n, rtol=1e-6)
    # Asymmetry matters: a ratio of 1.25 with A > 0 is clipped at 1.2 but not at 1.28.
    one = jnp.ones((1, 1))
    lp = jnp.log(1.25) * one
    per_sym, _ = rl.clipped_surrogate(lp, 0 * one, one[0], one, 0.2, 0.2)
    per_asym, _ = rl.clipped_surrogate(lp, 0 * one, one[0], one, 0.2, 0.28)
    np.testing.assert_allclose([float(per_sym[0, 0]), float(per_asym[0, 0])], [-1.2, -1.25], rtol=1e-12)


def test_ppo_policy_loss_is_the_symmetric_clipped_surrogate():
  rng, mask = _rand(9)
  logp = rng.normal(size=mask.shape) * 0.3
  old = logp + rng.normal(size=mask.shape) * 0.3
  adv = rng.normal(size=mask.shape)
  args = [jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)]
  total, count, m = rl.ppo_policy_loss(*args, 0.2)
  per, m2 = rl.clipped_surrogate(*args, 0.2, 0.2)
  assert float(total) == float(jnp.sum(per)) and float(count) == mask.sum()
  assert all(float(m[k]) == float(m2[k]) for k in m)


def _aggregate_ref(per, mask, mode, max_len, weights):
  total, count = 0.0, 0.0
  for b in range(per.shape[0]):
    n = int(mask[b].sum())
    if n == 0 or weights[b] == 0:
      continue
    tok_sum = sum(per[b, t] for t in range(per.shape[1]) if mask[b, t])
    if mode == "token_mean":
      total, count = total + weights[b] * tok_sum, count + weights[b] * n
    elif mode == "seq_mean_token_mean":
      total, count = total + weights[b] * tok_sum / n, count + weights[b]
    else:
      total, count = total + weights[b] * tok_sum / max_len, count + weights[b]
  return total, count


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_matches_python_loops_and_splits_exactly(mode):
  rng = np.random.default_rng(10)
  mask = np.zeros((6, 7))
  for b, n in enumerate([7, 4, 1, 0, 5, 3]):   # row 3 is empty
    mask[b, :n] = 1
  per = rng.normal(size=mask.shape)
  weights = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])   # row 1 dropped
  with jax.enable_x64(True):
    s, c = rl.aggregate(jnp.asarray(per), jnp.asarray(mask), mode, max_len=7,
                        weights=jnp.asarray(weights))
    ref_s, ref_c = _aggregate_ref(per, mask, mode, 7, weights)
    np.testing.assert_allclose([float(s), float(c)], [ref_s, ref_c], rtol=1e-12)
    # Default weights: 1 for rows with tokens.
    s, c = rl.aggregate(jnp.asarray(per), jnp.asarray(mask), mode, max_len=7)
    ref_s, ref_c = _aggregate_ref(per, mask, mode, 7, np.ones(6))
    np.testing.assert_allclose([float(s), float(c)], [ref_s, ref_c], rtol=1e-12)
    # Sums and counts of two minibatches add up to the whole batch's.
    parts = [rl.aggregate(jnp.asarray(per[i]), jnp.asarray(mask[i]), mode, max_len=7)
             for i in (slice(0, 2), slice(2, 6))]
    np.testing.assert_allclose(sum(p[0] for p in parts) / sum(p[1] for p in parts), ref_s / ref_c,
                               rtol=1e-12)
  with pytest.raises(ValueError):
    rl.aggregate(jnp.asarray(per), jnp.asarray(mask), "seq_mean_token_sum_norm")
  with pytest.raises(ValueError):
    rl.aggregate(jnp.asarray(per), jnp.asarray(mask), "sum")


def test_aggregations_weight_tokens_as_their_papers_say():
  """A long (8 tokens) and a short (2 tokens) response with the same advantage A = 1; the gradient
  of the aggregated loss w.r.t. each token's logp (at r = 1, -A times the token's weight):
  token_mean: 1/10 per token, so the long response gets 4x the short one's total; seq_mean_token_mean:
  1/(2*8) vs 1/(2*2) per token, equal totals; seq_mean_token_sum_norm: 1/(B*max_len) = 1/16."""
  mask = np.zeros((2, 8))
  mask[0, :8], mask[1, :2] = 1, 1
  logp = jnp.asarray(np.full((2, 8), -1.0))
  m = jnp.asarray(mask)
  adv = jnp.ones(2)

  def grad(mode):
    def loss(lp):
      per, _ = rl.clipped_surrogate(lp, jax.lax.stop_gradient(lp), adv, m, 0.2, 0.28)
      s, c = rl.aggregate(per, m, mode, max_len=8)
      return s / c
    return -np.asarray(jax.grad(loss)(logp))

  g = grad("token_mean")
  np.testing.assert_allclose(g, mask / 10, rtol=1e-6)
  assert g[0].sum() == pytest.approx(4 * g[1].sum())
  g = grad("seq_mean_token_mean")
  np.testing.assert_allclose(g[0], mask[0] / 16, rtol=1e-6)
  np.testing.assert_allclose(g[1], mask[1] / 4, rtol=1e-6)
  assert g[1, 0] == pytest.approx(4 * g[0, 0]) and g[0].sum() == pytest.approx(g[1].sum())
  g = grad("seq_mean_token_sum_norm")
  np.testing.assert_allclose(g, mask / (2 * 8), rtol=1e-6)
