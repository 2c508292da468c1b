"""Closed-form checks of the RL losses on a K-armed bandit with one-token responses.

pi = softmax(theta) over K actions, rewards R, a fixed non-uniform reference pi_ref. A response
is one token ([B, 1] arrays, mask 1). Each method's surrogate loss is built from the project's
own functions (`alignax.losses.rl`), and its EXACT expected gradient is computed by enumerating
every group of G actions (K^G of them, each weighted by its probability under the sampling policy,
held constant) at the on-policy point logp = log_softmax(theta)[actions], old_logp =
stop_gradient(logp). Plain gradient descent on theta then reaches the method's fixed point, which
is compared with its closed form (total variation distance).

Notation: c = (G-1)/G; L(y) = log(pi(y) / pi_ref(y)); in theta coordinates the score function is
grad_theta log pi(y) = e_y - pi. An update direction sum_y pi(y) g(y) (e_y - pi) vanishes iff
g(y) is the same for every y (pi > 0), which gives the stationarity conditions below.

All computation is float64 (`jax.enable_x64` inside each test, so nothing leaks to other modules).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax.losses import rl

K = 4
R = np.array([1.0, 0.3, -0.5, 0.8])
REF_LOGITS = np.array([-0.4, 0.6, 0.3, -0.1])
REF_LOGP = REF_LOGITS - np.log(np.exp(REF_LOGITS).sum())
REF = np.exp(REF_LOGP)
G = 4
C = (G - 1) / G


def _tv(p, q):
  return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _tilted(scale, beta):
  """argmax_pi scale * E[r] - beta KL(pi || ref) = ref exp(scale r / beta) / Z."""
  w = REF * np.exp(scale * R / beta)
  return w / w.sum()


def _forward_kl_optimum(scale, beta):
  """argmax_pi scale * E[r] - beta KL(ref || pi) over the simplex. Lagrange: scale r(y) +
  beta ref(y) / pi(y) = lam, so pi(y) = beta ref(y) / (lam - scale r(y)) with lam > max scale r,
  fixed by sum pi = 1: the sum decreases from +inf (lam -> max scale r) to <= 1 at
  lam = max scale r + beta, so bisection on that bracket."""
  lo, hi = scale * R.max(), scale * R.max() + beta
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if np.sum(beta * REF / (mid - scale * R)) > 1.0:
      lo = mid
    else:
      hi = mid
  pi = beta * REF / (hi - scale * R)
  assert abs(pi.sum() - 1) < 1e-12
  return pi


def _inputs(lp_all, actions):
  logp = lp_all[actions][:, None]                     # [G, 1]
  old = jax.lax.stop_gradient(logp)
  ref = jnp.asarray(REF_LOGP)[actions][:, None]
  return logp, old, ref, jnp.ones_like(logp), jnp.asarray(R)[actions]


def _expected_grad(group_loss, group_size):
  """theta -> exact E_{groups ~ pi}[grad loss(group)] (sampling probabilities held constant)."""
  combos = jnp.asarray(list(itertools.product(range(K), repeat=group_size)))   # [K^G, G]

  def expected_loss(theta):
    lp_all = jax.nn.log_softmax(theta)
    prob = jnp.prod(jnp.exp(jax.lax.stop_gradient(lp_all))[combos], axis=1)
    return jnp.sum(prob * jax.vmap(lambda a: group_loss(lp_all, a))(combos))

  return jax.grad(expected_loss)


def _descend(group_loss, group_size, lr, steps):
  """Gradient descent from theta = the reference logits; returns (pi, |expected grad| at the end)."""
  grad = _expected_grad(group_loss, group_size)
  run = jax.jit(lambda t: jax.lax.fori_loop(0, steps, lambda _, x: x - lr * grad(x), t))
  theta = run(jnp.asarray(REF_LOGITS))
  return np.asarray(jax.nn.softmax(theta)), float(jnp.max(jnp.abs(grad(theta))))


def _ppo_loss(lp_all, actions, *, beta, estimator, value=0.5):
  """PPO on one sample per prompt: KL penalty in the per-token reward, GAE (gamma = lam = 1) with a
  constant value baseline, the clipped surrogate."""
  logp, old, ref, mask, scores = _inputs(lp_all, actions)
  kl = rl.kl_per_token(old, ref, estimator) * mask
  rewards = rl.token_rewards(scores, kl, mask, beta)
  adv, _ = rl.gae(rewards, value * mask, mask, 1.0, 1.0)
  total, n, _ = rl.ppo_policy_loss(logp, old, adv, mask, 0.2)
  return total / n


def _group_loss(lp_all, actions, *, advantage, placement, estimator, beta, mode):
  """A group method: KL in the score ("reward"), in the loss ("loss") or absent ("none"); group
  advantages; asymmetric clipped surrogate; `mode` aggregation."""
  logp, old, ref, mask, scores = _inputs(lp_all, actions)
  if placement == "reward":
    scores = scores - beta * jnp.sum(rl.kl_per_token(old, ref, estimator) * mask, axis=1)
  per_token, _ = rl.clipped_surrogate(logp, old, advantage(scores), mask, 0.2, 0.28)
  if placement == "loss":
    per_token = per_token + beta * rl.kl_loss_per_token(logp, ref, old, estimator) * mask
  total, n = rl.aggregate(per_token, mask, mode, max_len=1)
  return total / n


def _dr_grpo(scores):
  return rl.group_advantages(scores, G, scale_by_std=False)


def test_ppo_k1_in_reward_reaches_the_kl_regularized_optimum():
  """PPO, one sample, A(y) = r(y) - beta k1(y) - V with k1 = L(y) and a constant value V.

  Expected loss gradient: -sum_y pi A (e_y - pi) (V drops out: sum_y pi (e_y - pi) = 0). It is 0
  iff r(y) - beta L(y) is constant in y: pi* = ref exp(r / beta) / Z, the maximizer of
  E[r] - beta KL(pi || ref)."""
  beta = 0.5
  with jax.enable_x64(True):
    pi, g = _descend(functools.partial(_ppo_loss, beta=beta, estimator="k1"), 1, lr=4.0, steps=3000)
  target = _tilted(1.0, beta)
  assert _tv(pi, target) < 1e-12 and g < 1e-12, (_tv(pi, target), g)
  assert _tv(target, REF) > 0.2


def test_rloo_k1_in_reward_reaches_the_kl_regularized_optimum():
  """RLOO, G samples, s_i = r(y_i) - beta L(y_i), A_i = s_i - mean_{j != i} s_j.

  The baseline is independent of y_i, so E[A_i grad log pi(y_i)] = E[s grad log pi]: the same
  expected update as PPO's, fixed point pi* = ref exp(r / beta) / Z."""
  beta = 0.5
  loss = functools.partial(_group_loss, advantage=lambda s: rl.rloo_advantages(s, G),
                           placement="reward", estimator="k1", beta=beta, mode="token_mean")
  with jax.enable_x64(True):
    pi, g = _descend(loss, G, lr=4.0, steps=3000)
  assert _tv(pi, _tilted(1.0, beta)) < 1e-12 and g < 1e-12, (_tv(pi, _tilted(1.0, beta)), g)


def _allowed_options():
  return [(p, e) for p in rl.KL_PLACEMENTS for e in rl.KL_ESTIMATORS
          if rl.kl_option_error(p, e) is None]


@pytest.mark.parametrize("placement,estimator", _allowed_options())
def test_dr_grpo_every_allowed_kl_option_reaches_its_objective(placement, estimator):
  """Dr. GRPO (mean-centred advantage, no std) with each allowed (placement, estimator), compared
  with the optimum of what `kl_objective` says it optimizes.

  A_i = s_i - mean_j s_j = c (s_i - mean_{j != i} s_j), so the policy-gradient part of the expected
  update is c E[s grad log pi] (the leave-one-out baseline drops out, see RLOO).
  - reward/k1: s = r - beta L, the update is c times PPO's: pi* = ref exp(r / beta) / Z (c cancels).
  - loss/k2: + beta E[L grad log pi] = beta grad KL(pi || ref); stationary iff c r - beta L is
    constant: pi* = ref exp(c r / beta) / Z (the group mean shrinks the reward, not the KL).
  - loss/k3_weighted: the same expected gradient as k2 (`kl_loss_per_token`), same pi*.
  - loss/k3: + beta grad KL(ref || pi); per action -c pi (r - E_pi r) + beta (pi - ref) = 0, i.e.
    pi(y) = beta ref(y) / (lam - c r(y)) with lam = beta + c E_pi r (`_forward_kl_optimum`).
  - none: E[r] only; the update c pi (r - E r) keeps raising the best action, pi(argmax) -> 1.
  """
  beta = 0.5
  objective = rl.kl_objective(placement, estimator)
  loss = functools.partial(_group_loss, advantage=_dr_grpo, placement=placement,
                           estimator=estimator, beta=beta, mode="seq_mean_token_sum_norm")
  with jax.enable_x64(True):
    pi, g = _descend(loss, G, lr=4.0, steps=3000)
  if objective == "E[r]":
    assert pi[np.argmax(R)] > 0.99, pi
    return
  if objective == "E[r] - beta*KL(ref||pi)":
    target = _forward_kl_optimum(C, beta)
  else:
    assert objective == "E[r] - beta*KL(pi||ref)"
    target = _tilted(1.0 if placement == "reward" else C, beta)
  assert _tv(pi, target) < 1e-12 and g < 1e-12, (_tv(pi, target), g)


def test_grpo_unweighted_k3_in_loss_optimizes_the_forward_kl():
  """GRPO's published k3 in the loss (seq_mean_token_mean aggregation) with Dr. GRPO's advantage:
  its expected gradient is beta grad KL(ref || pi), so the fixed point is the forward-KL optimum
  pi(y) = beta ref(y) / (lam - c r(y)) (derivation in `_forward_kl_optimum`), visibly not the
  reverse-KL one ref exp(c r / beta) / Z."""
  beta = 0.5
  loss = functools.partial(_group_loss, advantage=_dr_grpo, placement="loss", estimator="k3",
                           beta=beta, mode="seq_mean_token_mean")
  with jax.enable_x64(True):
    pi, g = _descend(loss, G, lr=4.0, steps=3000)
  target = _forward_kl_optimum(C, beta)
  assert _tv(pi, target) < 1e-12 and g < 1e-12, (_tv(pi, target), g)
  assert _tv(pi, _tilted(C, beta)) > 1e-2


def test_grpo_without_kl_reaches_the_argmax():
  """Std-scaled GRPO, no KL: the expected update only raises E[r] (each non-constant group pushes
  up its above-mean actions), so pi(argmax r) -> 1."""
  loss = functools.partial(_group_loss, advantage=lambda s: rl.group_advantages(s, G),
                           placement="none", estimator="k1", beta=0.0, mode="token_mean")
  with jax.enable_x64(True):
    pi, _ = _descend(loss, G, lr=2.0, steps=2000)
  assert pi[np.argmax(R)] > 0.99, pi


# Independent NumPy implementation of std-scaled GRPO's exact expected update (k2 in the loss).

def _np_softmax(theta):
  z = np.exp(theta - theta.max())
  return z / z.sum()


_COMBOS = np.array(list(itertools.product(range(K), repeat=G)))   # [K^G, G]


def _np_grpo_std_k2_update(theta, beta, eps=1e-4):
  """Exact expected gradient in theta: policy part -(1/G) E[sum_i A_i (e_{y_i} - pi)] with
  A_i = (r_i - mean) / (std_ddof1 + eps), plus beta E[L (e_y - pi)] = beta pi (L - E_pi L)."""
  pi = _np_softmax(theta)
  prob = np.prod(pi[_COMBOS], axis=1)
  r = R[_COMBOS]
  centred = r - r.mean(axis=1, keepdims=True)
  adv = centred / (np.sqrt((centred ** 2).sum(axis=1, keepdims=True) / (G - 1)) + eps)
  score = np.eye(K)[_COMBOS] - pi                               # [K^G, G, K]
  pg = -np.einsum("c,cg,cgk->k", prob, adv, score) / G
  lr_ = np.log(pi) - REF_LOGP
  return pg + beta * pi * (lr_ - pi @ lr_)


def _np_root(beta):
  """Damped fixed-point iteration, then Newton on theta[1:] (theta[0] = 0: softmax is invariant to
  a shift, and the update sums to 0) with a central-difference Jacobian."""
  theta = REF_LOGITS - REF_LOGITS[0]
  for _ in range(300):
    theta = theta - 2.0 * _np_grpo_std_k2_update(theta, beta)
  h = 1e-6
  for _ in range(20):
    g = _np_grpo_std_k2_update(theta, beta)[1:]
    if np.abs(g).max() < 1e-15:
      break
    jac = np.zeros((K - 1, K - 1))
    for j in range(1, K):
      d = np.zeros(K)
      d[j] = h
      jac[:, j - 1] = (_np_grpo_std_k2_update(theta + d, beta)[1:]
                       - _np_grpo_std_k2_update(theta - d, beta)[1:]) / (2 * h)
    theta = theta - np.concatenate([[0.0], np.linalg.solve(jac, g)])
  assert np.abs(_np_grpo_std_k2_update(theta, beta)).max() < 1e-13
  return theta


def test_std_scaled_grpo_k2_matches_an_independent_root():
  """Std-scaled GRPO with k2 in the loss has no closed form: the advantage's scale 1 / std depends
  on the whole group. Its fixed point reached by the project's functions must equal a float64
  root of the exact expected update computed independently (NumPy enumeration, own std with
  ddof = 1 and eps = 1e-4, Newton). The root differs from Dr. GRPO's ref exp(c r / beta) / Z."""
  beta = 0.5
  loss = functools.partial(_group_loss, advantage=lambda s: rl.group_advantages(s, G),
                           placement="loss", estimator="k2", beta=beta, mode="seq_mean_token_mean")
  root = _np_softmax(_np_root(beta))
  with jax.enable_x64(True):
    pi, g = _descend(loss, G, lr=2.0, steps=3000)
    # The project's expected update also vanishes at the NumPy root.
    at_root = float(jnp.max(jnp.abs(_expected_grad(loss, G)(jnp.asarray(_np_root(beta))))))
  assert _tv(pi, root) < 1e-12 and g < 1e-12, (_tv(pi, root), g)
  assert at_root < 1e-12, at_root
  assert _tv(root, _tilted(C, beta)) > 1e-2


def test_k3_in_the_reward_is_refused_and_drives_a_ratio_to_zero():
  """k3 in the reward: E[k3 grad log pi] = grad KL(pi || ref) - grad KL(ref || pi), so PPO ascends
  E[r] - beta KL(pi || ref) + beta KL(ref || pi). In theta the KL(ref || pi) part of the ascent
  direction is beta (pi - ref): an action below its reference probability is pushed further down
  at a rate -> beta ref(y) per unit step, so log pi(y) decreases without bound (the objective is
  unbounded above). With the same beta, the reverse-KL optimum keeps every pi / ref > 0.1."""
  assert "unbounded" in rl.kl_option_error("reward", "k3")
  beta = 1.0
  with jax.enable_x64(True):
    pi, _ = _descend(functools.partial(_ppo_loss, beta=beta, estimator="k3"), 1, lr=1.0, steps=200)
    pi_k1, _ = _descend(functools.partial(_ppo_loss, beta=beta, estimator="k1"), 1, lr=1.0,
                        steps=200)
  assert np.min(pi / REF) < 1e-3, pi / REF
  assert np.min(_tilted(1.0, beta) / REF) > 0.1 and np.min(pi_k1 / REF) > 0.1
