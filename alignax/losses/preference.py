"""Preference losses: Bradley-Terry reward modeling, and DPO with its family.

All are pure functions of per-pair arrays ([B]) and return `(sum, count, metrics)`: the sum of
per-pair losses over valid pairs, the number of valid pairs, and scalar metrics (weighted means
over valid pairs). `weights` (default all ones) is the `valid` mask of a batch whose last rows may
be filler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax.losses.masked import masked_mean, masked_var

Array = jax.Array


def _weights(x: Array, weights: Array | None) -> Array:
  return jnp.ones_like(x, jnp.float32) if weights is None else weights.astype(jnp.float32)


def weighted_std(x: Array, w: Array) -> Array:
  return jnp.sqrt(masked_var(x, w))


def bradley_terry_loss(r_chosen: Array, r_rejected: Array, *, margin: Array | None = None,
                       target_prob: Array | None = None, center_coef: float = 0.0,
                       weights: Array | None = None):
  """Reward-model loss: -log sigmoid(r_c - r_r - m) + coef * (r_c + r_r)^2, per pair.

  The Bradley-Terry model says P(chosen > rejected) = sigmoid(r_c - r_r). The optional margin m
  asks for a larger gap on pairs labeled with a clearer preference (Llama 2, Touvron et al. 2023);
  the centering term (coef * mean((r_c + r_r)^2), Eisenstein et al. 2023) pins the reward scale,
  which the pairwise loss leaves free.

  With a soft label p = `target_prob` (P(chosen is better), e.g. an AI judge's, as in RLAIF /
  Constitutional AI, Bai et al. 2022) the pairwise term is the cross-entropy against p,
  -(p log sigmoid(d) + (1 - p) log sigmoid(-d)) with d = r_c - r_r - m: minimized at
  sigmoid(d) = p, so p = 0.5 pulls the gap to 0 and p = 0 is the swapped pair. p = 1 is the hard
  label's loss; None computes exactly today's hard-label loss.

  Args:
    r_chosen, r_rejected: [B] rewards (float32).
    margin: [B] or None.
    target_prob: [B] P(chosen is better) in [0, 1], or None (hard labels, p = 1).
    center_coef: coefficient of the centering term.
    weights: [B] 1 for real pairs, 0 for filler.

  Returns:
    (sum of per-pair losses in nats, number of pairs, metrics: accuracy, margin (mean r_c -
    r_r), reward_mean, reward_std).
  """
  w = _weights(r_chosen, weights)
  diff = r_chosen - r_rejected
  target = diff - (0.0 if margin is None else margin)
  if target_prob is None:
    pairwise = -jax.nn.log_sigmoid(target)
  else:
    p = target_prob.astype(jnp.float32)
    # log_sigmoid on both sides: finite for any gap (log(1 - sigmoid(d)) would be log 0).
    pairwise = -(p * jax.nn.log_sigmoid(target) + (1 - p) * jax.nn.log_sigmoid(-target))
  per_pair = pairwise + center_coef * (r_chosen + r_rejected) ** 2
  both = jnp.concatenate([r_chosen, r_rejected])
  both_w = jnp.concatenate([w, w])
  metrics = {
      "accuracy": masked_mean((diff > 0).astype(jnp.float32), w),
      "margin": masked_mean(diff, w),
      "reward_mean": masked_mean(both, both_w),
      "reward_std": weighted_std(both, both_w),
  }
  return jnp.sum(per_pair * w), jnp.sum(w), metrics


# ---------------------------------------------------------------------------------------------
# Direct preference optimization and its family. Inputs are per-sequence sums of response-token
# logprobs (nats) under the policy (pc, pr) and the frozen reference (rc, rr), and response lengths
# (tokens) for the length-normalized losses.

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo")


def _implicit_metrics(pc, pr, rc, rr, beta, w):
  reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
  return {
      "rewards/chosen": masked_mean(reward_c, w),
      "rewards/rejected": masked_mean(reward_r, w),
      "rewards/accuracy": masked_mean((reward_c > reward_r).astype(jnp.float32), w),
      "rewards/margin": masked_mean(reward_c - reward_r, w),
      "logps/chosen": masked_mean(pc, w),
      "logps/rejected": masked_mean(pr, w),
  }


SOFT_LABEL_LOSS_TYPES = ("sigmoid",)  # the loss types that take per-pair soft labels


def soft_label_eps(target_prob: Array, label_smoothing) -> Array:
  """[B] per-pair cDPO eps of soft labels p = `target_prob` [B] under label smoothing eps0:
  eps_eff = eps0 + (1 - 2 eps0) (1 - p), i.e. P(chosen better) = (1 - eps0) p + eps0 (1 - p),
  the judge's p with the label then flipped at rate eps0. p = 1 gives eps0 exactly, eps0 = 0
  gives 1 - p."""
  q = 1 - target_prob.astype(jnp.float32)
  return label_smoothing + (1 - 2 * label_smoothing) * q


def dpo_loss(loss_type: str, pc: Array, pr: Array, rc: Array | None, rr: Array | None, *,
             beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
             len_chosen: Array | None = None, len_rejected: Array | None = None,
             target_prob: Array | None = None, weights: Array | None = None):
  """The preference loss `loss_type`, per pair, with h = (pc - rc) - (pr - rr):

    sigmoid  DPO (Rafailov et al. 2023), with label smoothing eps = conservative DPO (cDPO):
             -(1 - eps) log s(beta h) - eps log s(-beta h); with soft labels p =
             `target_prob`, the same with a per-pair eps = `soft_label_eps(p, eps)` (eps + (1 -
             2 eps)(1 - p); 1 - p without label smoothing): the cross-entropy of s(beta h)
             against P(chosen better)
    robust   robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate eps:
             (-(1 - eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)
    ipo      IPO (Azar et al. 2023): (h - 1 / (2 beta))^2
    hinge    SLiC-HF (Zhao et al. 2023): max(0, 1 - beta h)
    simpo    SimPO (Meng et al. 2024), reference-free, length-normalized:
             -log s(beta (pc / |yc| - pr / |yr|) - gamma)
    orpo     ORPO (Hong et al. 2024), reference-free: -pc / |yc| (the chosen NLL per token)
             + beta * -log s(log odds(yc) - log odds(yr)), log odds(y) = a - log(1 - e^a) with
             a = mean token logprob of y

  Args:
    pc, pr: [B] policy logprob sums of chosen / rejected responses.
    rc, rr: [B] reference logprob sums (unused, may be None, for simpo and orpo).
    beta: inverse temperature (ORPO: the weight of the odds-ratio term).
    label_smoothing: eps for sigmoid / robust.
    gamma: SimPO's target margin.
    len_chosen, len_rejected: [B] response lengths in tokens (simpo, orpo).
    target_prob: [B] soft labels P(chosen is better) in [0, 1] (sigmoid only; the other losses
      raise ValueError), or None: hard labels, exactly the loss without the argument.
    weights: [B] 1 for real pairs, 0 for filler.

  Returns:
    (sum of per-pair losses in nats, number of pairs, metrics): implicit rewards beta * (log pi - log ref)
    of chosen and rejected (for the reference-free losses, beta * mean token logprob), their
    accuracy and margin, and the logprobs.
  """
  w = _weights(pc, weights)
  if target_prob is not None and loss_type not in SOFT_LABEL_LOSS_TYPES:
    raise ValueError(f"soft labels (target_prob) are defined for loss types "
                     f"{SOFT_LABEL_LOSS_TYPES}, not {loss_type!r}")
  if loss_type in ("simpo", "orpo"):
    if len_chosen is None or len_rejected is None:
      raise ValueError(f"{loss_type} needs response lengths")
    ac = pc / jnp.maximum(len_chosen, 1)
    ar = pr / jnp.maximum(len_rejected, 1)
    if loss_type == "simpo":
      per_pair = -jax.nn.log_sigmoid(beta * (ac - ar) - gamma)
    else:
      # log(1 - e^a) for a < 0, computed stably; a is clamped just below 0 for a sure response.
      def log_odds(a):
        a = jnp.minimum(a, -1e-6)
        return a - jnp.log(-jnp.expm1(a))
      per_pair = -ac - beta * jax.nn.log_sigmoid(log_odds(ac) - log_odds(ar))
    metrics = _implicit_metrics(ac, ar, 0.0, 0.0, beta, w)
    metrics.update({"logps/chosen": masked_mean(pc, w), "logps/rejected": masked_mean(pr, w)})
    return jnp.sum(per_pair * w), jnp.sum(w), metrics
  if rc is None or rr is None:
    raise ValueError(f"{loss_type} needs reference logprobs")
  h = (pc - rc) - (pr - rr)
  eps = label_smoothing if target_prob is None else soft_label_eps(target_prob, label_smoothing)
  if loss_type == "sigmoid":
    per_pair = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
  elif loss_type == "robust":
    per_pair = (-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * eps)
  elif loss_type == "ipo":
    per_pair = (h - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == "hinge":
    per_pair = jax.nn.relu(1.0 - beta * h)
  else:
    raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES + ('kto',)}, got {loss_type!r}")
  return jnp.sum(per_pair * w), jnp.sum(w), _implicit_metrics(pc, pr, rc, rr, beta, w)


def kto_loss(policy: Array, ref: Array, desirable: Array, kl_ref: Array, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             weights: Array | None = None):
  """KTO (Ethayarajh et al. 2024) for unpaired data, per example:

    r = log pi(y|x) - log ref(y|x);  z = max(0, kl_ref) (no gradient)
    desirable:   w_D * (1 - s(beta (r - z)))
    undesirable: w_U * (1 - s(beta (z - r)))

  `kl_ref` is the reference point: an estimate of KL(pi || ref) from mismatched (prompt,
  completion) pairs of the batch.

  Args:
    policy, ref: [B] logprob sums of the completions.
    desirable: [B] 1 for desirable completions, 0 for undesirable.
    kl_ref: scalar.

  Returns:
    (sum, count, metrics: rewards/desirable, rewards/undesirable, kl).
  """
  w = _weights(policy, weights)
  d = desirable.astype(jnp.float32)
  z = jax.lax.stop_gradient(jnp.maximum(kl_ref, 0.0))
  r = policy - ref
  per = (d * desirable_weight * (1 - jax.nn.sigmoid(beta * (r - z)))
         + (1 - d) * undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - r))))
  metrics = {"rewards/desirable": masked_mean(beta * r, w * d),
             "rewards/undesirable": masked_mean(beta * r, w * (1 - d)), "kl": z}
  return jnp.sum(per * w), jnp.sum(w), metrics
