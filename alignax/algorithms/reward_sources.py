"""Where an RL iteration's scores come from: a weighted sum of reward sources.

  model      the reward-model export named by `reward_model.workdir`, scored inside the compiled
             iteration at the last real token (`generation.scoring.response_scores`)
  functions  Python functions `module:function(prompts, responses[, ended=, records=]) -> [n]
             scores`, named in `rewards.functions`, called on the host between the compiled
             rollout and the compiled update through `jax.pure_callback` (no recompilation per
             call); the world's gold labeler is one (`alignax.tasks.world_gold:gold_reward`)

A function that raises, returns the wrong shape or a non-finite score is recorded on the host; the
iteration skips its update, and the loop's `after_step` check raises a RewardFunctionError naming
the function and the prompt record, after the loop saves a checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignax.config import ConfigDict, ConfigError
from alignax.generation.sampler import stop_ids
from alignax.generation.sampler import Rollout
from alignax.generation.scoring import response_scores


class RewardFunctionError(RuntimeError):
  """A Python reward function raised, returned the wrong shape, or returned a non-finite score."""


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
  ensemble, ensemble_coef: how a reward-model ensemble export (`reward.ensemble=K`) scores:
    "mean", "mean_minus_std" (mean - coef * std), "mean_minus_var" (Coste et al.'s UWO) or
    "min" (their WCO); a single reward model ignores them.
  """
  return ConfigDict(dict(model=model, functions=functions, ensemble="mean", ensemble_coef=1.0))


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
    stops = set(stop_ids(self.tokenizer))
    out = []
    for row, m in zip(tokens, mask):
      ids = [int(t) for t, keep in zip(row, m) if keep > 0 and int(t) not in stops]
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

  def score(self, rl_state, rollout: Rollout, index: jax.Array):
    """(scores [B] float32, ok: scalar bool, metrics). `ok` is False when a host function failed
    (its scores are then 0 and the update must be skipped)."""
    scores = jnp.zeros(rollout.tokens.shape[0], jnp.float32)
    metrics, ok = {}, jnp.array(True)
    if self.reward_model is not None:
      rm = response_scores(self.reward_model, rl_state.reward, rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens, rollout.mask)
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
  from alignax.models.heads import ENSEMBLE_MODES
  mode = cfg.rewards.get("ensemble", "mean")
  if mode not in ENSEMBLE_MODES:
    raise ConfigError(f"config.rewards.ensemble: must be one of {ENSEMBLE_MODES}, got {mode!r}")
  if float(cfg.rewards.get("ensemble_coef", 1.0)) < 0:
    raise ConfigError("config.rewards.ensemble_coef: must be >= 0")
  specs = [s for s in str(cfg.rewards.functions).split(",") if s.strip()]
  for s in specs:
    load_reward_function(s)
  if float(cfg.rewards.model) != 0 and not cfg.reward_model.workdir:
    raise ConfigError("config.reward_model.workdir: rewards.model != 0 needs a reward-model run")
  if float(cfg.rewards.model) == 0 and not specs:
    raise ConfigError("config.rewards: no reward source (rewards.model is 0 and rewards.functions "
                      "is empty)")

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
