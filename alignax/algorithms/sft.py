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
from alignax.algorithms.common import init_lm_state, load_lm_export, stage_datasets
from alignax.algorithms.pretrain import lm_loss, make_lm_evaluate
from alignax.algorithms.world_eval import WorldEvaluator
from alignax.train.loop import Run
from alignax.train.optimizer import make_optimizer
from alignax.train.runner import StageContext
from alignax.train.step import make_train_step


def build_run(ctx: StageContext) -> Run:
  """The SFT Run: the `init.workdir` export's params, conversation rows through the chat template
  (loss on assistant tokens, `data.packing` packs them), the masked-LM step of pretraining, and
  evaluation: held-out assistant-token loss plus, on the world, the sampled gold evaluation."""
  config = ctx.config
  data = stage_datasets(ctx, "sft")
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  _, params = load_lm_export(ctx.cfg.init.workdir, ctx.model, ctx.placement)
  lm, state = init_lm_state(ctx.placement, ctx.model, optimizer, config.seed, params=params,
                             config=config)
  step = make_train_step(lm_loss(lm), optimizer, accum_steps=config.train.accum_steps,
                         nonfinite_policy=config.train.nonfinite)
  loss_eval = make_lm_evaluate(ctx, lm, data.eval)
  world_eval = (WorldEvaluator(config, lm, ctx.tokenizer, ctx.writer)
                if config.data.source == "world" and config.eval.num_prompts > 0 else None)

  def evaluate(state):
    metrics = dict(loss_eval(state)) if loss_eval else {}
    if world_eval is not None:
      metrics.update(world_eval(state.params, int(state.step)))
    return metrics

  return Run(name="sft", state=state, train_step=step, batches=data.train,
             evaluate=evaluate if (loss_eval or world_eval) else None,
             total_steps=config.train.steps)


def export(ctx: StageContext, state) -> None:
  """Writes WORKDIR/export with the chat template the model was trained on."""
  ckpt_lib.save_export(ctx.config.workdir, state.params, model=ctx.model, stage="sft",
                       tokenizer=ctx.config.tokenizer,
                       chat_template=ctx.config.data.chat_template)


ALGORITHM = Algorithm(name="sft", records="sft", section=None, hparams=(), upstream={"init": "pretrain"},
                      build=build_run, export=export)
