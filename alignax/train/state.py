"""TrainState: everything a run carries from one step to the next, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from alignax.models.lora import trainable_of


class TrainState(struct.PyTreeNode):
  """The state of a run.

  Attributes:
    step: int32 scalar, steps attempted so far (skipped non-finite steps included, so the data
      position and the step number never drift apart).
    params: the trained parameters (an `nnx.State` or any pytree).
    opt_state: optax state over `params` (over its adapters and heads only when it holds LoRA
      adapters: `alignax.models.lora.partition`).
    rng: a typed PRNG key; each step derives its randomness from (rng, step), never by splitting
      a carried key, so resuming at step s reproduces the same numbers.
    nonfinite: int32 scalar, steps whose loss or gradient was not finite (their update was skipped).
    halted_at: int32 scalar, the first non-finite step under the "halt" policy, -1 if none; once
      set, updates stop, so params stay those of the last good step.
    extra: algorithm-specific arrays (frozen reference params, a KL coefficient, ...); a pytree or None.
    hparams: the run's continuous hyperparameters as float32 scalars, `{name: array}` (DPO's
      `beta`, PPO's `clip`, ...; `lr_scale` multiplies every optimizer update). They reach the
      step as data, never as Python constants, so one compiled step serves any value and a
      sweep can stack runs on a leading axis and vmap over them.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite: jax.Array
  halted_at: jax.Array
  extra: Any = None
  hparams: Any = None

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array, extra=None,
             hparams: dict | None = None):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable_of(params)), rng=rng,
               nonfinite=jnp.zeros((), jnp.int32), halted_at=jnp.full((), -1, jnp.int32), extra=extra,
               hparams=as_hparams(hparams))

  def hparam(self, name: str, default: float | None = None) -> jax.Array:
    """The hyperparameter `name` (a float32 scalar), or `default` when the run has none."""
    if self.hparams is not None and name in self.hparams:
      return self.hparams[name]
    if default is None:
      raise KeyError(f"hyperparameter {name!r} is not in this run's state")
    return jnp.asarray(default, jnp.float32)

  def step_rng(self) -> jax.Array:
    """The key for this step: a pure function of the run's key and the step number."""
    return jax.random.fold_in(self.rng, self.step)


def as_hparams(values: dict | None) -> dict:
  """`{name: float32 scalar}` with `lr_scale` (1 unless given), for `TrainState.hparams`."""
  out = {"lr_scale": jnp.asarray(1.0, jnp.float32)}
  for name, value in (values or {}).items():
    out[name] = jnp.asarray(value, jnp.float32)
  return out
