"""The critic-free group methods' iteration (GRPO, RLOO): G samples per prompt, a group baseline,
no value model; each method's module supplies its advantage and clip range.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from alignax.algorithms.common import init_section, load_lm_export, with_lora
from alignax.algorithms.online import (RLState, common_validate, load_reward, prompt_batches, prompt_source, row_mean, sample,
                                       reference_params, update_epochs, validate_kl,
                                       world_evaluate)
from alignax.algorithms.reward_sources import (RewardSources, check_rewards_after_step,
                                               make_reward_sources, rewards_section)
from alignax.config import ConfigDict, ConfigError, base_config, world_section
from alignax.generation.sampler import SamplingConfig, stop_ids
from alignax.generation.scoring import grouped_response_logprobs
from alignax.losses import rl
from alignax.train.loop import Run
from alignax.train.optimizer import effective_lr, make_optimizer
from alignax.train.state import TrainState


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
  c = base_config(stage, preset)
  c.world = world_section()
  c.init = init_section(workdir=f"runs/sft_{preset}", config=f"configs/sft.py:{preset}")
  c.reward_model = init_section(workdir=f"runs/reward_{preset}", config=f"configs/reward.py:{preset}")
  c[stage] = group_section(**section)
  c.rewards = rewards_section(model=1.0)
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  s = c[stage]
  if preset == "tiny":
    c.train.steps = 60
    c.train.batch_size = 16  # prompts; x group_size = 64 rollout rows
    c.train.log_every = 1
    c.eval.every = 20
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
    """Loss of a minibatch of whole groups {"prompt_tokens", "prompt_mask" [B, P] (each prompt
    `group_size` times), "response", "mask", "advantages", "weights" (and "old_logp", "ref_logp")
    [B, R]}: (the clipped surrogate (+ KL loss term) aggregated by `loss_agg`, its count, metrics)."""
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
    ref_logp = grouped(reference_params(state)) if kl_in != "none" else jnp.zeros_like(old_logp)
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
    lr = effective_lr(state)
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
  config = ctx.config
  gcfg = cfg[algorithm.section]
  records = prompt_source(ctx.config)
  prompts = prompt_batches(ctx, records, int(gcfg.prompt_len))
  lm, init_params = load_lm_export(ctx.cfg.init.workdir, ctx.model, ctx.placement)
  reward_model, rm_params = load_reward(ctx, needed=float(cfg.rewards.model) != 0)
  sources_ = make_reward_sources(cfg, ctx.tokenizer, records, reward_model)
  updates = config.train.steps * int(gcfg.num_iterations) * int(gcfg.num_minibatches)
  optimizer = make_optimizer(config.optimizer, updates)
  params, ref = with_lora(config, init_params)
  extra = RLState(ref=ref, reward=rm_params, kl_coef=jnp.asarray(float(gcfg.kl_coef), jnp.float32))
  state = TrainState.create(params, optimizer, jax.random.key(config.seed), extra=extra,
                            hparams=algorithm.hparams_of(cfg))
  state = ctx.placement.put_state(state)
  sampling = SamplingConfig(temperature=float(gcfg.temperature), max_new_tokens=int(gcfg.max_new_tokens))
  step = make_group_iteration(lm, sources_, optimizer, gcfg, sampling, stop_ids(ctx.tokenizer),
                              ctx.tokenizer.pad_id, config.train.nonfinite, advantages, clip_range)
  tokens = config.train.batch_size * int(gcfg.group_size) * (int(gcfg.prompt_len) + int(gcfg.max_new_tokens))
  return Run(name=algorithm.name, state=state, train_step=step, batches=prompts,
             evaluate=world_evaluate(ctx, lm, reward_model), tokens_per_batch=tokens,
             total_steps=config.train.steps, after_step=check_rewards_after_step(sources_))

