"""Stage 1, next-token pretraining: packed documents, masked cross-entropy.

Data: the world's "internet" corpus by default, or `data.train_files` (text, one document per
line or per file; JSONL/Parquet with a "text" field). Documents become `<bos> text <eos>` and
are packed into `data.seq_len` rows with segment ids; longer documents are split (or truncated)
and counted. Eval: mean held-out loss (nats per token) and perplexity over a fixed set of
`train.eval_batches` batches.
"""

from __future__ import annotations

import math

import jax

from alignax import checkpoint as ckpt_lib
from alignax import parallel
from alignax.algorithms.base import Algorithm
from alignax.algorithms.common import (init_lm_state, process_batch_size, shard_args, take_batches,
                                       tokens_in)
from alignax.config import ConfigDict, ConfigError
from alignax.data import pipeline, sources
from alignax.losses.lm import masked_cross_entropy
from alignax.train.loop import Run
from alignax.train.optimizer import make_optimizer
from alignax.train.runner import StageContext
from alignax.train.step import make_train_step


def lm_loss(lm):
  """Masked next-token cross-entropy of an LM batch: (sum nats, loss tokens, metrics)."""
  def loss_fn(params, batch, rng, extra, hparams):
    logits, _ = lm.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return masked_cross_entropy(logits, batch["tokens"], batch["loss_mask"])
  return loss_fn


def make_lm_evaluate(ctx: StageContext, lm, eval_batches: list):
  """`evaluate(state) -> {"loss", "perplexity", "tokens"}` over fixed host batches."""
  if not eval_batches:
    return None
  loss_fn = lm_loss(lm)
  cache = {}

  def evaluate(state):
    if "fn" not in cache:
      cache["fn"] = parallel.jit_eval(ctx.placement, lambda p, b: loss_fn(p, b, None, None, None)[:2],
                                      state.params)
    total, count = 0.0, 0.0
    for batch in eval_batches:
      s, c = jax.device_get(cache["fn"](state.params, ctx.placement.put_batch(batch)))
      total, count = total + float(s), count + float(c)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
  return evaluate


def validate(cfg: ConfigDict) -> None:
  if cfg.data.long_docs not in pipeline.LONG_DOC_POLICIES:
    raise ConfigError(f"config.data.long_docs: must be one of {pipeline.LONG_DOC_POLICIES}, "
                      f"got {cfg.data.long_docs!r}")
  if cfg.data.text_mode not in ("lines", "file"):
    raise ConfigError(f"config.data.text_mode: must be 'lines' or 'file', got {cfg.data.text_mode!r}")


def build_run(ctx: StageContext) -> Run:
  cfg = ctx.cfg
  splits = sources.split_sources(cfg, "pretrain")
  batch = process_batch_size(int(cfg.train.batch_size))
  common = dict(batch_size=batch, seq_len=int(cfg.data.seq_len), long_docs=cfg.data.long_docs,
                bad_records=cfg.data.bad_records, **shard_args())
  train_iter = pipeline.lm_pipeline(splits["train"], ctx.tokenizer, seed=int(cfg.seed), num_epochs=None,
                                    **common)
  eval_batches = []
  if splits["eval"] is not None and int(cfg.train.eval_batches) > 0:
    eval_iter = pipeline.lm_pipeline(splits["eval"], ctx.tokenizer, shuffle=False, num_epochs=1, **common)
    eval_batches = take_batches(eval_iter, int(cfg.train.eval_batches))

  optimizer = make_optimizer(cfg.optimizer, int(cfg.train.steps))
  lm, state = init_lm_state(ctx.placement, ctx.model, optimizer, int(cfg.seed))
  step = make_train_step(lm_loss(lm), optimizer, accum_steps=int(cfg.train.accum_steps),
                         nonfinite_policy=cfg.train.nonfinite)
  return Run(name="pretrain", state=state, train_step=step, batches=train_iter,
             evaluate=make_lm_evaluate(ctx, lm, eval_batches), tokens_per_batch=tokens_in,
             total_steps=int(cfg.train.steps))


def export(ctx: StageContext, state) -> None:
  ckpt_lib.save_export(ctx.cfg.workdir, state.params, model=ctx.model, stage="pretrain",
                       tokenizer=ctx.cfg.tokenizer,
                       chat_template=ctx.cfg.data.chat_template)


ALGORITHM = Algorithm(name="pretrain", records="text", section=None, hparams=(), upstream={},
                      build=build_run, export=export, validate=validate, chat=False,
                      report_name="base", report_format="raw")

