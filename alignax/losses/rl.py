"""RL building blocks for RLHF, as pure functions of [B, N] arrays over response tokens.

Token j of a response is generated from the state after prompt + response_<j; `mask[:, j]` is 1
for real response tokens (up to and including `<eos>`), 0 after. References: Ziegler et al. 2019
(KL penalty, adaptive controller); Schulman et al. 2016 (GAE); Schulman et al. 2017 (PPO);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (reward at the last token,
whitening, value clipping); Schulman 2020, "Approximating KL divergence" (k1, k3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x: Array, mask: Array) -> Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_var(x: Array, mask: Array) -> Array:
  mean = masked_mean(x, mask)
  return masked_mean((x - mean) ** 2, mask)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """(x - mean) / std over masked entries (mean kept when shift_mean=False); masked-out entries
  become 0."""
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def kl_per_token(logp: Array, ref_logp: Array, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(pi || ref) at tokens sampled from pi.

  k1 = log pi - log ref (unbiased, can be negative); k3 = (r - 1) - log r with r = ref / pi
  (unbiased, always >= 0, lower variance).
  """
  log_ratio = logp - ref_logp
  if estimator == "k1":
    return log_ratio
  if estimator == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def last_index(mask: Array) -> Array:
  """[B] index of the last 1 in each row of mask [B, N] (0 for an empty row)."""
  n = mask.shape[1]
  lengths = jnp.sum(mask > 0, axis=1)
  return jnp.clip(lengths - 1, 0, n - 1)


def token_rewards(scores: Array, kl: Array, mask: Array, beta) -> Array:
  """Per-token rewards: -beta * KL_t on every response token, plus the sequence score on the last
  real response token.

  Args:
    scores: [B] reward-model scores of the whole response.
    kl: [B, N] per-token KL estimates.
    mask: [B, N].
    beta: KL coefficient (scalar).

  Returns:
    [B, N] rewards, 0 where mask is 0.
  """
  rewards = -beta * kl * mask
  idx = last_index(mask)
  has_tokens = jnp.any(mask > 0, axis=1)
  bonus = jnp.where(has_tokens, scores, 0.0)
  return rewards.at[jnp.arange(rewards.shape[0]), idx].add(bonus)


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> tuple[Array, Array]:
  """Generalized advantage estimation over response tokens, as a reverse `lax.scan`.

  delta_j = r_j + gamma * V_{j+1} - V_j (V after the last real token is 0), and
  A_j = delta_j + gamma * lam * A_{j+1}.

  Args:
    rewards, values, mask: [B, N].

  Returns:
    (advantages [B, N], returns = advantages + values [B, N]); 0 where mask is 0.
  """
  values = values * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = rewards + gamma * next_values - values

  def step(carry, xs):
    delta, m = xs
    adv = (delta + gamma * lam * carry) * m
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0], rewards.dtype),
                        (deltas.T, mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, clip: float):
  """Clipped surrogate: max(-A r, -A clip(r, 1 - c, 1 + c)) with r = exp(logp - old_logp).

  Returns:
    (sum over masked tokens, number of tokens, metrics: clipfrac (fraction of tokens where the
    clipped term is the larger), approx_kl (mean 0.5 * (log r)^2), ratio (mean r)).
  """
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  loss1 = -advantages * ratio
  loss2 = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  per_token = jnp.maximum(loss1, loss2)
  metrics = {"clipfrac": masked_mean((loss2 > loss1).astype(jnp.float32), mask),
             "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
             "ratio": masked_mean(ratio, mask)}
  return jnp.sum(per_token * mask), jnp.sum(mask), metrics


def ppo_value_loss(values: Array, old_values: Array, returns: Array, mask: Array, clip: float):
  """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

  Returns:
    (sum over masked tokens, number of tokens, metrics: vf_clipfrac).
  """
  clipped = old_values + jnp.clip(values - old_values, -clip, clip)
  loss1 = (values - returns) ** 2
  loss2 = (clipped - returns) ** 2
  per_token = 0.5 * jnp.maximum(loss1, loss2)
  metrics = {"vf_clipfrac": masked_mean((loss2 > loss1).astype(jnp.float32), mask)}
  return jnp.sum(per_token * mask), jnp.sum(mask), metrics


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - Var(R - V) / Var(R) over masked tokens (1 = perfect value predictions)."""
  return 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask), 1e-8)


def adaptive_kl_coef(beta, kl, target: float, horizon: float, n_steps):
  """Ziegler et al.'s proportional controller: err = clip(KL / target - 1, -0.2, 0.2);
  beta <- beta * (1 + err * n_steps / horizon)."""
  err = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return beta * (1.0 + err * n_steps / horizon)
