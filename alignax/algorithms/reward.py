"""Stage 3, Bradley-Terry reward modeling: which of two responses do people prefer?

The model is the SFT backbone plus a scalar head (`alignax.models.heads`) read at the last real
token of prompt + response. Chosen and rejected go through the model in one [2B, T] pass; the
loss is `bradley_terry_loss` (optional per-pair margin, optional centering term; with
`reward.soft_labels` the records' "chosen_prob" soft labels as the target instead of 1).

After training (`reward.normalize`, on by default) the head is rescaled so that the rewards of
SFT samples on the train prompts have mean 0 and std 1; gain and bias are folded into the head
and recorded in the export. Eval: held-out preference accuracy (against the dataset's labels,
and against the gold order when the records carry gold scores), and on the world task the
agreement with the gold labeler on pairs of fresh SFT samples (`eval/gold_agreement`).

`reward.ensemble=K` (Coste et al. 2023) trains K reward models, seeds `seed` .. `seed + K - 1`,
as the members of one vectorized program (`alignax.train.members`), each a normal run in
WORKDIR/members/seed=<s>; WORKDIR/export then holds all K (params stacked on a leading member
axis, each normalized on its own), which PPO, GRPO and RLOO load as a `RewardEnsemble` scoring
by `rewards.ensemble` (mean, mean - coef * std, mean - coef * variance, min). WORKDIR's
metrics.jsonl gets the ensemble's held-out evaluation (its mean score) next to a single
member's (`eval/single/*`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from alignax import checkpoint as ckpt_lib
from alignax import parallel
from alignax.tasks import evaluation
from alignax.algorithms.base import Algorithm
from alignax.algorithms.common import attach_lora, load_lm_export, stage_datasets
from alignax.algorithms.shared_prompt import packed_pair_rewards
from alignax.algorithms.world_eval import eval_prompt_records
from alignax.config import ConfigDict, ConfigError
from alignax.data import sources
from alignax.generation import Sampler, SamplingConfig
from alignax.generation.scoring import response_scores
from alignax.losses.preference import bradley_terry_loss
from alignax.models.heads import (RewardEnsemble, abstract_scalar_model, build_scalar_model,
                                  last_token)
from alignax.train.loop import Run
from alignax.train.optimizer import make_optimizer
from alignax.train.runner import StageContext
from alignax.train.state import TrainState
from alignax.train.step import make_train_step


def pair_rewards(model, params, batch, pair_len: int = 0):
  """Rewards (r_chosen [B], r_rejected [B]) of a preference batch, in one [2B, T] forward, or
  with `pair_len` > 0 (`data.pair_len`) one [B, pair_len] forward of the packed pairs
  (`alignax.algorithms.shared_prompt`)."""
  if pair_len:
    return packed_pair_rewards(model, params, batch, pair_len)
  c, r = batch["chosen"], batch["rejected"]
  cat = lambda k: jnp.concatenate([c[k], r[k]], axis=0)
  segments = cat("segment_ids")
  values = model.values(params, cat("tokens"), cat("positions"), segments)
  rewards = last_token(values, segments)
  b = c["tokens"].shape[0]
  return rewards[:b], rewards[b:]


def reward_loss(model, use_margin: bool, soft_labels: bool = False, pair_len: int = 0):
  """Bradley-Terry loss of a preference batch; `hparams["center_coef"]` weighs the centering term.
  `use_margin` subtracts the batch's "margin"; `soft_labels` fits the batch's "chosen_prob" (the
  cross-entropy against P(chosen better)) instead of the hard label; `pair_len` > 0 scores the
  packed pairs (`pair_rewards`)."""
  def loss_fn(params, batch, rng, extra, hparams):
    """Bradley-Terry loss of a pair batch {"chosen", "rejected": LM rows [B, T], "valid",
    "margin", "chosen_prob": [B]}: (sum, count, metrics) of the batch: `sum` of the per-pair loss in nats, `count` of pairs
    (the step divides the summed sums by the summed counts, so micro-batches and devices weigh
    every pair alike), `metrics` {name: scalar}. Padding pairs (valid 0) weigh nothing."""
    rc, rr = pair_rewards(model, params, batch, pair_len)
    return bradley_terry_loss(rc, rr, margin=batch["margin"] if use_margin else None,
                              target_prob=batch["chosen_prob"] if soft_labels else None,
                              center_coef=hparams["center_coef"], weights=batch["valid"])
  return loss_fn


def validate(cfg: ConfigDict) -> None:
  """`reward.*`: center_coef >= 0, ensemble >= 1."""
  if cfg.reward.center_coef < 0:
    raise ConfigError(f"config.reward.center_coef: must be >= 0, got {cfg.reward.center_coef}")
  if int(cfg.reward.get("ensemble", 1)) < 1:
    raise ConfigError(f"config.reward.ensemble: must be >= 1, got {cfg.reward.ensemble}")


class RewardEval:
  """Held-out accuracy (dataset labels and gold order) and gold agreement on SFT samples."""

  def __init__(self, ctx: StageContext, model, eval_batches, sft):
    self.ctx, self.model, self.eval_batches, self.sft = ctx, model, eval_batches, sft
    self._pairs = None
    self._fn = None

  def _pair_fn(self, params):
    if self._fn is None:
      def fn(p, batch):
        rc, rr = pair_rewards(self.model, p, batch, self.ctx.config.data.pair_len)
        return rc, rr
      self._fn = parallel.jit_eval(self.ctx.placement, fn, params)
    return self._fn

  def accuracy(self, params) -> dict[str, float]:
    fn = self._pair_fn(params)
    correct = gold_correct = n = n_gold = 0.0
    for batch in self.eval_batches:
      rc, rr = jax.device_get(fn(params, self.ctx.placement.put_batch(batch)))
      valid, gold = batch["valid"] > 0, batch["gold_label"]
      win = rc > rr
      correct += float(np.sum(win & valid))
      n += float(np.sum(valid))
      known = valid & (gold >= 0)
      gold_correct += float(np.sum((win == (gold > 0)) & known))
      n_gold += float(np.sum(known))
    # The counts let reports put intervals on the rates.
    out = {"accuracy": correct / max(n, 1.0), "pairs": n}
    if n_gold:
      out["gold_accuracy"] = gold_correct / n_gold
      out["gold_order_pairs"] = n_gold
    return out

  def sft_pairs(self):
    """Two fresh SFT samples per eval prompt (drawn once, reused at every eval)."""
    if self._pairs is None:
      lm, params, records = self.sft
      sampler = Sampler(lm, self.ctx.tokenizer, SamplingConfig(
          temperature=1.0, max_new_tokens=self.ctx.config.eval.max_new_tokens))
      prompts = [r["prompt"] for r in records]
      bs = self.ctx.config.eval.batch_size
      key = jax.random.key(self.ctx.config.seed + 3)
      template = self.ctx.config.data.chat_template
      a = evaluation.sample_prompts(sampler, params, prompts, jax.random.fold_in(key, 0), batch_size=bs,
                                    template=template)
      b = evaluation.sample_prompts(sampler, params, prompts, jax.random.fold_in(key, 1), batch_size=bs,
                                    template=template)
      gold_a = evaluation.gold_scores(prompts, a.texts, a.ended)
      gold_b = evaluation.gold_scores(prompts, b.texts, b.ended)
      self._pairs = (a, b, gold_a, gold_b)
    return self._pairs

  def gold_agreement(self, params) -> dict[str, float]:
    a, b, gold_a, gold_b = self.sft_pairs()
    ra = score_samples(self.model, params, a, self.ctx.config.eval.batch_size)
    rb = score_samples(self.model, params, b, self.ctx.config.eval.batch_size)
    differ = gold_a != gold_b
    agree = (ra > rb) == (gold_a > gold_b)
    return {"gold_agreement": float(np.mean(agree[differ])) if differ.any() else float("nan"),
            "gold_pairs": float(differ.sum())}

  def __call__(self, state: TrainState) -> dict[str, float]:
    out = self.accuracy(state.params) if self.eval_batches else {}
    if self.sft is not None:
      out.update(self.gold_agreement(state.params))
    return out


@functools.lru_cache(maxsize=8)
def _reward_fn(model):
  return jax.jit(lambda p, a, b, c, d: response_scores(model, p, a, b, c, d))


def score_samples(model, params, samples: evaluation.Samples, batch_size: int) -> np.ndarray:
  """Rewards [n] of sampled responses, in fixed-size batches."""
  return evaluation.map_sample_batches(_reward_fn(model), params, samples, batch_size)


def build_run(ctx: StageContext) -> Run:
  """The reward-model Run: a scalar head on the `init.workdir` SFT backbone, preference pairs
  (`train.batch_size` pairs), the Bradley-Terry step, and the held-out accuracy (dataset labels,
  gold order) and gold agreement on fresh SFT samples."""
  cfg = ctx.cfg
  config = ctx.config
  data = stage_datasets(ctx, "preference")

  sft_lm, sft_params = load_lm_export(cfg.init.workdir, ctx.model, ctx.placement)
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  model, _ = abstract_scalar_model(ctx.model)
  key = jax.random.key(config.seed)

  def init():
    _, params = build_scalar_model(ctx.model, jax.random.fold_in(key, 0), backbone=sft_params)
    params = attach_lora(config, params)
    return TrainState.create(params, optimizer, jax.random.fold_in(key, 1),
                             hparams=ALGORITHM.hparams_of(cfg))

  state = parallel.init_sharded(ctx.placement, init)
  step = make_train_step(reward_loss(model, bool(cfg.reward.use_margin),
                                     bool(cfg.reward.get("soft_labels", False)),
                                     config.data.pair_len),
                         optimizer, accum_steps=config.train.accum_steps,
                         nonfinite_policy=config.train.nonfinite)
  sft = None
  if config.data.source == "world" and config.eval.num_prompts > 0:
    sft = (sft_lm, sft_params, eval_prompt_records(config))
  ctx.stage_data.update(model=model, sft_lm=sft_lm, sft_params=sft_params)
  return Run(name="reward", state=state, train_step=step, batches=data.train,
             evaluate=RewardEval(ctx, model, data.eval, sft), total_steps=config.train.steps)


def normalization(ctx: StageContext, params) -> dict[str, float]:
  """Gain and bias making the rewards of SFT samples on train prompts mean 0, std 1."""
  cfg = ctx.cfg
  config = ctx.config
  model, sft_lm, sft_params = (ctx.stage_data[k] for k in ("model", "sft_lm", "sft_params"))
  records = sources.split_sources(config.data, "prompts", config.world)["train"]
  n = min(int(cfg.reward.normalize_prompts), len(records))
  order = np.random.default_rng(config.seed + 5).permutation(len(records))[:n]
  prompts = [records[int(i)]["prompt"] for i in order]
  sampler = Sampler(sft_lm, ctx.tokenizer, SamplingConfig(temperature=1.0,
                                                          max_new_tokens=config.eval.max_new_tokens))
  samples = evaluation.sample_prompts(sampler, sft_params, prompts, jax.random.key(config.seed + 7),
                                      batch_size=config.eval.batch_size, template=config.data.chat_template)
  raw = score_samples(model, params, samples, config.eval.batch_size)
  mean, std = float(raw.mean()), float(raw.std())
  gain = 1.0 / max(std, 1e-6)
  logging.info("reward normalization over %d SFT samples: raw mean %.4f, std %.4f", n, mean, std)
  return {"norm_gain": gain, "norm_bias": -mean * gain, "raw_mean": mean, "raw_std": std,
          "norm_samples": n}


def export(ctx: StageContext, state) -> None:
  """Writes WORKDIR/export: the scalar model, with the reward normalization (gain and bias making
  SFT samples' rewards mean 0, std 1) with `reward.normalize` (world data only)."""
  params = state.params
  extra = {"norm_gain": 1.0, "norm_bias": 0.0}
  if ctx.cfg.reward.normalize:
    if ctx.cfg.data.source != "world":
      logging.warning("reward.normalize needs the world's train prompts; skipped for data.source=files")
    else:
      extra = normalization(ctx, params)
      params = jax.tree.map(lambda x: x, params)
      params["head_w"] = params["head_w"].replace(params["head_w"][...] * extra["norm_gain"])
      params["head_b"] = params["head_b"].replace(params["head_b"][...] * extra["norm_gain"]
                                                  + extra["norm_bias"])
  ckpt_lib.save_export(ctx.config.workdir, params, model=ctx.model, stage="reward",
                       tokenizer=ctx.config.tokenizer,
                       chat_template=ctx.config.data.chat_template, extra=extra)


def load_reward_model(workdir: str, placement=None, mode: str = "mean", coef: float = 1.0):
  """(model, params, meta) of a reward-model export (normalization already folded in).

  An ensemble export (`reward.ensemble=K`) comes back as a `RewardEnsemble` scoring by `mode`
  and `coef`, with params stacked [K, ...] (the member axis replicated).
  """
  cfg = ckpt_lib.export_model_config(workdir)
  model, abstract = abstract_scalar_model(cfg)
  k = int(ckpt_lib.read_export_meta(workdir)["extra"].get("ensemble", 1))
  shardings = placement.state_sharding(abstract) if placement is not None else None
  if k > 1:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype), abstract)
    if shardings is not None:
      shardings = jax.tree.map(lambda sh: jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(None, *sh.spec)),
                               shardings)
    model = RewardEnsemble(model, k, mode, float(coef))
  params, meta = ckpt_lib.load_export(workdir, abstract, shardings)
  return model, params, meta


def member_params(model, params, i: int = 0):
  """(scalar model, params) of member `i` of an ensemble (the model itself when it is not one)."""
  if isinstance(model, RewardEnsemble):
    return model.member, jax.tree.map(lambda x: x[i], params)
  return model, params


# ------------------------------------------------------------------------------------ ensembles


def ensemble_members(cfg: ConfigDict):
  """[(name, member config)] of `reward.ensemble=K` > 1 (seeds seed .. seed + K - 1, each in
  WORKDIR/members/seed=<s> as a single model), or None for a single reward model."""
  k = int(cfg.reward.get("ensemble", 1))
  if k <= 1:
    return None
  import copy
  import os
  out = []
  for i in range(k):
    member = copy.deepcopy(cfg)
    with member.unlocked():
      member.seed = int(cfg.seed) + i
      member.reward.ensemble = 1
      member.workdir = os.path.join(cfg.workdir, "members", f"seed={member.seed}")
    out.append((f"seed={member.seed}", member))
  return out


def combine_ensemble(cfg: ConfigDict, member_workdirs) -> None:
  """WORKDIR/export holding every member's export stacked, and the ensemble's evaluation next to
  a single member's in WORKDIR/metrics.jsonl."""
  import os

  from alignax import metrics as metrics_lib
  from alignax.config import resolve, save_config
  from alignax.train.runner import stage_tokenizer
  exports = [ckpt_lib.load_export(w) for w in member_workdirs]
  stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[p for p, _ in exports])
  meta = exports[0][1]
  model_cfg = ckpt_lib.export_model_config(member_workdirs[0])
  extra = {"ensemble": len(exports), "members": [os.path.basename(w) for w in member_workdirs],
           "member_extra": [m["extra"] for _, m in exports]}
  save_config(cfg, cfg.workdir)
  writer = metrics_lib.MetricsWriter(cfg.workdir, tensorboard=False, enabled=parallel.is_main_process())
  config = dataclasses.replace(resolve(cfg), model=model_cfg)
  placement = parallel.make_placement(config.parallel, model_cfg, config.train.batch_size)
  ctx = StageContext(cfg=cfg, config=config, model=model_cfg, placement=placement,
                     tokenizer=stage_tokenizer(config), writer=writer,
                     is_main=parallel.is_main_process())
  # The eval pieces of a member's run: held-out pairs, and fresh SFT pairs for gold agreement.
  eval_run = build_run(ctx)
  evaluator = eval_run.evaluate
  ckpt_lib.save_export(cfg.workdir, stacked, model=model_cfg, stage="reward", tokenizer=meta["tokenizer"],
                       chat_template=meta.get("chat_template", "markers"), extra=extra)
  model, params, _ = load_reward_model(cfg.workdir, placement)
  single_model, single_params = member_params(model, params, 0)
  row = {f"eval/{k}": v for k, v in evaluate_with(evaluator, model, params).items()}
  row.update({f"eval/single/{k}": v for k, v in evaluate_with(evaluator, single_model, single_params).items()})
  row["eval/ensemble_size"] = float(len(exports))
  writer.write(int(cfg.train.steps), row)
  writer.close()
  logging.info("reward ensemble of %d: %s", len(exports), row)


def evaluate_with(evaluator: "RewardEval", model, params) -> dict[str, float]:
  """The held-out evaluation of `evaluator` for another (model, params), e.g. an ensemble."""
  other = RewardEval(evaluator.ctx, model, evaluator.eval_batches, evaluator.sft)
  other._pairs = evaluator._pairs  # the same fresh SFT pairs for every model compared
  out = other(_ParamsOnly(params))
  evaluator._pairs = other._pairs
  return out


class _ParamsOnly:
  def __init__(self, params):
    self.params = params


ALGORITHM = Algorithm(name="reward", records="preference", section="reward", hparams=("center_coef",),
                      upstream={"init": "sft"}, build=build_run, export=export, validate=validate,
                      policy=False, members_of=ensemble_members, combine=combine_ensemble)
