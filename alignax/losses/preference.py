"""Preference losses: Bradley-Terry reward modeling, and DPO with its family.

All are pure functions of per-pair arrays ([B]) and return `(sum, count, metrics)`: the sum of
per-pair losses over valid pairs, the number of valid pairs, and scalar metrics (weighted means
over valid pairs). `weights` (default all ones) is the `valid` mask of a batch whose last rows may
be filler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _weights(x: Array, weights: Array | None) -> Array:
  return jnp.ones_like(x, jnp.float32) if weights is None else weights.astype(jnp.float32)


def weighted_mean(x: Array, w: Array) -> Array:
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def weighted_std(x: Array, w: Array) -> Array:
  mean = weighted_mean(x, w)
  return jnp.sqrt(weighted_mean((x - mean) ** 2, w))


def bradley_terry_loss(r_chosen: Array, r_rejected: Array, *, margin: Array | None = None,
                       center_coef: float = 0.0, weights: Array | None = None):
  """Reward-model loss: -log sigmoid(r_c - r_r - m) + coef * (r_c + r_r)^2, per pair.

  The Bradley-Terry model says P(chosen > rejected) = sigmoid(r_c - r_r). The optional margin m
  asks for a larger gap on pairs labeled with a clearer preference (Llama 2, Touvron et al. 2023);
  the centering term (coef * mean((r_c + r_r)^2), Eisenstein et al. 2023) pins the reward scale,
  which the pairwise loss leaves free.

  Args:
    r_chosen, r_rejected: [B] rewards (float32).
    margin: [B] or None.
    center_coef: coefficient of the centering term.
    weights: [B] 1 for real pairs, 0 for filler.

  Returns:
    (sum of losses, number of pairs, metrics: accuracy, margin (mean r_c - r_r), reward_mean,
    reward_std).
  """
  w = _weights(r_chosen, weights)
  diff = r_chosen - r_rejected
  target = diff - (0.0 if margin is None else margin)
  per_pair = -jax.nn.log_sigmoid(target) + center_coef * (r_chosen + r_rejected) ** 2
  both = jnp.concatenate([r_chosen, r_rejected])
  both_w = jnp.concatenate([w, w])
  metrics = {
      "accuracy": weighted_mean((diff > 0).astype(jnp.float32), w),
      "margin": weighted_mean(diff, w),
      "reward_mean": weighted_mean(both, both_w),
      "reward_std": weighted_std(both, both_w),
  }
  return jnp.sum(per_pair * w), jnp.sum(w), metrics
