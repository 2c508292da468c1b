"""RL building blocks for RLHF, as pure functions of [B, N] arrays over response tokens.

Token j of a response is generated from the state after prompt + response_<j; `mask[:, j]` is 1
for real response tokens (up to and including `<eos>`), 0 after. References: Ziegler et al. 2019
(KL penalty, adaptive controller); Schulman et al. 2016 (GAE); Schulman et al. 2017 (PPO);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (reward at the last token,
whitening, value clipping); Schulman 2020, "Approximating KL divergence" (k1, k2, k3).

Group methods (GRPO, Shao et al. 2024; Dr. GRPO, Liu et al. 2025; RLOO, Ahmadian et al. 2024;
DAPO, Yu et al. 2025) sample G responses per prompt; their rows are grouped consecutively: rows
g*G .. g*G + G - 1 are the G samples of prompt g (B = num_groups * G).

All KL quantities are in nats. Throughout, pi is the sampling policy (pi_old at sampling time),
"grad" is the gradient w.r.t. the policy parameters, and an expectation E_y[f(y) grad log pi(y)]
is the expected score-function (REINFORCE) gradient of a per-sample term f that is held constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax.losses.masked import masked_mean, masked_var

Array = jax.Array

KL_ESTIMATORS = ("k1", "k2", "k3", "k3_weighted")
KL_PLACEMENTS = ("reward", "loss", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """(x - mean) / std over masked entries (mean kept when shift_mean=False); masked-out entries
  become 0."""
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def kl_per_token(logp: Array, ref_logp: Array, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(pi || ref) (nats) at tokens sampled from pi, [B, N] -> [B, N].

  k1 = log pi - log ref (unbiased, can be negative); k2 = 0.5 * (log pi - log ref)^2 (biased,
  >= 0, low variance); k3 = (r - 1) - log r with r = ref / pi (unbiased, always >= 0, lower
  variance). "k3_weighted" has k3's value (the names differ in the loss, `kl_loss_per_token`).
  """
  log_ratio = logp - ref_logp
  if estimator == "k1":
    return log_ratio
  if estimator == "k2":
    return 0.5 * log_ratio ** 2
  if estimator in ("k3", "k3_weighted"):
    return jnp.expm1(-log_ratio) + log_ratio
  raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_loss_per_token(logp: Array, ref_logp: Array, old_logp: Array | None, estimator: str) -> Array:
  """Per-token KL term to add to the policy loss ("loss" placement), [B, N] -> [B, N] (nats).

  Samples y are drawn from pi_old; `logp` is differentiable, `ref_logp` and `old_logp` are treated
  as constants (stop_gradient is applied here). With L = log pi(y) - log ref(y), the expected
  gradient of each term at pi = pi_old (sum over y of pi(y) * grad term(y)) is:

    k2           0.5 * L^2.  grad = L grad log pi, so E = sum_y pi L grad log pi
                 = sum_y L grad pi = grad KL(pi || ref) (the extra sum_y pi grad L = grad sum pi
                 = 0).
    k3           (ref/pi - 1) - log(ref/pi), GRPO's published form (Shao et al. 2024).
                 grad = (1 - ref/pi) grad log pi, so E = sum_y (pi - ref) grad log pi
                 = -sum_y ref grad log pi = grad KL(ref || pi): the FORWARD KL, not KL(pi || ref).
    k3_weighted  exp(logp - old_logp) * k3. grad at pi = pi_old = (k3 + 1 - ref/pi) grad log pi
                 = -log(ref/pi) grad log pi = L grad log pi: the importance weight turns it into
                 grad KL(pi || ref), the reverse KL.

  k1 (= L) is refused: grad = grad log pi, whose expectation sum_y grad pi(y) is 0, so it only adds
  noise.
  """
  ref_logp = jax.lax.stop_gradient(ref_logp)
  log_ratio = logp - ref_logp
  if estimator == "k2":
    return 0.5 * log_ratio ** 2
  if estimator == "k3":
    return jnp.expm1(-log_ratio) + log_ratio
  if estimator == "k3_weighted":
    if old_logp is None:
      raise ValueError("k3_weighted needs old_logp (the sampling policy's logprobs)")
    weight = jnp.exp(logp - jax.lax.stop_gradient(old_logp))
    return weight * (jnp.expm1(-log_ratio) + log_ratio)
  if estimator == "k1":
    raise ValueError(kl_option_error("loss", "k1"))
  raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_option_error(placement: str, estimator: str) -> str | None:
  """None when KL estimator `estimator` may be used in `placement`, else a one-sentence reason.

  "reward": the per-token estimate (of the sampling policy, a constant) is subtracted from the
  reward, so its expected gradient is the score-function one, -beta E_y[k(y) grad log pi(y)], with
  L = log(pi / ref):
    k1  E[L grad log pi] = grad KL(pi || ref) (see `kl_loss_per_token`, k2): allowed.
    k3  E[(ref/pi - 1 - log(ref/pi)) grad log pi] = sum_y (ref - pi + pi L) grad log pi
        = -grad KL(ref || pi) + 0 + grad KL(pi || ref). The update ascends
        E[r] - beta KL(pi || ref) + beta KL(ref || pi), which is unbounded above: as any pi(y) -> 0
        with ref(y) > 0, KL(ref || pi) -> inf while KL(pi || ref) <= max_y log(1 / ref(y)).
    k3_weighted  the importance weight is 1 in a (constant) reward, so it is k3: refused alike.
    k2  E[0.5 L^2 grad log pi] = grad sum_y ref f(pi/ref) with f(u) = u (0.5 log^2 u - log u + 1)
        - 1; f'' = log(u) / u < 0 for u < 1, so this potential is not a divergence (at a
        deterministic pi on y it is L (L/2 - 1), below its value 0 at pi = ref when
        ref(y) > e^-2): not the gradient of any KL.
  "loss": see `kl_loss_per_token`; k1 has zero expected gradient.
  "none": no KL term; any estimator may still be logged.
  """
  if placement not in KL_PLACEMENTS:
    return f"KL placement must be one of {KL_PLACEMENTS}, got {placement!r}."
  if estimator not in KL_ESTIMATORS:
    return f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}."
  if placement == "none":
    return None
  if placement == "reward":
    if estimator == "k1":
      return None
    if estimator in ("k3", "k3_weighted"):
      return (f"{estimator} in the reward has score-function gradient grad KL(pi||ref) - "
              "grad KL(ref||pi), so the objective E[r] - beta*KL(pi||ref) + beta*KL(ref||pi) is "
              "unbounded as any pi(y) -> 0; use k1 in the reward or k3_weighted in the loss.")
    return ("k2 in the reward is not the gradient of any KL (its score-function gradient is that of "
            "a non-convex function of pi/ref); use k1 in the reward or k2 in the loss.")
  if estimator == "k1":
    return ("k1 in the loss has zero expected gradient (E[grad log pi] = 0); use k2 or k3_weighted "
            "in the loss, or k1 in the reward.")
  return None


def kl_objective(placement: str, estimator: str) -> str:
  """What the expected update maximizes for an allowed (placement, estimator):
  "E[r] - beta*KL(pi||ref)" (reward/k1, loss/k2, loss/k3_weighted), "E[r] - beta*KL(ref||pi)"
  (loss/k3) or "E[r]" (none). Raises ValueError for a refused option (`kl_option_error`).

  Group methods scale the reward term by their baseline: GRPO's mean-centred advantage
  r_i - mean_j r_j equals (G-1)/G times the leave-one-out one, so with the KL in the loss the
  effective reward is (G-1)/G * r (with the KL in the reward the factor multiplies both terms and
  cancels); std scaling makes the scale data-dependent.
  """
  err = kl_option_error(placement, estimator)
  if err is not None:
    raise ValueError(err)
  if placement == "none":
    return "E[r]"
  if placement == "loss" and estimator == "k3":
    return "E[r] - beta*KL(ref||pi)"
  return "E[r] - beta*KL(pi||ref)"


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


def _groups(scores: Array, group_size: int) -> Array:
  if scores.ndim != 1 or scores.shape[0] % group_size != 0:
    raise ValueError(f"scores must be [B] with B a multiple of group_size={group_size}, got "
                     f"shape {scores.shape}")
  return scores.reshape(-1, group_size)


def group_advantages(scores: Array, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> Array:
  """GRPO's outcome advantage (Shao et al. 2024), [B] -> [B]: (r_i - mean_g) / (std_g + eps) over
  the G = group_size samples of each prompt.

  std_g is the sample standard deviation (ddof=1, sqrt(sum_j (r_j - mean_g)^2 / (G - 1))), as in
  TRL's GRPOTrainer (torch.std is unbiased by default; the paper says only "standard deviation"),
  and eps = 1e-4 as there. scale_by_std=False is Dr. GRPO (Liu et al. 2025): r_i - mean_g, which
  equals (G-1)/G times the leave-one-out advantage (`rloo_advantages`), since mean_g includes r_i.
  """
  g = _groups(scores, group_size)
  centred = g - jnp.mean(g, axis=1, keepdims=True)
  if scale_by_std:
    if group_size < 2:
      raise ValueError("std scaling needs group_size >= 2")
    std = jnp.sqrt(jnp.sum(centred ** 2, axis=1, keepdims=True) / (group_size - 1))
    centred = centred / (std + eps)
  return centred.reshape(-1)


def rloo_advantages(scores: Array, group_size: int) -> Array:
  """REINFORCE leave-one-out advantage (Ahmadian et al. 2024), [B] -> [B]:
  r_i - mean_{j != i} r_j = (G r_i - sum_j r_j) / (G - 1). The baseline does not depend on y_i,
  so the policy gradient stays unbiased."""
  if group_size < 2:
    raise ValueError("RLOO needs group_size >= 2")
  g = _groups(scores, group_size)
  loo = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
  return (g - loo).reshape(-1)


def group_zero_variance(scores: Array, group_size: int) -> Array:
  """[B] bool: True on every row of a group whose scores are all (exactly) equal, whose
  group-relative advantages are therefore 0 (DAPO's dynamic sampling, Yu et al. 2025, drops them)."""
  g = _groups(scores, group_size)
  same = jnp.all(g == g[:, :1], axis=1, keepdims=True)
  return jnp.broadcast_to(same, g.shape).reshape(-1)


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


def clipped_surrogate(logp: Array, old_logp: Array, advantages: Array, mask: Array, clip_low,
                      clip_high):
  """Per-token clipped surrogate with asymmetric range ("clip-higher", DAPO, Yu et al. 2025):
  max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = exp(logp - old_logp).

  At r = 1 (on-policy) its gradient is -A grad log pi, the policy gradient.

  Args:
    logp, old_logp: [B, N] token logprobs (nats) under the current and the sampling policy.
    advantages: [B] (one per response, broadcast over its tokens) or [B, N].
    mask: [B, N].
    clip_low, clip_high: floats or traced scalars (never used in Python control flow).

  Returns:
    (per_token [B, N], 0 where mask is 0; metrics: clipfrac (fraction of masked tokens where the
    clipped term is the larger), approx_kl (mean 0.5 * (log r)^2), ratio (mean r)).
  """
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  loss1 = -advantages * ratio
  loss2 = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  per_token = jnp.maximum(loss1, loss2) * mask
  metrics = {"clipfrac": masked_mean((loss2 > loss1).astype(jnp.float32), mask),
             "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),
             "ratio": masked_mean(ratio, mask)}
  return per_token, metrics


def ppo_policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, clip: float):
  """Clipped surrogate: max(-A r, -A clip(r, 1 - c, 1 + c)) with r = exp(logp - old_logp).

  Returns:
    (sum over masked tokens, number of tokens, metrics: clipfrac (fraction of tokens where the
    clipped term is the larger), approx_kl (mean 0.5 * (log r)^2), ratio (mean r)).
  """
  per_token, metrics = clipped_surrogate(logp, old_logp, advantages, mask, clip, clip)
  return jnp.sum(per_token), jnp.sum(mask), metrics


def aggregate(per_token: Array, mask: Array, mode: str, max_len: int | None = None,
              weights: Array | None = None) -> tuple[Array, Array]:
  """Loss aggregation over tokens and sequences, as (sum, count) with the loss = sum / count.

  Sums and counts are added over minibatches and devices before one division, which gives the
  exact global value of:

    token_mean               (DAPO, Yu et al. 2025) sum of all masked token losses / number of
                             masked tokens: every token weighs the same, long responses more.
                             (sum_i w_i sum_t m x, sum_i w_i sum_t m).
    seq_mean_token_mean      (GRPO, Shao et al. 2024) mean over sequences of each sequence's token
                             mean: every sequence weighs the same, so a token of a short response
                             weighs more. (sum_i w_i mean_i, sum_i w_i).
    seq_mean_token_sum_norm  (Dr. GRPO, Liu et al. 2025) mean over sequences of token sum /
                             max_len, max_len a fixed constant (the generation budget): every
                             token weighs 1 / (B * max_len). (sum_i w_i sum_t m x / max_len,
                             sum_i w_i).

  Args:
    per_token: [B, N] per-token losses.
    mask: [B, N].
    mode: one of AGGREGATIONS.
    max_len: the constant of seq_mean_token_sum_norm (required there, unused otherwise).
    weights: [B] row weights (e.g. 0 for rows of zero-variance groups or padding rows). Multiplied
      by "row has a token", which is also the default; a row of weight 0 adds to neither.

  Returns:
    (sum, count) scalars.
  """
  mask = mask.astype(per_token.dtype)
  has_tokens = (jnp.sum(mask, axis=1) > 0).astype(per_token.dtype)
  w = has_tokens if weights is None else weights.astype(per_token.dtype) * has_tokens
  token_sums = jnp.sum(per_token * mask, axis=1)
  lengths = jnp.sum(mask, axis=1)
  if mode == "token_mean":
    return jnp.sum(w * token_sums), jnp.sum(w * lengths)
  if mode == "seq_mean_token_mean":
    return jnp.sum(w * token_sums / jnp.maximum(lengths, 1.0)), jnp.sum(w)
  if mode == "seq_mean_token_sum_norm":
    if max_len is None:
      raise ValueError("seq_mean_token_sum_norm needs max_len (a fixed constant, e.g. max_new_tokens)")
    return jnp.sum(w * token_sums) / max_len, jnp.sum(w)
  raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


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
