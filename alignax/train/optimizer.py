"""The optimizer of `optimizer.*` (`OptimizerConfig`): AdamW behind a warmup + decay schedule,
with global-norm clipping."""

from __future__ import annotations

import jax
import optax

from alignax.train.config import SCHEDULES, OptimizerConfig


def make_schedule(opt_cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine / linear decay to `lr * min_lr_ratio`, or constant."""
  peak, warmup = opt_cfg.lr, opt_cfg.warmup_steps
  end = peak * opt_cfg.min_lr_ratio
  decay_steps = max(int(total_steps) - warmup, 1)
  if opt_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.min_lr_ratio)
  elif opt_cfg.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif opt_cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optimizer.schedule: must be one of {SCHEDULES}, got {opt_cfg.schedule!r}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
  """True for the weight matrices that get weight decay: >= 2-D and not an embedding table."""
  def is_decayed(path, x):
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return x.ndim >= 2 and not names & {"embed", "pos_embed"} and not _is_stacked_vector(path, x)
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def _is_stacked_vector(path, x) -> bool:
  # Scanned blocks stack a leading layer axis, so a per-layer bias or norm scale is 2-D.
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return "blocks" in names and x.ndim == 2


def make_optimizer(opt_cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """Clipping by global norm (if `clip_norm` > 0), then AdamW with the schedule.

  The learning rate lives in the optimizer state (`inject_hyperparams`) so it can be logged.
  """
  schedule = make_schedule(opt_cfg, total_steps)
  mask = None if opt_cfg.decay_embeddings_and_norms else decay_mask
  adamw = optax.inject_hyperparams(optax.adamw)(
      learning_rate=schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
      weight_decay=opt_cfg.weight_decay, mask=mask)
  parts = []
  if opt_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
  parts.append(adamw)
  return optax.chain(*parts)


def current_lr(opt_state) -> jax.Array | None:
  """The learning rate the next update will use, read from the injected hyperparameters."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
    if hasattr(s, "hyperparams"):
      return s.hyperparams["learning_rate"]
  return None


def effective_lr(state) -> jax.Array | None:
  """The learning rate a TrainState's next update uses: the schedule's value times the run's
  `lr_scale` hyperparameter (how a vectorized sweep gives each member its own rate)."""
  lr = current_lr(state.opt_state)
  return None if lr is None else lr * state.hparam("lr_scale", 1.0)
