"""Masked reductions every loss shares: means over the entries a mask (or weight) selects."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_mean(x: Array, mask: Array) -> Array:
  """sum(x * mask) / sum(mask), 0 when the mask is empty; `mask` may be 0/1 or weights (same
  shape as `x`, or broadcastable)."""
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_var(x: Array, mask: Array) -> Array:
  """The (biased) variance of x over the masked entries."""
  mean = masked_mean(x, mask)
  return masked_mean((x - mean) ** 2, mask)
