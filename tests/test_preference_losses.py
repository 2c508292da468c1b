"""The DPO family against float64 NumPy re-derivations (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.losses.preference import dpo_loss, kto_loss


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_loss(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma):
  h = (pc - rc) - (pr - rr)
  if kind == "sigmoid":
    return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
  if kind == "robust":
    return (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps)
  if kind == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  if kind == "hinge":
    return np.maximum(0.0, 1 - beta * h)
  ac, ar = pc / lc, pr / lr
  if kind == "simpo":
    return -_log_sigmoid(beta * (ac - ar) - gamma)
  if kind == "orpo":
    odds = lambda a: a - np.log(-np.expm1(a))
    return -ac - beta * _log_sigmoid(odds(ac) - odds(ar))
  raise ValueError(kind)


def _inputs(seed=0, b=6):
  rng = np.random.default_rng(seed)
  lc, lr = rng.integers(3, 20, b).astype(np.float64), rng.integers(3, 20, b).astype(np.float64)
  pc, pr = -rng.uniform(0.2, 3.0, b) * lc, -rng.uniform(0.2, 3.0, b) * lr
  rc, rr = pc + rng.normal(size=b), pr + rng.normal(size=b)
  return pc, pr, rc, rr, lc, lr


def _numeric_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for i in range(x.size):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("ipo", 0.0),
                                      ("hinge", 0.0), ("simpo", 0.0), ("orpo", 0.0)])
def test_loss_and_gradient_match_float64(kind, eps):
  pc, pr, rc, rr, lc, lr = _inputs()
  beta, gamma = 0.3, 0.5
  w = np.array([1, 1, 1, 1, 1, 0], np.float64)  # the last pair is filler

  def ours(pc_, pr_):
    total, count, _ = dpo_loss(kind, pc_, pr_, jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32),
                               beta=beta, label_smoothing=eps, gamma=gamma,
                               len_chosen=jnp.asarray(lc, jnp.float32), len_rejected=jnp.asarray(lr, jnp.float32),
                               weights=jnp.asarray(w, jnp.float32))
    return total

  ref_per = _np_loss(kind, pc, pr, rc, rr, lc, lr, beta, eps, gamma)
  total = ours(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
  np.testing.assert_allclose(float(total), (ref_per * w).sum(), rtol=2e-5)
  g_pc, g_pr = jax.grad(ours, argnums=(0, 1))(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
  ref_fn_c = lambda x: (_np_loss(kind, x, pr, rc, rr, lc, lr, beta, eps, gamma) * w).sum()
  ref_fn_r = lambda x: (_np_loss(kind, pc, x, rc, rr, lc, lr, beta, eps, gamma) * w).sum()
  np.testing.assert_allclose(g_pc, _numeric_grad(ref_fn_c, pc), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(g_pr, _numeric_grad(ref_fn_r, pr), rtol=1e-3, atol=1e-5)


def test_dpo_is_log2_when_policy_equals_reference():
  pc, pr, _, _, lc, lr = _inputs(1)
  for beta in (0.01, 0.1, 1.0):
    total, count, m = dpo_loss("sigmoid", jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(pc), jnp.asarray(pr),
                               beta=beta)
    assert float(total / count) == pytest.approx(np.log(2.0), rel=1e-6)
    assert float(m["rewards/margin"]) == 0.0


def test_kto_matches_float64():
  rng = np.random.default_rng(2)
  policy, ref = -rng.uniform(1, 20, 8), -rng.uniform(1, 20, 8)
  desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float64)
  kl, beta, wd, wu = 0.7, 0.2, 1.0, 1.5
  total, count, m = kto_loss(jnp.asarray(policy, jnp.float32), jnp.asarray(ref, jnp.float32),
                             jnp.asarray(desirable), jnp.float32(kl), beta=beta, desirable_weight=wd,
                             undesirable_weight=wu)
  sig = lambda x: 1 / (1 + np.exp(-x))
  r = policy - ref
  per = desirable * wd * (1 - sig(beta * (r - kl))) + (1 - desirable) * wu * (1 - sig(beta * (kl - r)))
  np.testing.assert_allclose(float(total), per.sum(), rtol=1e-5)
  assert float(count) == 8
  # The reference point gets no gradient and is clamped at 0.
  g = jax.grad(lambda z: kto_loss(jnp.asarray(policy, jnp.float32), jnp.asarray(ref, jnp.float32),
                                  jnp.asarray(desirable), z, beta=beta)[0])(jnp.float32(0.5))
  assert float(g) == 0.0
  neg = kto_loss(jnp.asarray(policy, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(desirable),
                 jnp.float32(-3.0), beta=beta)[2]["kl"]
  assert float(neg) == 0.0
