"""Stage 4, PPO with a KL penalty (RLHF), following the published implementation details.

One train step is one PPO *iteration*, compiled as a whole (Python reward functions, when
configured, are the only host call inside it):

  1. rollout   sample a response per prompt from the policy (KV-cache sampler, `ppo.temperature`)
  2. score     log pi_old and log pi_ref of the sampled tokens (training-style forwards at the
               same temperature), values V_old from the value model, and the reward sources'
               score (`rewards.*`: the reward model at the last real token, Python functions); a
               response without `<eos>` gets `ppo.no_eos_score` instead (Huang et al. 2024)
  3. rewards   with `ppo.kl_in="reward"` (default): r_t = -beta * k1_t on each response token,
               plus the score on the last real token; optional reward whitening
  4. GAE       advantages and returns by a reverse scan (gamma, lambda); advantages whitened
               over the whole batch (every device's rows under pmap)
  5. update    `ppo.epochs` passes over `ppo.num_minibatches` shuffled minibatches: clipped
               policy loss + vf_coef * clipped value loss (+ beta * the KL loss term with
               `ppo.kl_in="loss"`), per response token, one AdamW step each (shared optimizer
               over policy and value params, global-norm clipping, non-finite guard)
  6. KL coef   fixed, or adaptive (Ziegler et al.): beta *= 1 + clip(KL/target - 1, +-0.2) * n / horizon

Which objective each KL option optimizes is `rl.kl_objective` (k1 in the reward, k2 or
k3_weighted in the loss: E[r] - beta KL(pi || ref)); k3 in the reward is refused.

Policy and reference start from the SFT export (`init.workdir`); the value model and the frozen
reward model start from the reward-model export (`reward_model.workdir`; of an ensemble, the
reward is the ensemble's `rewards.ensemble` score and the value model starts from member 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax.algorithms.common import load_lm_export, with_lora
from alignax.algorithms import online, reward_sources
from alignax.algorithms.base import Algorithm
from alignax.algorithms.reward import member_params
from alignax.config import ConfigDict, ConfigError
from alignax.generation.sampler import SamplingConfig, stop_ids
from alignax.generation.scoring import response_logprobs_and_entropy, response_values
from alignax.losses import rl
from alignax.train.loop import Run
from alignax.train.optimizer import effective_lr, make_optimizer
from alignax.train.runner import StageContext
from alignax.train.state import TrainState

HPARAMS = ("clip", "vf_clip", "vf_coef", "gamma", "lam", "target_kl", "horizon", "no_eos_score")


def rollout(lm, value_model, sources: reward_sources.RewardSources, pcfg, sampling: SamplingConfig, eos_id: int,
            pad_id: int, state: TrainState, batch, key, axis_name=None):
  """Steps 1-4: a batch of scored, advantage-annotated experience (all [B, N] unless noted)."""
  params, extra, hp = state.params, state.extra, state.hparams
  r, valid, index = online.sample(lm, sampling, eos_id, pad_id, params["policy"], batch, key,
                                  axis_name=axis_name)
  mask, temp = r.mask, sampling.temperature
  args = online.rollout_args(r)
  old_logp, entropy = response_logprobs_and_entropy(lm, params["policy"], *args, temp)
  ref_logp = online.reference_logprobs(lm, online.reference_params(state), r, temp)
  old_values = response_values(value_model, params["value"], *args)
  raw_scores, reward_ok, score_m = sources.score(extra, r, index)
  scores = raw_scores
  if pcfg.apply_no_eos_score:
    scores = jnp.where(r.ended, raw_scores, hp["no_eos_score"])
  beta = extra.kl_coef
  kl = rl.kl_per_token(old_logp, ref_logp, pcfg.kl_estimator) * mask
  in_reward = beta if pcfg.kl_in == "reward" else 0.0
  rewards = rl.token_rewards(scores, kl, mask, in_reward)
  if pcfg.whiten_rewards:
    rewards = online.global_whiten(rewards, mask, axis_name, shift_mean=False)
  advantages, returns = rl.gae(rewards, old_values, mask, hp["gamma"], hp["lam"])
  advantages = online.global_whiten(advantages, mask, axis_name)
  vmean = lambda x: online.row_mean(x, valid, axis_name)
  tmean = lambda x: online.global_masked_mean(x, mask, axis_name)
  seq_kl = jnp.sum(kl, axis=1)
  metrics = {
      "score": vmean(raw_scores), "score_used": vmean(scores), "kl": vmean(seq_kl), "kl_coef": beta,
      "non_score_reward": vmean(jnp.sum(-in_reward * kl, axis=1)),
      "response_length": vmean(jnp.sum(mask, axis=1)), "eos_rate": vmean(r.ended.astype(jnp.float32)),
      "entropy": tmean(entropy),
      "explained_variance": rl.explained_variance(old_values, returns, mask),
      "returns_mean": tmean(returns), "value_mean": tmean(old_values),
      "reward_ok": reward_ok,
  }
  metrics.update({k: vmean(v) for k, v in score_m.items()})
  experience = dict(prompt_tokens=r.prompt_tokens, prompt_mask=r.prompt_mask, response=r.tokens, mask=mask,
                    old_logp=old_logp, ref_logp=ref_logp, old_values=old_values, advantages=advantages,
                    returns=returns)
  return experience, reward_ok, metrics


def ppo_loss(lm, value_model, pcfg, temperature):
  """`loss(params, minibatch, hparams, kl_coef) -> (sum, count, metrics)`: clipped policy loss +
  vf_coef * clipped value loss (+ kl_coef * the KL loss term with kl_in="loss"), summed over
  response tokens; count is the number of response tokens."""
  def loss_fn(params, mb, hp, kl_coef):
    """Loss of a rollout minibatch {"prompt_tokens", "prompt_mask" [B, P], "response", "mask"
    [B, R], "old_logp", "old_values", "advantages", "returns" (and "ref_logp") [B, R]}: (sum over
    response tokens in nats, response tokens, metrics)."""
    args = (mb["prompt_tokens"], mb["prompt_mask"], mb["response"], mb["mask"])
    logp, _ = response_logprobs_and_entropy(lm, params["policy"], *args, temperature)
    values = response_values(value_model, params["value"], *args)
    pg_sum, n, pg_m = rl.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], hp["clip"])
    vf_sum, _, vf_m = rl.ppo_value_loss(values, mb["old_values"], mb["returns"], mb["mask"], hp["vf_clip"])
    total = pg_sum + hp["vf_coef"] * vf_sum
    metrics = {"pg_loss": pg_sum / jnp.maximum(n, 1.0), "value_loss": vf_sum / jnp.maximum(n, 1.0),
               **pg_m, **vf_m}
    if pcfg.kl_in == "loss":
      kl_tok = rl.kl_loss_per_token(logp, mb["ref_logp"], mb["old_logp"], pcfg.kl_estimator)
      kl_sum = jnp.sum(kl_tok * mb["mask"])
      total = total + kl_coef * kl_sum
      metrics["kl_loss"] = kl_sum / jnp.maximum(n, 1.0)
    return total, n, metrics
  return loss_fn


def make_ppo_iteration(lm, value_model, sources: reward_sources.RewardSources, optimizer, pcfg,
                       sampling: SamplingConfig, eos_id: int, pad_id: int, nonfinite_policy: str,
                       global_batch: int, axis_name: str | None = None):
  """`iteration(state, prompt_batch) -> (state, metrics)`: steps 1-6 of the module doc.

  The returned function carries `with_axis_name(name)`, so a pmap placement can rebind it.
  """
  loss = ppo_loss(lm, value_model, pcfg, sampling.temperature)

  def iteration(state: TrainState, batch):
    key = state.step_rng()
    experience, reward_ok, metrics = rollout(lm, value_model, sources, pcfg, sampling, eos_id, pad_id,
                                             state, batch, jax.random.fold_in(key, 0), axis_name)
    experience = jax.tree.map(jax.lax.stop_gradient, experience)
    lr = effective_lr(state)
    kl_coef = state.extra.kl_coef
    state, update_m = online.update_epochs(
        lambda p, mb, hp: loss(p, mb, hp, kl_coef), optimizer, state, experience,
        jax.random.fold_in(key, 1), epochs=int(pcfg.epochs), num_minibatches=int(pcfg.num_minibatches),
        nonfinite_policy=nonfinite_policy, axis_name=axis_name, allowed=reward_ok)
    beta = state.extra.kl_coef
    if pcfg.adaptive_kl:
      hp = state.hparams
      beta = rl.adaptive_kl_coef(beta, metrics["kl"], hp["target_kl"], hp["horizon"], global_batch)
    state = state.replace(extra=state.extra.replace(kl_coef=beta))
    metrics.update(update_m)
    if lr is not None:
      metrics["lr"] = lr
    return state, metrics

  iteration.axis_name = axis_name
  iteration.with_axis_name = lambda name: make_ppo_iteration(
      lm, value_model, sources, optimizer, pcfg, sampling, eos_id, pad_id, nonfinite_policy,
      global_batch, axis_name=name)
  return iteration


def validate(cfg: ConfigDict) -> None:
  """`ppo.*` and the shared RL keys: a reward model for the value model, minibatches that split
  the batch on every process, epochs >= 1, positive clip ranges, a usable adaptive-KL target."""
  p = cfg.ppo

  def check(ok, key, msg):
    if not ok:
      raise ConfigError(f"config.ppo.{key}: {msg}")
  online.common_validate(cfg, "ppo")
  online.validate_kl("ppo", p.kl_in, p.kl_estimator)
  check(cfg.reward_model.workdir, "reward_model", "PPO's value model starts from the reward-model "
        "export: set config.reward_model.workdir")
  check(cfg.train.batch_size % (p.num_minibatches * jax.process_count()) == 0, "num_minibatches",
        f"train.batch_size={cfg.train.batch_size} must be divisible by it")
  check(p.epochs >= 1, "epochs", "must be >= 1")
  check(0 < p.clip and 0 < p.vf_clip, "clip", "clip ranges must be positive")
  check(not p.adaptive_kl or (p.target_kl > 0 and p.horizon > 0), "target_kl",
        "adaptive KL needs target_kl > 0 and horizon > 0")


def build_run(ctx: StageContext) -> Run:
  """The PPO Run: the policy from the `init.workdir` SFT export, the value model from member 0 of
  the `reward_model.workdir` export, batches of `train.batch_size` prompts, the PPO iteration
  (rollout, rewards, KL penalty, GAE, `ppo.epochs` x `ppo.num_minibatches` updates), and the world
  evaluation. tokens/s counts prompt + sampled tokens."""
  cfg, pcfg = ctx.cfg, ctx.cfg.ppo
  config = ctx.config
  records = online.prompt_source(ctx.config)
  prompts = online.prompt_batches(ctx, records, int(pcfg.prompt_len))
  lm, sft_params = load_lm_export(cfg.init.workdir, ctx.model, ctx.placement)
  reward_model, rm_params = online.load_reward(ctx, needed=True)
  value_model, value_params = member_params(reward_model, rm_params, 0)
  sources = reward_sources.make_reward_sources(cfg, ctx.tokenizer, records, reward_model)
  optimizer = make_optimizer(config.optimizer, config.train.steps * int(pcfg.epochs) * int(pcfg.num_minibatches))
  policy, ref = with_lora(config, sft_params)
  value, _ = with_lora(config, value_params)
  extra = online.RLState(ref=ref, reward=rm_params if sources.uses_model else None,
                         kl_coef=jnp.asarray(float(pcfg.kl_coef), jnp.float32))
  state = TrainState.create({"policy": policy, "value": value},
                            optimizer, jax.random.key(config.seed), extra=extra,
                            hparams=ALGORITHM.hparams_of(cfg))
  state = ctx.placement.put_state(state)
  sampling = SamplingConfig(temperature=float(pcfg.temperature), max_new_tokens=int(pcfg.max_new_tokens))
  step = make_ppo_iteration(lm, value_model, sources, optimizer, pcfg, sampling, stop_ids(ctx.tokenizer),
                            ctx.tokenizer.pad_id, config.train.nonfinite, config.train.batch_size)
  tokens = config.train.batch_size * (int(pcfg.prompt_len) + int(pcfg.max_new_tokens))
  return Run(name="ppo", state=state, train_step=step, batches=prompts,
             evaluate=online.world_evaluate(ctx, lm, reward_model if sources.uses_model else None),
             tokens_per_batch=tokens, total_steps=config.train.steps,
             after_step=reward_sources.check_rewards_after_step(sources))


def export(ctx: StageContext, state) -> None:
  """Writes WORKDIR/export: the policy params, as an LM export."""
  online.export_policy(ctx, state, "ppo")


ALGORITHM = Algorithm(name="ppo", records="prompts", section="ppo", hparams=HPARAMS,
                      upstream={"init": "sft", "reward_model": "reward"},
                      build=build_run, export=export, validate=validate,
                      state_keys=("kl_coef",))
