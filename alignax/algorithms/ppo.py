"""Stage 4, PPO with a KL penalty (RLHF), following the published implementation details.

One train step is one PPO *iteration*, compiled as a whole (no host round trip inside it):

  1. rollout   sample a response per prompt from the policy (KV-cache sampler, `ppo.temperature`)
  2. score     log pi_old and log pi_ref of the sampled tokens (training-style forwards at the
               same temperature), values V_old from the value model, and the frozen reward
               model's score at the last real token; a response without `<eos>` gets
               `ppo.no_eos_score` instead (Huang et al. 2024)
  3. rewards   r_t = -beta * KL_t on each response token (`ppo.kl_estimator` k1 or k3), plus the
               score on the last real token; optional reward whitening
  4. GAE       advantages and returns by a reverse scan (gamma, lambda); advantages whitened
  5. update    `ppo.epochs` passes over `ppo.num_minibatches` shuffled minibatches: clipped
               policy loss + vf_coef * clipped value loss, one AdamW step each (shared optimizer
               over policy and value params, global-norm clipping, non-finite guard)
  6. KL coef   fixed, or adaptive (Ziegler et al.): beta *= 1 + clip(KL/target - 1, +-0.2) * n / horizon

Policy and reference start from the SFT export (`init.workdir`); the value model and the frozen
reward model start from the reward-model export (`reward_model.workdir`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignax import checkpoint as ckpt_lib
from alignax.algorithms.common import adopt_export, ensure_export, process_batch_size, shard_args
from alignax.algorithms.reward import load_reward_model, rollout_rewards, score_samples
from alignax.algorithms.world_eval import WorldEvaluator
from alignax.config import ConfigDict, ConfigError
from alignax.data import pipeline, sources
from alignax.generation.sampler import SamplingConfig, _generate
from alignax.generation.scoring import join_prompt_response
from alignax.losses import rl
from alignax.losses.lm import next_token_entropy, next_token_logprobs
from alignax.models import abstract_lm
from alignax.train.loop import Run
from alignax.train.optimizer import current_lr, make_optimizer
from alignax.train.runner import StageContext, run_training
from alignax.train.state import TrainState
from alignax.train.step import guarded_update, record_finiteness


def policy_forward(lm, params, prompt_tokens, prompt_mask, response, response_mask, temperature):
  """(logprobs [B, N], entropy [B, N]) of the response tokens under logits / temperature."""
  tokens, positions, segments = join_prompt_response(prompt_tokens, prompt_mask, response, response_mask)
  logits, _ = lm.apply(params, tokens, positions, segments)
  logits = logits / temperature
  p = prompt_tokens.shape[1]
  lp = next_token_logprobs(logits, tokens)[:, p:] * response_mask
  ent = next_token_entropy(logits)[:, p:] * response_mask
  return lp, ent


def value_forward(value_model, params, prompt_tokens, prompt_mask, response, response_mask):
  """[B, N] values V(s_j) of the state before each response token: the value head's output at the
  column that predicts token j (column P + j - 1)."""
  tokens, positions, segments = join_prompt_response(prompt_tokens, prompt_mask, response, response_mask)
  values = value_model.values(params, tokens, positions, segments)
  p, n = prompt_tokens.shape[1], response.shape[1]
  return values[:, p - 1: p - 1 + n] * response_mask


def rollout(lm, value_model, reward_model, pcfg, sampling: SamplingConfig, eos_id: int, pad_id: int,
            state: TrainState, batch, key):
  """Steps 1-4: a batch of scored, advantage-annotated experience (all [B, N] unless noted)."""
  params, extra = state.params, state.extra
  prompt_tokens, prompt_mask = batch["tokens"], batch["mask"]
  valid = batch["valid"]
  gen = _generate(lm, sampling, eos_id, pad_id, params["policy"], prompt_tokens, prompt_mask, key)
  response = gen["tokens"]
  mask = gen["mask"] * valid[:, None]
  temp = sampling.temperature
  args = (prompt_tokens, prompt_mask, response, mask)
  old_logp, entropy = policy_forward(lm, params["policy"], *args, temp)
  ref_logp, _ = policy_forward(lm, extra["ref"], *args, temp)
  old_values = value_forward(value_model, params["value"], *args)
  raw_scores = rollout_rewards(reward_model, extra["reward"], *args)
  ended = gen["ended"]
  scores = raw_scores
  if pcfg.apply_no_eos_score:
    scores = jnp.where(ended, raw_scores, pcfg.no_eos_score)
  beta = extra["kl_coef"]
  kl = rl.kl_per_token(old_logp, ref_logp, pcfg.kl_estimator) * mask
  rewards = rl.token_rewards(scores, kl, mask, beta)
  if pcfg.whiten_rewards:
    rewards = rl.whiten(rewards, mask, shift_mean=False)
  advantages, returns = rl.gae(rewards, old_values, mask, pcfg.gamma, pcfg.lam)
  advantages = rl.whiten(advantages, mask)
  seq_kl = jnp.sum(kl, axis=1)
  n_valid = jnp.maximum(jnp.sum(valid), 1.0)
  vmean = lambda x: jnp.sum(x * valid) / n_valid
  metrics = {
      "score": vmean(raw_scores), "score_used": vmean(scores), "kl": vmean(seq_kl), "kl_coef": beta,
      "non_score_reward": vmean(jnp.sum(-beta * kl, axis=1)),
      "response_length": vmean(jnp.sum(mask, axis=1)), "eos_rate": vmean(ended.astype(jnp.float32)),
      "entropy": rl.masked_mean(entropy, mask),
      "explained_variance": rl.explained_variance(old_values, returns, mask),
      "returns_mean": rl.masked_mean(returns, mask),
      "value_mean": rl.masked_mean(old_values, mask),
  }
  experience = dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, response=response, mask=mask,
                    old_logp=old_logp, old_values=old_values, advantages=advantages, returns=returns)
  return experience, metrics


def ppo_loss(lm, value_model, pcfg, temperature):
  """`loss(params, minibatch) -> (total, metrics)`: mean clipped policy loss + vf_coef * mean
  clipped value loss, both per response token."""
  def loss_fn(params, mb):
    args = (mb["prompt_tokens"], mb["prompt_mask"], mb["response"], mb["mask"])
    logp, _ = policy_forward(lm, params["policy"], *args, temperature)
    values = value_forward(value_model, params["value"], *args)
    pg_sum, n, pg_m = rl.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], pcfg.clip)
    vf_sum, _, vf_m = rl.ppo_value_loss(values, mb["old_values"], mb["returns"], mb["mask"], pcfg.vf_clip)
    n = jnp.maximum(n, 1.0)
    pg_loss, vf_loss = pg_sum / n, vf_sum / n
    return pg_loss + pcfg.vf_coef * vf_loss, {"pg_loss": pg_loss, "value_loss": vf_loss, **pg_m, **vf_m}
  return loss_fn


def make_ppo_iteration(lm, value_model, reward_model, optimizer, pcfg, sampling: SamplingConfig,
                       eos_id: int, pad_id: int, nonfinite_policy: str, global_batch: int):
  """`iteration(state, prompt_batch) -> (state, metrics)`: steps 1-6 of the module doc."""
  loss_fn = ppo_loss(lm, value_model, pcfg, sampling.temperature)
  num_mb, epochs = int(pcfg.num_minibatches), int(pcfg.epochs)

  def iteration(state: TrainState, batch):
    key = state.step_rng()
    experience, metrics = rollout(lm, value_model, reward_model, pcfg, sampling, eos_id, pad_id, state,
                                  batch, jax.random.fold_in(key, 0))
    experience = jax.tree.map(jax.lax.stop_gradient, experience)
    b = experience["response"].shape[0]
    mb_size = b // num_mb
    allowed = state.halted_at < 0

    def minibatch_step(carry, mb):
      params, opt_state, all_ok = carry
      (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
      params, opt_state, finite = guarded_update(params, opt_state, grads, loss, optimizer,
                                                 allowed & all_ok)
      m = dict(m, loss=loss, grad_norm=jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))))
      # Under "halt", the first non-finite minibatch freezes the rest of the iteration.
      all_ok = all_ok & (finite | (nonfinite_policy == "skip"))
      return (params, opt_state, all_ok), (m, finite)

    def epoch(carry, epoch_key):
      perm = jax.random.permutation(epoch_key, b)
      shuffled = jax.tree.map(lambda x: x[perm].reshape(num_mb, mb_size, *x.shape[1:]), experience)
      return jax.lax.scan(minibatch_step, carry, shuffled)

    lr = current_lr(state.opt_state)
    keys = jax.random.split(jax.random.fold_in(key, 1), epochs)
    (params, opt_state, _), (update_m, finite) = jax.lax.scan(
        epoch, (state.params, state.opt_state, jnp.array(True)), keys)
    all_finite = jnp.all(finite)
    state = record_finiteness(state.replace(params=params, opt_state=opt_state), all_finite,
                              nonfinite_policy)
    beta = state.extra["kl_coef"]
    if pcfg.adaptive_kl:
      beta = rl.adaptive_kl_coef(beta, metrics["kl"], pcfg.target_kl, pcfg.horizon, global_batch)
    state = state.replace(extra=dict(state.extra, kl_coef=beta))
    metrics.update({k: jnp.mean(v) for k, v in update_m.items()})
    metrics.update(nonfinite=state.nonfinite, applied=jnp.mean(finite.astype(jnp.float32)))
    if lr is not None:
      metrics["lr"] = lr
    return state, metrics

  return iteration


def arrays_only(prompts) -> pipeline.MapBatches:
  """The prompt iterator's arrays (the records stay on the host), with its state and stats."""
  keys = ("tokens", "mask", "valid")
  return pipeline.MapBatches(prompts, lambda item: {k: item[0][k] for k in keys})


def validate(cfg: ConfigDict) -> None:
  p = cfg.ppo
  def check(ok, key, msg):
    if not ok:
      raise ConfigError(f"config.ppo.{key}: {msg}")
  check(p.kl_estimator in rl.KL_ESTIMATORS, "kl_estimator", f"must be one of {rl.KL_ESTIMATORS}")
  check(p.num_minibatches >= 1 and cfg.train.batch_size % (p.num_minibatches * jax.process_count()) == 0,
        "num_minibatches", f"train.batch_size={cfg.train.batch_size} must be divisible by it")
  check(p.epochs >= 1, "epochs", "must be >= 1")
  check(p.temperature > 0, "temperature", "must be > 0 (PPO needs the sampling distribution's logprobs)")
  check(0 < p.clip and 0 < p.vf_clip, "clip", "clip ranges must be positive")
  check(p.kl_coef >= 0, "kl_coef", "must be >= 0")
  check(not p.adaptive_kl or (p.target_kl > 0 and p.horizon > 0), "target_kl",
        "adaptive KL needs target_kl > 0 and horizon > 0")
  check(p.prompt_len + p.max_new_tokens <= cfg.model.max_seq_len, "max_new_tokens",
        f"prompt_len + max_new_tokens exceeds model.max_seq_len={cfg.model.max_seq_len}")


def build_run(ctx: StageContext) -> Run:
  cfg, pcfg = ctx.cfg, ctx.cfg.ppo
  records = sources.split_sources(cfg, "prompts")["train"]
  batch = process_batch_size(int(cfg.train.batch_size))
  prompts = pipeline.prompts_pipeline(records, ctx.tokenizer, batch_size=batch,
                                      prompt_len=int(pcfg.prompt_len), bad_records=cfg.data.bad_records,
                                      chat_template=cfg.data.chat_template,
                                      shuffle=True, seed=int(cfg.seed), num_epochs=None, **shard_args())
  lm, abstract = abstract_lm(ctx.model)
  sft_params, _ = ckpt_lib.load_export(cfg.init.workdir, abstract, ctx.placement.state_sharding(abstract))
  reward_model, rm_params, _ = load_reward_model(cfg.reward_model.workdir, ctx.placement)
  optimizer = make_optimizer(cfg.optimizer, int(cfg.train.steps) * int(pcfg.epochs) * int(pcfg.num_minibatches))
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  state = TrainState.create({"policy": copy(sft_params), "value": copy(rm_params)}, optimizer,
                            jax.random.key(int(cfg.seed)),
                            extra={"ref": sft_params, "reward": rm_params,
                                   "kl_coef": jnp.asarray(float(pcfg.kl_coef), jnp.float32)})
  state = ctx.placement.put_state(state)
  sampling = SamplingConfig(temperature=float(pcfg.temperature), max_new_tokens=int(pcfg.max_new_tokens))
  step = make_ppo_iteration(lm, reward_model, reward_model, optimizer, pcfg, sampling, ctx.tokenizer.eos_id,
                            ctx.tokenizer.pad_id, cfg.train.nonfinite, int(cfg.train.batch_size))
  evaluate = None
  if cfg.data.source == "world" and int(cfg.eval.num_prompts) > 0:
    world_eval = WorldEvaluator(cfg, lm, ctx.tokenizer, ctx.writer)

    def evaluate(s):
      # The frozen reward model's score of the eval samples: proxy vs gold reward shows
      # over-optimization (Gao et al. 2022).
      proxy = lambda samples: score_samples(reward_model, s.extra["reward"], samples, int(cfg.eval.batch_size))
      return world_eval(s.params["policy"], int(s.step), reference=(lm, s.extra["ref"]), proxy=proxy)
  tokens = int(cfg.train.batch_size) * (int(pcfg.prompt_len) + int(pcfg.max_new_tokens))
  return Run(name="ppo", state=state, train_step=step, batches=arrays_only(prompts), evaluate=evaluate,
             tokens_per_batch=tokens, total_steps=int(cfg.train.steps))


def export(ctx: StageContext, state) -> None:
  ckpt_lib.save_export(ctx.cfg.workdir, state.params["policy"], model=ctx.model, stage="ppo",
                       tokenizer=ctx.cfg.tokenizer,
                       chat_template=ctx.cfg.data.chat_template,
                       extra={"kl_coef": float(np.asarray(jax.device_get(state.extra["kl_coef"])))})


def train(cfg: ConfigDict):
  init_dir = ensure_export(cfg.init)
  ensure_export(cfg.reward_model)
  model = adopt_export(cfg, init_dir)
  return run_training(cfg, build_run, export, validate=validate, model_config=model)

