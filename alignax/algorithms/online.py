"""The pieces every online RL algorithm (PPO, GRPO, RLOO) is composed of.

  RLState          typed frozen state: reference params, reward-model params, KL coefficient
  sample           the compiled rollout: prompts [B, P] (each repeated G times) -> `Rollout`
  RewardSources    where scores come from: a reward-model export (in the compiled iteration), Python
                   functions `module:function(prompts, responses) -> scores` run on the host
                   between the rollout and the update (`jax.pure_callback`, no recompilation per
                   call), the world's gold labeler as one such function, or a weighted sum
  update_epochs    the reusable `epochs x num_minibatches` scan of guarded optimizer updates
  kl_penalty_*     the KL term in the reward or in the loss, as `rl.kl_objective` documents
  build_rl_run     prompts pipeline, reference/reward loading, state, evaluation: the common part
                   of an RL stage's `build`

Every piece takes `axis_name` so the same iteration runs under `parallel.mode="pmap"`: batch-level
statistics (advantage whitening, metrics) are reduced over devices, gradient sums and counts are
`psum`'d before the one division, and sampling keys are per global row, so a pmap run draws the
samples a 1-device run draws.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from alignax import checkpoint as ckpt_lib
from alignax.algorithms.common import process_batch_size, shard_args
from alignax.config import ConfigDict, ConfigError
from alignax.data import pipeline, sources
from alignax.generation.sampler import Rollout, SamplingConfig, generate
from alignax.generation.scoring import grouped_response_logprobs, response_logprobs, response_scores
from alignax.losses import rl
from alignax.train.optimizer import current_lr
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


class RewardFunctionError(RuntimeError):
  """A Python reward function raised, returned the wrong shape, or returned a non-finite score."""


# ------------------------------------------------------------------------------------ sampling


def axis_size(axis_name: str | None) -> int:
  return 1 if axis_name is None else jax.lax.psum(1, axis_name)


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


# ------------------------------------------------------------------------------- reward sources


@dataclasses.dataclass(frozen=True)
class RewardFunction:
  """A host-side reward: `fn(prompts, responses[, ended=..., records=...]) -> [n] scores`."""

  name: str  # "module:function", as the config names it
  fn: Callable
  weight: float
  wants: tuple[str, ...]  # which of the optional keyword arguments fn accepts

  def __call__(self, prompts, responses, ended, records) -> np.ndarray:
    kwargs = {}
    if "ended" in self.wants:
      kwargs["ended"] = list(ended)
    if "records" in self.wants:
      kwargs["records"] = list(records)
    return self.fn(list(prompts), list(responses), **kwargs)


def load_reward_function(spec: str, key: str = "rewards.functions") -> RewardFunction:
  """`module:function[=weight]` -> a RewardFunction, or a ConfigError naming the key."""
  name, _, weight = spec.strip().partition("=")
  module_name, _, attr = name.partition(":")
  if not module_name or not attr:
    raise ConfigError(f"config.{key}: {spec!r} is not 'module:function[=weight]'")
  try:
    w = float(weight) if weight else 1.0
  except ValueError:
    raise ConfigError(f"config.{key}: weight {weight!r} of {name} is not a number") from None
  try:
    fn = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"config.{key}: cannot load {name}: {type(e).__name__}: {e}") from None
  if not callable(fn):
    raise ConfigError(f"config.{key}: {name} is not callable")
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    params = {}
  return RewardFunction(name=name, fn=fn, weight=w,
                        wants=tuple(k for k in ("ended", "records") if k in params))


def rewards_section(model: float = 1.0, functions: str = "") -> ConfigDict:
  """`rewards.*`: where RL scores come from (a weighted sum of every source with weight != 0).

  model: weight of the reward-model export named by `reward_model.workdir` (0 = not used).
  functions: comma-separated `module:function[=weight]` Python reward functions, e.g.
    `alignax.tasks.world_gold:gold_reward` (the world's true reward: RL's upper bound).
  """
  return ConfigDict(dict(model=model, functions=functions))


class HostRewards:
  """The Python reward functions of a run, called from the compiled iteration on the host.

  `__call__` runs inside `jax.pure_callback`; a failure there (exception, wrong shape,
  non-finite score) is recorded, not raised (an exception would surface as an opaque XLA
  error), and the iteration gets `ok = False`, which skips its update. `check()`, called by
  the loop after the step, raises it as a RewardFunctionError naming the function and the
  record.
  """

  def __init__(self, functions: Sequence[RewardFunction], records, tokenizer):
    self.functions, self.records, self.tokenizer = tuple(functions), records, tokenizer
    self._error: str | None = None
    self._lock = threading.Lock()

  def _decode(self, tokens, mask) -> list[str]:
    out = []
    for row, m in zip(tokens, mask):
      ids = [int(t) for t, keep in zip(row, m) if keep > 0 and int(t) != self.tokenizer.eos_id]
      out.append(self.tokenizer.decode(ids))
    return out

  def _fail(self, message: str) -> None:
    with self._lock:
      if self._error is None:
        self._error = message

  def _one(self, f: RewardFunction, prompts, responses, ended, records, idx) -> np.ndarray | None:
    n = len(prompts)
    try:
      out = np.asarray(f(prompts, responses, ended, records), np.float64)
    except Exception as e:  # find the first record it fails on, for the message
      culprit = None
      for i in range(n):
        try:
          f(prompts[i:i + 1], responses[i:i + 1], ended[i:i + 1], records[i:i + 1])
        except Exception:
          culprit = i
          break
      where = (f"on prompt record {idx[culprit]} ({_short(prompts[culprit])}, response "
               f"{_short(responses[culprit])})" if culprit is not None else f"on a batch of {n} responses")
      self._fail(f"reward function {f.name} raised {type(e).__name__}: {e} {where}")
      return None
    if out.shape != (n,):
      self._fail(f"reward function {f.name} returned shape {out.shape} for {n} responses "
                 f"(expected ({n},)); first prompt record {idx[0]}")
      return None
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
      i = int(bad[0])
      self._fail(f"reward function {f.name} returned {out[i]} for prompt record {idx[i]} "
                 f"({_short(prompts[i])}, response {_short(responses[i])})")
      return None
    return out

  def __call__(self, index, tokens, mask, ended):
    index, tokens, mask, ended = (np.asarray(a) for a in (index, tokens, mask, ended))
    n = len(index)
    total = np.zeros(n, np.float64)
    live = np.flatnonzero(index >= 0)
    if live.size:
      idx = [int(i) for i in index[live]]
      records = [self.records[i] for i in idx]
      prompts = [r["prompt"] for r in records]
      responses = self._decode(tokens[live], mask[live])
      ended_live = [bool(e) for e in ended[live]]
      for f in self.functions:
        out = self._one(f, prompts, responses, ended_live, records, idx)
        if out is None:
          return np.zeros(n, np.float32), np.array(False)
        total[live] += f.weight * out
    return total.astype(np.float32), np.array(True)

  def check(self) -> None:
    with self._lock:
      error, self._error = self._error, None
    if error is not None:
      raise RewardFunctionError(error)


def _short(x, n: int = 60) -> str:
  text = x if isinstance(x, str) else str(x)
  return repr(text if len(text) <= n else text[: n - 1] + "…")


class RewardSources:
  """Scores of a rollout: w_model * reward model + sum_f w_f * f(prompts, responses).

  Built once per run; `score` is traced into the compiled iteration.
  """

  def __init__(self, reward_model=None, model_weight: float = 0.0, host: HostRewards | None = None):
    self.reward_model, self.model_weight, self.host = reward_model, float(model_weight), host
    if reward_model is None and host is None:
      raise ConfigError("config.rewards: no reward source (set rewards.model > 0 with "
                        "reward_model.workdir, or rewards.functions)")

  @property
  def uses_model(self) -> bool:
    return self.reward_model is not None

  def score(self, rl_state: RLState, rollout: Rollout, index: jax.Array):
    """(scores [B] float32, ok: scalar bool, metrics). `ok` is False when a host function failed
    (its scores are then 0 and the update must be skipped)."""
    scores = jnp.zeros(rollout.tokens.shape[0], jnp.float32)
    metrics, ok = {}, jnp.array(True)
    if self.reward_model is not None:
      rm = response_scores(self.reward_model, rl_state.reward, *rollout_args(rollout))
      metrics["score_model"] = rm
      scores = scores + self.model_weight * rm
    if self.host is not None:
      shapes = (jax.ShapeDtypeStruct(scores.shape, jnp.float32), jax.ShapeDtypeStruct((), jnp.bool_))
      fn_scores, fn_ok = jax.pure_callback(self.host, shapes, index, rollout.tokens, rollout.mask,
                                           rollout.ended, vmap_method="sequential")
      metrics["score_functions"] = fn_scores
      scores, ok = scores + fn_scores, fn_ok
    return scores, ok, metrics

  def check(self) -> None:
    if self.host is not None:
      self.host.check()


def make_reward_sources(cfg, tokenizer, records, reward_model=None) -> RewardSources:
  """The run's reward sources from `cfg.rewards` (the reward model already loaded when used)."""
  specs = [s for s in str(cfg.rewards.functions).split(",") if s.strip()]
  host = None
  if specs:
    host = HostRewards([load_reward_function(s) for s in specs], records, tokenizer)
  weight = float(cfg.rewards.model)
  return RewardSources(reward_model if weight != 0 else None, weight, host)


def needed_upstream(cfg) -> tuple[str, ...]:
  """The upstream runs a critic-free RL config uses: the policy's, and the reward model's when
  `rewards.model` weighs it."""
  return ("init", "reward_model") if float(cfg.rewards.model) != 0 else ("init",)


def validate_rewards(cfg) -> None:
  """Checks `rewards.*` before anything compiles (the functions must import)."""
  specs = [s for s in str(cfg.rewards.functions).split(",") if s.strip()]
  for s in specs:
    load_reward_function(s)
  if float(cfg.rewards.model) != 0 and not cfg.reward_model.workdir:
    raise ConfigError("config.reward_model.workdir: rewards.model != 0 needs a reward-model run")
  if float(cfg.rewards.model) == 0 and not specs:
    raise ConfigError("config.rewards: no reward source (rewards.model is 0 and rewards.functions "
                      "is empty)")


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


def reference_logprobs(lm, rl_state: RLState, rollout: Rollout, temperature) -> jax.Array:
  """[B, N] log pi_ref of the sampled tokens (no gradient)."""
  return jax.lax.stop_gradient(
      response_logprobs(lm, rl_state.ref, *rollout_args(rollout), temperature))


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
    (total, (count, m)), grads = jax.value_and_grad(objective, has_aux=True)(params, mb)
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


def prompt_source(cfg):
  return sources.split_sources(cfg, "prompts")["train"]


def prompt_batches(ctx, records, prompt_len: int) -> pipeline.MapBatches:
  """Shuffled prompt batches of `train.batch_size` prompts (this process's share), forever."""
  cfg = ctx.cfg
  batch = process_batch_size(int(cfg.train.batch_size))
  it = pipeline.prompts_pipeline(records, ctx.tokenizer, batch_size=batch, prompt_len=prompt_len,
                                 bad_records=cfg.data.bad_records, chat_template=cfg.data.chat_template,
                                 shuffle=True, seed=int(cfg.seed), num_epochs=None, **shard_args())
  return prompt_arrays(it)


def load_policy_and_reference(ctx):
  """(lm, init params, a separate copy for the reference) of the `init.workdir` export."""
  from alignax.models import abstract_lm
  lm, abstract = abstract_lm(ctx.model)
  params, _ = ckpt_lib.load_export(ctx.cfg.init.workdir, abstract, ctx.placement.state_sharding(abstract))
  return lm, params


def load_reward(ctx, needed: bool):
  """(reward model, params) of `reward_model.workdir` when `needed`, else (None, None)."""
  if not needed:
    return None, None
  from alignax.algorithms.reward import load_reward_model
  model, params, _ = load_reward_model(ctx.cfg.reward_model.workdir, ctx.placement)
  return model, params


def copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)


def check_rewards_after_step(sources_: RewardSources):
  """The loop's `after_step` hook for runs with host reward functions: waits for the step's
  callback and raises its failure, if any (see HostRewards)."""
  if sources_.host is None:
    return None

  def after_step(step: int, metrics) -> None:
    jax.block_until_ready(metrics["reward_ok"])
    try:
      sources_.check()
    except RewardFunctionError as e:
      raise RewardFunctionError(f"{e}; iteration {step} was not applied, and a checkpoint is saved "
                                f"at step {step}, so fixing the function and rerunning resumes after "
                                f"it") from None
  return after_step


def world_evaluate(ctx, lm, reward_model):
  """The sampled world evaluation of a policy (gold reward, KL to the reference, and the reward
  model's proxy score when there is one), or None off the world task."""
  cfg = ctx.cfg
  if cfg.data.source != "world" or int(cfg.eval.num_prompts) <= 0:
    return None
  from alignax.algorithms.reward import score_samples
  from alignax.algorithms.world_eval import WorldEvaluator
  world_eval = WorldEvaluator(cfg, lm, ctx.tokenizer, ctx.writer)

  def evaluate(state):
    proxy = None
    if reward_model is not None:
      # The frozen reward model's score of the eval samples: proxy vs gold reward shows
      # over-optimization (Gao et al. 2022).
      proxy = lambda samples: score_samples(reward_model, state.extra.reward, samples,
                                            int(cfg.eval.batch_size))
    return world_eval(policy_params(state), int(state.step), reference=(lm, state.extra.ref), proxy=proxy)
  return evaluate


def policy_params(state: TrainState):
  """The policy's params: PPO keeps {"policy", "value"}, the critic-free methods the policy only."""
  params = state.params
  return params["policy"] if isinstance(params, dict) and "policy" in params and "value" in params else params


def export_policy(ctx, state: TrainState, stage: str, **extra) -> None:
  ckpt_lib.save_export(ctx.cfg.workdir, policy_params(state), model=ctx.model, stage=stage,
                       tokenizer=ctx.cfg.tokenizer, chat_template=ctx.cfg.data.chat_template,
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
  check(s.prompt_len + s.max_new_tokens <= cfg.model.max_seq_len, "max_new_tokens",
        f"prompt_len + max_new_tokens exceeds model.max_seq_len={cfg.model.max_seq_len}")
  check(s.num_minibatches >= 1, "num_minibatches", "must be >= 1")
  validate_rewards(cfg)


# ------------------------------------------------------------------- critic-free group methods


def group_section(**overrides) -> ConfigDict:
  """The keys GRPO and RLOO share (their config files set the defaults that differ).

  group_size: samples per prompt (GRPO's G, RLOO's k); train.batch_size counts prompts.
  num_iterations: policy updates per rollout (GRPO's mu; > 1 uses old-policy logprobs).
  num_minibatches: minibatches per pass over the rollout's B = prompts * group_size rows.
  loss_agg: `rl.AGGREGATIONS`: token_mean (DAPO), seq_mean_token_mean (GRPO),
    seq_mean_token_sum_norm (Dr. GRPO: token sums / max_new_tokens).
  kl_in / kl_estimator / kl_coef: the KL penalty to the reference (`rl.kl_objective` says
    which objective each option optimizes; refused ones fail validation).
  skip_zero_variance: drop groups whose scores are all equal from the loss (DAPO's dynamic
    sampling, without resampling) and count them (`train/zero_variance_groups`).
  """
  values = dict(prompt_len=48, max_new_tokens=48, temperature=1.0, group_size=4, num_iterations=1,
                num_minibatches=1, loss_agg="seq_mean_token_mean", kl_in="loss",
                kl_estimator="k3_weighted", kl_coef=0.04, skip_zero_variance=False)
  values.update(overrides)
  return ConfigDict(values)


def group_config(stage: str, preset: str, **section) -> ConfigDict:
  """The config GRPO and RLOO share (their config files add what differs): policy from the SFT
  run, reward model from the reward run, `group_section(**section)` under `stage`, presets
  `tiny` (the world) and `standard` (the CPU benchmark workload: 8 prompts x 4 x 64 new tokens)."""
  from alignax.algorithms.common import eval_section, init_section
  from alignax.config import base_config, world_section
  c = base_config(stage, preset)
  c.world = world_section()
  c.init = init_section(workdir=f"runs/sft_{preset}", config=f"configs/sft.py:{preset}")
  c.reward_model = init_section(workdir=f"runs/reward_{preset}", config=f"configs/reward.py:{preset}")
  c[stage] = group_section(**section)
  c.rewards = rewards_section(model=1.0)
  c.eval = eval_section()
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  s = c[stage]
  if preset == "tiny":
    c.train.steps = 60
    c.train.batch_size = 16  # prompts; x group_size = 64 rollout rows
    c.train.log_every = 1
    c.train.eval_every = 20
    s.num_minibatches = 2
    s.num_iterations = 2
    c.optimizer.lr = 5e-5
  elif preset == "standard":
    c.train.steps = 200
    c.train.batch_size = 8
    s.prompt_len = 64
    s.max_new_tokens = 64
    s.kl_coef = 0.04
    c.optimizer.lr = 1e-6
  else:
    raise ValueError(f"unknown preset {preset!r}; presets: tiny, standard")
  return c


def validate_group(cfg, section: str) -> None:
  """Checks of a GRPO/RLOO section (the shared RL checks included)."""
  s = cfg[section]

  def check(ok, key, msg):
    if not ok:
      raise ConfigError(f"config.{section}.{key}: {msg}")
  common_validate(cfg, section)
  validate_kl(section, s.kl_in, s.kl_estimator)
  check(s.group_size >= 2, "group_size", f"must be >= 2 (a group baseline needs two samples), got "
        f"{s.group_size}")
  check(s.num_iterations >= 1, "num_iterations", "must be >= 1")
  check(s.loss_agg in rl.AGGREGATIONS, "loss_agg", f"must be one of {rl.AGGREGATIONS}, got {s.loss_agg!r}")
  check(cfg.train.batch_size % (s.num_minibatches * jax.process_count()) == 0, "num_minibatches",
        f"train.batch_size={cfg.train.batch_size} prompts must be divisible by it (minibatches "
        f"hold whole groups)")


def make_group_iteration(lm, sources: RewardSources, optimizer, gcfg, sampling: SamplingConfig,
                         eos_id: int, pad_id: int, nonfinite_policy: str,
                         advantages: Callable[[jax.Array, int, dict], jax.Array],
                         clip_range: Callable[[dict], tuple], axis_name: str | None = None):
  """`iteration(state, prompt_batch) -> (state, metrics)` of a critic-free group method.

    1. rollout   `group_size` samples per prompt (rows of a prompt adjacent)
    2. score     reward sources; log pi_ref of the samples (unless kl_in="none")
    3. rewards   score - beta * sum_t KL_t with kl_in="reward" (a sequence-level penalty)
    4. advantage `advantages(rewards [B], group_size, hparams) -> [B]` (GRPO: group-normalized,
                 RLOO: leave-one-out), zero-variance groups optionally weighted 0
    5. update    `num_iterations` passes over `num_minibatches` minibatches of the clipped
                 surrogate (+ beta * KL loss term with kl_in="loss"), aggregated by `loss_agg`

  With one update per rollout (num_iterations = num_minibatches = 1) the old policy is the
  current one: the ratio is exp(logp - stop_gradient(logp)) = 1 and no extra forward is run.
  `clip_range(hparams) -> (clip_low, clip_high)`.
  """
  g = int(gcfg.group_size)
  epochs, num_mb = int(gcfg.num_iterations), int(gcfg.num_minibatches)
  on_policy = epochs * num_mb == 1
  temp, kl_in, estimator = sampling.temperature, gcfg.kl_in, gcfg.kl_estimator
  max_len = float(sampling.max_new_tokens)

  def loss_fn(params, mb, hp, kl_coef):
    # Minibatches hold whole groups: each prompt runs through the model once.
    logp = grouped_response_logprobs(lm, params, mb["prompt_tokens"][::g], mb["prompt_mask"][::g],
                                     mb["response"], mb["mask"], g, temp)
    old = jax.lax.stop_gradient(logp) if on_policy else mb["old_logp"]
    low, high = clip_range(hp)
    per_token, metrics = rl.clipped_surrogate(logp, old, mb["advantages"], mb["mask"], low, high)
    if kl_in == "loss":
      kl_tok = rl.kl_loss_per_token(logp, mb["ref_logp"], old, estimator)
      per_token = per_token + kl_coef * kl_tok
      metrics["kl_loss"] = rl.masked_mean(kl_tok, mb["mask"])
    total, count = rl.aggregate(per_token, mb["mask"], gcfg.loss_agg, max_len=max_len,
                                weights=mb["weights"])
    return total, count, metrics

  def iteration(state: TrainState, batch):
    key = state.step_rng()
    params, extra, hp = state.params, state.extra, state.hparams
    r, valid, index = sample(lm, sampling, eos_id, pad_id, params, batch, jax.random.fold_in(key, 0),
                             group_size=g, axis_name=axis_name)
    mask = r.mask
    grouped = lambda p: jax.lax.stop_gradient(grouped_response_logprobs(
        lm, p, batch["tokens"], batch["mask"], r.tokens, mask, g, temp))
    # On-policy, the sampler's logprobs are the sampling distribution's.
    old_logp = r.logprobs if on_policy else grouped(params)
    ref_logp = grouped(extra.ref) if kl_in != "none" else jnp.zeros_like(old_logp)
    scores, reward_ok, score_m = sources.score(extra, r, index)
    beta = extra.kl_coef
    seq_kl = jnp.sum(rl.kl_per_token(old_logp, ref_logp, "k1") * mask, axis=1)
    rewards = scores - beta * seq_kl if kl_in == "reward" else scores
    adv = advantages(rewards, g, hp)
    zero_var = rl.group_zero_variance(rewards, g)
    weights = valid * (1.0 - zero_var.astype(jnp.float32)) if gcfg.skip_zero_variance else valid
    experience = dict(prompt_tokens=r.prompt_tokens, prompt_mask=r.prompt_mask, response=r.tokens,
                      mask=mask, advantages=jax.lax.stop_gradient(adv), weights=weights,
                      ref_logp=ref_logp, old_logp=old_logp)
    lr = current_lr(state.opt_state)
    state, update_m = update_epochs(
        lambda p, mb, h: loss_fn(p, mb, h, beta), optimizer, state, experience,
        jax.random.fold_in(key, 1), epochs=epochs, num_minibatches=num_mb,
        nonfinite_policy=nonfinite_policy, axis_name=axis_name, allowed=reward_ok, group_size=g)
    vmean = lambda x: row_mean(x, valid, axis_name)
    metrics = {"score": vmean(scores), "reward": vmean(rewards), "kl": vmean(seq_kl), "kl_coef": beta,
               "response_length": vmean(jnp.sum(mask, axis=1)),
               "eos_rate": vmean(r.ended.astype(jnp.float32)),
               "advantage_abs": vmean(jnp.abs(adv)),
               "zero_variance_groups": vmean(zero_var.astype(jnp.float32)),
               "reward_ok": reward_ok, **update_m}
    metrics.update({k: vmean(v) for k, v in score_m.items()})
    if lr is not None:
      metrics["lr"] = lr
    return state, metrics

  iteration.axis_name = axis_name
  iteration.with_axis_name = lambda name: make_group_iteration(
      lm, sources, optimizer, gcfg, sampling, eos_id, pad_id, nonfinite_policy, advantages,
      clip_range, axis_name=name)
  return iteration


def build_group_run(ctx, algorithm, advantages, clip_range):
  """The Run of a critic-free group method (GRPO, RLOO): prompts, policy = the init export,
  frozen reference, reward sources, the group iteration, world evaluation."""
  cfg = ctx.cfg
  gcfg = cfg[algorithm.section]
  records = prompt_source(cfg)
  prompts = prompt_batches(ctx, records, int(gcfg.prompt_len))
  lm, init_params = load_policy_and_reference(ctx)
  reward_model, rm_params = load_reward(ctx, needed=float(cfg.rewards.model) != 0)
  sources_ = make_reward_sources(cfg, ctx.tokenizer, records, reward_model)
  optimizer = make_optimizer_for(cfg, int(gcfg.num_iterations) * int(gcfg.num_minibatches))
  extra = RLState(ref=init_params, reward=rm_params, kl_coef=jnp.asarray(float(gcfg.kl_coef), jnp.float32))
  state = TrainState.create(copy_tree(init_params), optimizer, jax.random.key(int(cfg.seed)), extra=extra,
                            hparams=algorithm.hparams_of(cfg))
  state = ctx.placement.put_state(state)
  sampling = SamplingConfig(temperature=float(gcfg.temperature), max_new_tokens=int(gcfg.max_new_tokens))
  step = make_group_iteration(lm, sources_, optimizer, gcfg, sampling, ctx.tokenizer.eos_id,
                              ctx.tokenizer.pad_id, cfg.train.nonfinite, advantages, clip_range)
  tokens = int(cfg.train.batch_size) * int(gcfg.group_size) * (int(gcfg.prompt_len) + int(gcfg.max_new_tokens))
  from alignax.train.loop import Run
  return Run(name=algorithm.name, state=state, train_step=step, batches=prompts,
             evaluate=world_evaluate(ctx, lm, reward_model), tokens_per_batch=tokens,
             total_steps=int(cfg.train.steps), after_step=check_rewards_after_step(sources_))


def make_optimizer_for(cfg, updates_per_step: int):
  from alignax.train.optimizer import make_optimizer
  return make_optimizer(cfg.optimizer, int(cfg.train.steps) * updates_per_step)
