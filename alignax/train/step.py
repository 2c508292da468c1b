"""The update every stage shares: gradient accumulation, clipping, the non-finite guard.

A loss function has the signature

  loss_fn(params, batch, rng, extra, hparams) -> (loss_sum, count, metrics)

where `loss_sum / count` is the mean the gradient should follow (per token for LM losses, per
sequence for preference losses). Accumulating sums and counts over micro-batches and dividing
once makes k micro-batches give exactly the gradient of one big batch. `metrics` holds scalars
that are averaged over micro-batches. `extra` and `hparams` are the state's (frozen arrays such as
a reference model; the continuous hyperparameters as arrays, see `TrainState`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from alignax.errors import ConfigError
from alignax.models import lora
from alignax.train.config import NONFINITE_POLICIES
from alignax.train.optimizer import effective_lr
from alignax.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array, Any, Any], tuple[jax.Array, jax.Array, dict]]


def split_microbatches(batch, accum_steps: int):
  """Reshapes every leaf [N, ...] -> [accum_steps, N // accum_steps, ...]."""
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f"batch dimension {x.shape[0]} is not divisible by accum_steps={accum_steps}")
    return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
  return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, params, batch, rng: jax.Array, extra=None,
                         accum_steps: int = 1, hparams=None):
  """Sums of loss, count and gradients over `accum_steps` micro-batches of `batch`.

  Returns:
    (loss_sum, count, grad_sum, metrics) where grad_sum is the gradient of loss_sum with respect
    to `lora.trainable_of(params)` (all of params without LoRA) and metrics are averaged over
    micro-batches.
  """
  # With LoRA only the adapters (and any heads) are differentiated: the frozen bases are
  # closed over, so no gradient the size of the model is ever computed.
  trainable, frozen = lora.partition(params)

  def grads_of(mb, key):
    def objective(t):
      p = lora.with_dropout_key(lora.combine(t, frozen), jax.random.fold_in(key, 0x10a))
      total, count, metrics = loss_fn(p, mb, key, extra, hparams)
      return total, (count, metrics)
    (total, (count, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    return total, count, grads, metrics

  if accum_steps == 1:
    return grads_of(batch, rng)

  def body(carry, xs):
    total, count, grads = carry
    mb, i = xs
    t, c, g, m = grads_of(mb, jax.random.fold_in(rng, i))
    return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), m

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  (total, count, grads), metrics = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros),
      (split_microbatches(batch, accum_steps), jnp.arange(accum_steps)))
  return total, count, grads, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_update(params, opt_state, grads, loss: jax.Array, optimizer: optax.GradientTransformation,
                   allowed: jax.Array | bool = True, lr_scale: jax.Array | None = None):
  """One optax update that is applied only when loss, gradients and the updated params are
  finite (and `allowed`).

  The params are checked too because finite gradients can still give a non-finite update (an
  optimizer state that overflowed, a division by a zero second moment).

  `lr_scale` multiplies the update (AdamW's whole update is proportional to the learning rate,
  weight decay included, so this scales the learning rate exactly).

  Returns:
    (params, opt_state, finite): the updated or untouched params and optimizer state, and
    whether this step's loss, gradients and updated params were finite.
  """
  params, frozen = lora.partition(params)  # grads and optimizer state cover the trainable part
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  if lr_scale is not None:
    updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(new_params)
  ok = finite & allowed
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return lora.combine(keep(new_params, params), frozen), keep(new_opt_state, opt_state), finite


def record_finiteness(state: TrainState, finite: jax.Array, nonfinite_policy: str) -> TrainState:
  """Advances `state.step` and the guard's counters after an update (see `apply_gradients`)."""
  if nonfinite_policy not in NONFINITE_POLICIES:
    raise ValueError(f"train.nonfinite: must be one of {NONFINITE_POLICIES}, got {nonfinite_policy!r}")
  halted_at = state.halted_at
  if nonfinite_policy == "halt":
    halted_at = jnp.where((halted_at < 0) & ~finite, state.step, halted_at)
  return state.replace(step=state.step + 1, nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
                       halted_at=halted_at)


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation,
                    loss: jax.Array, nonfinite_policy: str = "skip"):
  """One optimizer update of `state.params`, guarded against a non-finite loss, gradient or
  update.

  A non-finite step leaves params and optimizer state untouched and is counted. Under "halt" the
  first such step is recorded in `halted_at` and every later update is skipped too, so the loop
  can stop with the params of the last good step.

  Returns:
    (new state with step + 1, metrics: grad_norm (before clipping), lr, nonfinite, applied).
  """
  allowed = state.halted_at < 0
  lr = effective_lr(state)
  params, opt_state, finite = guarded_update(state.params, state.opt_state, grads, loss, optimizer,
                                             allowed, state.hparam("lr_scale", 1.0))
  new_state = record_finiteness(state.replace(params=params, opt_state=opt_state), finite,
                                nonfinite_policy)
  metrics = {"grad_norm": optax.tree.norm(grads), "nonfinite": new_state.nonfinite,
             "applied": (finite & allowed).astype(jnp.float32)}
  if lr is not None:
    metrics["lr"] = lr
  return new_state, metrics


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    accum_steps: int = 1, nonfinite_policy: str = "skip",
                    axis_name: str | None = None):
  """`train_step(state, batch) -> (state, metrics)` for a loss of the form documented above.

  With `axis_name` (the step runs under `jax.pmap` / `shard_map`, `batch` being this device's
  rows) loss sums, counts and gradient sums are `lax.psum`'d over the axis before dividing, so
  loss and update equal those of the whole batch on one device (a mean of per-device means
  would not be: devices hold different numbers of loss tokens). The loss function's own metrics
  are averaged over devices (`pmean`), as they are over micro-batches. Each device folds its
  axis index into the step's key, so random draws differ between devices.

  The returned function carries `axis_name` and `with_axis_name(name) -> train_step`, which a
  pmap placement uses to rebind a step built without one.

  metrics: loss (loss_sum / count), count, the loss function's own metrics, and the update's.
  """
  def train_step(state: TrainState, batch):
    rng = state.step_rng()
    if axis_name is not None:
      rows = jax.tree.leaves(batch)[0].shape[0]
      if rows % accum_steps:
        raise ConfigError(f"config.train.accum_steps: {accum_steps} does not divide the {rows} rows "
                          f"each device gets in parallel.mode='pmap' (train.batch_size / devices)")
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    total, count, grad_sum, metrics = accumulate_gradients(
        loss_fn, state.params, batch, rng, state.extra, accum_steps, state.hparams)
    if axis_name is not None:
      # --- pmap: sum over devices first, divide once (exact global-batch mean) ---
      total, count, grad_sum = jax.lax.psum((total, count, grad_sum), axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    loss = total / denom
    state, update_metrics = apply_gradients(state, grads, optimizer, loss, nonfinite_policy)
    return state, {"loss": loss, "count": count, **metrics, **update_metrics}

  train_step.axis_name = axis_name
  train_step.with_axis_name = lambda name: make_train_step(
      loss_fn, optimizer, accum_steps=accum_steps, nonfinite_policy=nonfinite_policy,
      axis_name=name)
  return train_step
