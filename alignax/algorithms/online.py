"""The pieces every online RL algorithm (PPO, GRPO, RLOO) is composed of.

  RLState          typed frozen state: reference params, reward-model params, KL coefficient
  sample           the compiled rollout: prompts [P, L] -> `Rollout` of P * G rows
  global_*         batch statistics over every device's rows (for pmap)
  validate_kl      the KL options, refused when their gradient is not the KL's they claim
  update_epochs    the reusable `epochs x num_minibatches` scan of guarded optimizer updates
  prompt_batches, load_*, world_evaluate, export_policy: the common part of an RL stage's build

Reward sources are `reward_sources.py`'s; the group methods' iteration is `critic_free.py`'s.
Every piece takes `axis_name` so the same iteration runs under `parallel.mode="pmap"`: batch-level
statistics (advantage whitening, metrics) are reduced over devices, gradient sums and counts are
`psum`'d before the one division, and sampling keys are per global row, so a pmap run draws the
samples a 1-device run draws.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from alignax import checkpoint as ckpt_lib
from alignax.algorithms.common import batch_options
from alignax.algorithms.reward_sources import validate_rewards
from alignax.config import ConfigError
from alignax.data import pipeline, sources
from alignax.generation.sampler import Rollout, SamplingConfig, generate
from alignax.generation.scoring import response_logprobs
from alignax.losses import rl
from alignax.models import lora
from alignax.train.state import TrainState
from alignax.train.step import guarded_update, record_finiteness


class RLState(struct.PyTreeNode):
  """The frozen part of an RL run's state (`TrainState.extra`).

  Attributes:
    ref: the reference policy's params (KL penalty, eval KL).
    reward: the reward model's params, or None when no reward model is used.
    kl_coef: float32 scalar, the KL coefficient beta (moved by PPO's adaptive controller).
  """

  ref: Any
  reward: Any
  kl_coef: jax.Array


# ------------------------------------------------------------------------------------ sampling


def global_rows(n_local: int, axis_name: str | None) -> jax.Array:
  """[n_local] global indices of this device's rows (pmap shards hold consecutive rows)."""
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
  return offset + jnp.arange(n_local, dtype=jnp.int32)


def sample(lm, sampling: SamplingConfig, eos_id: int, pad_id: int, params, batch, key,
           group_size: int = 1, axis_name: str | None = None) -> tuple[Rollout, jax.Array, jax.Array]:
  """Samples `group_size` responses per prompt of a prompt batch.

  Args:
    batch: {"tokens" [P, L], "mask" [P, L], "valid" [P], "index" [P]} (this device's prompts).

  Returns:
    (rollout with B = P * group_size rows, rows of one prompt adjacent and filler rows masked
    out; valid [B]; index [B], the prompt record of each row, -1 for filler).
  """
  rep = lambda x: jnp.repeat(x, group_size, axis=0)
  valid, index = rep(batch["valid"]), rep(batch["index"])
  rows = global_rows(valid.shape[0], axis_name)
  rollout = generate(lm, sampling, eos_id, pad_id, params, batch["tokens"], batch["mask"], key,
                     row_ids=rows, group_size=group_size)
  return rollout.masked(valid), valid, index


def rollout_args(r: Rollout) -> tuple:
  """The (prompt_tokens, prompt_mask, tokens, mask) arguments of the response forwards."""
  return r.prompt_tokens, r.prompt_mask, r.tokens, r.mask


# ------------------------------------------------------------------------ statistics over devices


def global_sum(x, axis_name: str | None):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def global_masked_mean(x: jax.Array, mask: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean of x over masked entries of every device's rows."""
  return global_sum(jnp.sum(x * mask), axis_name) / jnp.maximum(global_sum(jnp.sum(mask), axis_name), 1.0)


def global_whiten(x: jax.Array, mask: jax.Array, axis_name: str | None, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
  """`rl.whiten` with the mean and variance taken over every device's rows (equal to
  `rl.whiten` of the whole batch on one device)."""
  if axis_name is None:
    return rl.whiten(x, mask, shift_mean=shift_mean, eps=eps)
  mean = global_masked_mean(x, mask, axis_name)
  var = global_masked_mean((x - mean) ** 2, mask, axis_name)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask


def row_mean(x: jax.Array, valid: jax.Array, axis_name: str | None) -> jax.Array:
  """Mean of a per-row quantity [B] over valid rows of every device."""
  return global_masked_mean(x, valid, axis_name)


# ----------------------------------------------------------------------------------- KL terms


def validate_kl(section: str, placement: str, estimator: str) -> None:
  """Refuses a KL option whose gradient is not the gradient of the KL it claims (ConfigError)."""
  if placement not in rl.KL_PLACEMENTS:
    raise ConfigError(f"config.{section}.kl_in: must be one of {rl.KL_PLACEMENTS}, got {placement!r}")
  if estimator not in rl.KL_ESTIMATORS:
    raise ConfigError(f"config.{section}.kl_estimator: must be one of {rl.KL_ESTIMATORS}, "
                      f"got {estimator!r}")
  why = rl.kl_option_error(placement, estimator)
  if why:
    raise ConfigError(f"config.{section}.kl_estimator: {estimator!r} with kl_in={placement!r} is "
                      f"refused: {why}")


def reference_params(state: TrainState):
  """The frozen reference policy: `extra.ref`, or for a LoRA run (which holds no copy) the
  policy's base with the adapters off."""
  return lora.reference(state.extra.ref, policy_params(state))


def reference_logprobs(lm, ref_params, rollout: Rollout, temperature) -> jax.Array:
  """[B, N] log pi_ref of the sampled tokens (no gradient)."""
  return jax.lax.stop_gradient(
      response_logprobs(lm, ref_params, *rollout_args(rollout), temperature))


# ------------------------------------------------------------------------------------ update


def update_epochs(loss_fn: Callable, optimizer: optax.GradientTransformation, state: TrainState,
                  experience: dict, key: jax.Array, *, epochs: int, num_minibatches: int,
                  nonfinite_policy: str, axis_name: str | None = None,
                  allowed: jax.Array | bool = True, group_size: int = 1) -> tuple[TrainState, dict]:
  """`epochs` passes over `num_minibatches` shuffled minibatches of `experience`, one guarded
  optimizer update each.

  Args:
    loss_fn: `(params, minibatch, hparams) -> (sum, count, metrics)`; the update follows
      grad(sum) / count, with sums and counts psum'd over `axis_name` first (exact global means).
    experience: a dict of arrays with a leading row axis (this device's rows).
    allowed: False skips every update (e.g. a reward function failed), without counting the
      iteration as non-finite.
    group_size: rows come in adjacent groups of this size (the samples of one prompt); groups
      are shuffled as wholes, so a minibatch holds whole groups.

  Returns:
    (state with params, opt_state, step and guard counters advanced; metrics averaged over
    minibatches, plus `applied`, the fraction of minibatch updates applied).
  """
  b = jax.tree.leaves(experience)[0].shape[0]
  groups = b // group_size
  if groups % num_minibatches:
    raise ConfigError(f"{groups} prompts per device do not split into {num_minibatches} minibatches")
  mb_size = b // num_minibatches
  permitted = (state.halted_at < 0) & allowed
  lr_scale = state.hparam("lr_scale", 1.0)

  def objective(params, mb):
    total, count, metrics = loss_fn(params, mb, state.hparams)
    return total, (count, metrics)

  def minibatch_step(carry, mb):
    params, opt_state, all_ok = carry
    trainable, frozen = lora.partition(params)  # LoRA: adapters (and heads) only
    (total, (count, m)), grads = jax.value_and_grad(
        lambda t, mb: objective(lora.combine(t, frozen), mb), has_aux=True)(trainable, mb)
    if axis_name is not None:
      total, count, grads = jax.lax.psum((total, count, grads), axis_name)
      m = jax.lax.pmean(m, axis_name)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = total / denom
    params, opt_state, finite = guarded_update(params, opt_state, grads, loss, optimizer,
                                               permitted & all_ok, lr_scale)
    m = dict(m, loss=loss, grad_norm=optax.tree.norm(grads))
    applied = finite & permitted & all_ok
    # Under "halt", the first non-finite minibatch freezes the rest of the iteration.
    all_ok = all_ok & (finite | (nonfinite_policy == "skip"))
    return (params, opt_state, all_ok), (m, finite, applied)

  def epoch(carry, epoch_key):
    perm = jax.random.permutation(epoch_key, groups)
    if group_size > 1:
      perm = (perm[:, None] * group_size + jnp.arange(group_size)[None, :]).reshape(-1)
    shuffled = jax.tree.map(lambda x: x[perm].reshape(num_minibatches, mb_size, *x.shape[1:]),
                            experience)
    return jax.lax.scan(minibatch_step, carry, shuffled)

  keys = jax.random.split(key, epochs)
  (params, opt_state, _), (update_m, finite, applied) = jax.lax.scan(
      epoch, (state.params, state.opt_state, jnp.array(True)), keys)
  # An iteration skipped on purpose (allowed=False: a reward function failed) is not a
  # non-finite one: its NaN-free zeros never reached the params.
  finite = jnp.all(finite) | ~jnp.asarray(allowed)
  state = record_finiteness(state.replace(params=params, opt_state=opt_state), finite, nonfinite_policy)
  metrics = {k: jnp.mean(v) for k, v in update_m.items()}
  metrics.update(nonfinite=state.nonfinite, applied=jnp.mean(applied.astype(jnp.float32)))
  return state, metrics


# ------------------------------------------------------------------------------ building a run


def prompt_arrays(prompts) -> pipeline.MapBatches:
  """The prompt iterator's arrays (the records stay on the host), with its state and stats."""
  keys = ("tokens", "mask", "valid", "index")
  return pipeline.MapBatches(prompts, lambda item: {k: item[0][k] for k in keys})


def prompt_source(config):
  """The training prompts of a `RunConfig`."""
  return sources.split_sources(config.data, "prompts", config.world)["train"]


def prompt_batches(ctx, records, prompt_len: int) -> pipeline.MapBatches:
  """Shuffled prompt batches of `train.batch_size` prompts (this process's share), forever."""
  it = pipeline.prompts_pipeline(records, ctx.tokenizer, batch_options(ctx.config),
                                 prompt_len=prompt_len)
  return prompt_arrays(it)


def load_reward(ctx, needed: bool):
  """(reward model, params) of `reward_model.workdir` when `needed`, else (None, None); an
  ensemble export scores by `rewards.ensemble` / `rewards.ensemble_coef`."""
  if not needed:
    return None, None
  from alignax.algorithms.reward import load_reward_model
  rewards = ctx.cfg.rewards
  model, params, _ = load_reward_model(ctx.cfg.reward_model.workdir, ctx.placement,
                                       mode=rewards.get("ensemble", "mean"),
                                       coef=float(rewards.get("ensemble_coef", 1.0)))
  return model, params


def copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)



def world_evaluate(ctx, lm, reward_model):
  """The sampled world evaluation of a policy (gold reward, KL to the reference, and the reward
  model's proxy score when there is one), or None off the world task."""
  config = ctx.config
  if config.data.source != "world" or config.eval.num_prompts <= 0:
    return None
  from alignax.algorithms.reward import score_samples
  from alignax.algorithms.world_eval import WorldEvaluator
  world_eval = WorldEvaluator(config, lm, ctx.tokenizer, ctx.writer)

  def evaluate(state):
    proxy = None
    if reward_model is not None:
      # The frozen reward model's score of the eval samples: proxy vs gold reward shows
      # over-optimization (Gao et al. 2022).
      proxy = lambda samples: score_samples(reward_model, state.extra.reward, samples,
                                            config.eval.batch_size)
    return world_eval(policy_params(state), int(state.step), reference=(lm, reference_params(state)), proxy=proxy)
  return evaluate


def policy_params(state: TrainState):
  """The policy's params: PPO keeps {"policy", "value"}, the critic-free methods the policy only."""
  params = state.params
  return params["policy"] if isinstance(params, dict) and "policy" in params and "value" in params else params


def export_policy(ctx, state: TrainState, stage: str, **extra) -> None:
  ckpt_lib.save_export(ctx.config.workdir, policy_params(state), model=ctx.model, stage=stage,
                       tokenizer=ctx.config.tokenizer, chat_template=ctx.config.data.chat_template,
                       extra={"kl_coef": float(np.asarray(jax.device_get(state.extra.kl_coef))), **extra})


def common_validate(cfg, section: str) -> None:
  """Checks shared by the RL stages' sections (`prompt_len`, `max_new_tokens`, `temperature`,
  `num_minibatches`, `kl_coef`) and the reward sources."""
  s = cfg[section]

  def check(ok, key, msg):
    if not ok:
      raise ConfigError(f"config.{section}.{key}: {msg}")
  check(s.temperature > 0, "temperature", "must be > 0 (the update needs the sampling distribution's "
        "logprobs)")
  check(s.kl_coef >= 0, "kl_coef", "must be >= 0")
  lora_cfg = cfg.model.get("lora") or {}
  if lora_cfg.get("rank", 0) > 0 and lora_cfg.get("dropout", 0.0) > 0:
    # The rollout's logprobs would come from one network and the update's from another (a
    # dropped-out one), so the ratio and the KL would carry dropout noise; TRL turns dropout off
    # in its RL trainers too.
    raise ConfigError("config.model.lora.dropout: must be 0 in the RL stages (ratios and the KL "
                      "would compare the rollout's network with a dropped-out one)")
  check(s.prompt_len + s.max_new_tokens <= cfg.model.max_seq_len, "max_new_tokens",
        f"prompt_len + max_new_tokens exceeds model.max_seq_len={cfg.model.max_seq_len}")
  check(s.num_minibatches >= 1, "num_minibatches", "must be >= 1")
  validate_rewards(cfg)
