"""Stage 1, next-token pretraining: packed documents, masked cross-entropy.

Data: the world's "internet" corpus by default, or `data.train_files` (text, one document per
line or per file; JSONL/Parquet with a "text" field). Documents become `<bos> text <eos>` and
are packed into `data.seq_len` rows with segment ids; longer documents are split (or truncated)
and counted. Eval: mean held-out loss (nats per token) and perplexity over a fixed set of
`eval.batches` batches.
"""

from __future__ import annotations

import math

import jax

from alignax import checkpoint as ckpt_lib
from alignax import parallel
from alignax.algorithms.base import Algorithm
from alignax.algorithms.common import init_lm_state, stage_datasets
from alignax.losses.lm import masked_cross_entropy
from alignax.train.loop import Run
from alignax.train.optimizer import make_optimizer
from alignax.train.runner import StageContext
from alignax.train.step import make_train_step


def lm_loss(lm):
  """Masked next-token cross-entropy of an LM batch: (sum nats, loss tokens, metrics)."""
  def loss_fn(params, batch, rng, extra, hparams):
    """Masked cross-entropy of an LM batch {"tokens", "positions", "segment_ids", "loss_mask"}
    [B, T]: (sum, count, metrics) of the batch: `sum` of the per-loss token loss in nats, `count` of loss tokens
    (the step divides the summed sums by the summed counts, so micro-batches and devices weigh
    every loss token alike), `metrics` {name: scalar}."""
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


def build_run(ctx: StageContext) -> Run:
  """The pretraining Run: a fresh model (`config.seed`), packed `data.seq_len` rows of documents
  (batches of `train.batch_size` rows, this process's share), the masked-LM step, and the held-out
  loss on `eval.batches` fixed batches."""
  config = ctx.config
  data = stage_datasets(ctx, "lm")

  optimizer = make_optimizer(config.optimizer, config.train.steps)
  lm, state = init_lm_state(ctx.placement, ctx.model, optimizer, config.seed)
  step = make_train_step(lm_loss(lm), optimizer, accum_steps=config.train.accum_steps,
                         nonfinite_policy=config.train.nonfinite)
  return Run(name="pretrain", state=state, train_step=step, batches=data.train,
             evaluate=make_lm_evaluate(ctx, lm, data.eval), total_steps=config.train.steps)


def export(ctx: StageContext, state) -> None:
  """Writes WORKDIR/export: the params, model config and tokenizer (no chat template)."""
  ckpt_lib.save_export(ctx.config.workdir, state.params, model=ctx.model, stage="pretrain",
                       tokenizer=ctx.config.tokenizer,
                       chat_template=ctx.config.data.chat_template)


ALGORITHM = Algorithm(name="pretrain", records="text", section=None, hparams=(), upstream={},
                      build=build_run, export=export, chat=False,
                      report_name="base", report_format="raw")

