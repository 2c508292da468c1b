"""Stage 2, supervised fine-tuning: imitate (prompt, response) demonstrations.

Conversations go through the chat template; the loss is the masked next-token cross-entropy on
assistant tokens only (their text and the `<eos>` closing each assistant turn), so user and
system text is context, never a target. Multi-turn conversations learn every assistant turn.
Rows are padded (one conversation each) or packed (`data.packing`).

Starts from the pretraining export named by `init.workdir` (run first when missing). Eval:
held-out loss on assistant tokens and, on the world task, sampled responses to eval prompts
scored by the gold labeler plus a greedy table of showcase prompts (`WORKDIR/samples.md`).
"""

from __future__ import annotations

from alignax import checkpoint as ckpt_lib
from alignax.algorithms.base import Algorithm
from alignax.algorithms.common import (init_lm_state, process_batch_size,
                                       shard_args, take_batches, tokens_in)
from alignax.algorithms.pretrain import lm_loss, make_lm_evaluate
from alignax.algorithms.world_eval import WorldEvaluator
from alignax.config import ConfigDict, ConfigError
from alignax.data import pipeline, sources
from alignax.models import abstract_lm
from alignax.train.loop import Run
from alignax.train.optimizer import make_optimizer
from alignax.train.runner import StageContext
from alignax.train.step import make_train_step


def validate(cfg: ConfigDict) -> None:
  if cfg.data.too_long not in pipeline.TOO_LONG_POLICIES:
    raise ConfigError(f"config.data.too_long: must be one of {pipeline.TOO_LONG_POLICIES}, "
                      f"got {cfg.data.too_long!r}")


def load_init_params(ctx: StageContext, workdir: str):
  """LM params from a previous stage's export, placed on the mesh."""
  _, abstract = abstract_lm(ctx.model)
  params, _ = ckpt_lib.load_export(workdir, abstract, ctx.placement.state_sharding(abstract))
  return params


def build_run(ctx: StageContext) -> Run:
  cfg = ctx.cfg
  splits = sources.split_sources(cfg, "sft")
  batch = process_batch_size(int(cfg.train.batch_size))
  common = dict(batch_size=batch, seq_len=int(cfg.data.seq_len), packed=bool(cfg.data.packing),
                too_long=cfg.data.too_long, bad_records=cfg.data.bad_records,
                chat_template=cfg.data.chat_template, **shard_args())
  train_iter = pipeline.sft_pipeline(splits["train"], ctx.tokenizer, seed=int(cfg.seed), num_epochs=None,
                                     **common)
  eval_batches = []
  if splits["eval"] is not None and int(cfg.train.eval_batches) > 0:
    eval_iter = pipeline.sft_pipeline(splits["eval"], ctx.tokenizer, shuffle=False, num_epochs=1, **common)
    eval_batches = take_batches(eval_iter, int(cfg.train.eval_batches))

  optimizer = make_optimizer(cfg.optimizer, int(cfg.train.steps))
  params = load_init_params(ctx, cfg.init.workdir)
  lm, state = init_lm_state(ctx.placement, ctx.model, optimizer, int(cfg.seed), params=params)
  step = make_train_step(lm_loss(lm), optimizer, accum_steps=int(cfg.train.accum_steps),
                         nonfinite_policy=cfg.train.nonfinite)
  loss_eval = make_lm_evaluate(ctx, lm, eval_batches)
  world_eval = (WorldEvaluator(cfg, lm, ctx.tokenizer, ctx.writer)
                if cfg.data.source == "world" and int(cfg.eval.num_prompts) > 0 else None)

  def evaluate(state):
    metrics = dict(loss_eval(state)) if loss_eval else {}
    if world_eval is not None:
      metrics.update(world_eval(state.params, int(state.step)))
    return metrics

  return Run(name="sft", state=state, train_step=step, batches=train_iter,
             evaluate=evaluate if (loss_eval or world_eval) else None, tokens_per_batch=tokens_in,
             total_steps=int(cfg.train.steps))


def export(ctx: StageContext, state) -> None:
  ckpt_lib.save_export(ctx.cfg.workdir, state.params, model=ctx.model, stage="sft",
                       tokenizer=ctx.cfg.tokenizer,
                       chat_template=ctx.cfg.data.chat_template)


ALGORITHM = Algorithm(name="sft", records="sft", section=None, hparams=(), upstream={"init": "pretrain"},
                      build=build_run, export=export, validate=validate)
