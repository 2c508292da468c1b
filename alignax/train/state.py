"""TrainState: everything a run carries from one step to the next, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  """The state of a run.

  Attributes:
    step: int32 scalar, steps attempted so far (skipped non-finite steps included, so the data
      position and the step number never drift apart).
    params: the trained parameters (an `nnx.State` or any pytree).
    opt_state: optax state over `params`.
    rng: a typed PRNG key; each step derives its randomness from (rng, step), never by splitting
      a carried key, so resuming at step s reproduces the same numbers.
    nonfinite: int32 scalar, steps whose loss or gradient was not finite (their update was skipped).
    halted_at: int32 scalar, the first non-finite step under the "halt" policy, -1 if none; once
      set, updates stop, so params stay those of the last good step.
    extra: algorithm-specific arrays (frozen reference params, a KL coefficient, ...); a pytree or None.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite: jax.Array
  halted_at: jax.Array
  extra: Any = None

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array, extra=None):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng,
               nonfinite=jnp.zeros((), jnp.int32), halted_at=jnp.full((), -1, jnp.int32), extra=extra)

  def step_rng(self) -> jax.Array:
    """The key for this step: a pure function of the run's key and the step number."""
    return jax.random.fold_in(self.rng, self.step)
