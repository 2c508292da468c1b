"""Runs one stage end to end: validate -> place -> build -> loop (resume, signals) -> export.

Every stage module provides `build_run(ctx) -> Run` and `export(ctx, state)`; this file does the
rest once, so stages contain only what differs between algorithms.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import jax
from absl import logging

from alignax import checkpoint as ckpt_lib
from alignax import metrics as metrics_lib
from alignax import parallel
from alignax.config import ConfigDict, RunConfig, resolve, save_config
from alignax.errors import ConfigError
from alignax.data.sources import resolve_tokenizer
from alignax.data.tokenizers import resolve_chat_template_name
from alignax.data.tokenizer import Tokenizer
from alignax.models.config import ModelConfig
from alignax.train.loop import Run, run_loop
from alignax.train.state import TrainState
from alignax.train.workdir_lock import WorkdirLock


@dataclasses.dataclass
class StageContext:
  """What a stage's builder receives."""

  cfg: ConfigDict  # the whole config; a stage reads only its own section (`cfg.dpo`, ...) from it
  config: RunConfig  # the shared sections, typed and validated
  model: ModelConfig
  placement: parallel.Placement
  tokenizer: Tokenizer
  writer: metrics_lib.MetricsWriter
  is_main: bool
  stage_data: dict = dataclasses.field(default_factory=dict)  # what build_run leaves for export


@dataclasses.dataclass
class StageResult:
  state: TrainState
  finished: bool  # reached train.steps (False when stopped by a signal)
  workdir: str


def stage_tokenizer(config: RunConfig) -> Tokenizer:
  """The tokenizer a resolved config names (`config.tokenizer`)."""
  return resolve_tokenizer(config.tokenizer, config.data, config.world)


def log_to_file(workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  handler = logging.get_absl_handler()
  try:
    handler.use_absl_log_file("log", workdir)
  except Exception:  # pragma: no cover - logging must never stop a run
    pass


def run_training(cfg: ConfigDict, build_run: Callable[[StageContext], Run],
                 export: Callable[[StageContext, TrainState], None] | None = None,
                 validate: Callable[[ConfigDict], None] | None = None) -> StageResult:
  """Trains a stage with the shared machinery.

  Args:
    cfg: the resolved config.
    build_run: builds the stage's Run (initial state, step, data, eval).
    export: writes the stage's export when training finishes.
    validate: stage-specific config checks (raise ConfigError naming the key).
  """
  # Signals are caught from here on, so SIGTERM during start-up or export ends the run cleanly
  # (at the next step boundary, or once the export is complete) instead of killing it mid-write.
  with ckpt_lib.StopSignal() as stop:
    cfg = with_concrete_chat_template(cfg)
    config = resolve(cfg)
    parallel.maybe_initialize_distributed(config.parallel.distributed)
    model = config.model
    if config.lora.enabled and config.stage == "pretrain":
      raise ConfigError("config.model.lora.rank: LoRA adapts a trained model; pretraining trains "
                        "every weight (set model.lora.rank=0)")
    if validate is not None:
      validate(cfg)
    tokenizer = stage_tokenizer(config)
    if tokenizer.vocab_size > model.vocab_size:
      raise ConfigError(f"config.model.vocab_size: {model.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({tokenizer.vocab_size})")
    placement = parallel.make_placement(config.parallel, model, config.train.batch_size)
    is_main = parallel.is_main_process()
    workdir = config.workdir
    with WorkdirLock(workdir, enabled=is_main):
      # A refused resume leaves the saved config.json as it was.
      ckpt_lib.check_resume(workdir, cfg.to_dict(), config.train)
      if is_main:
        save_config(cfg, workdir)
        log_to_file(workdir)
      logging.info("stage %s: workdir %s, mesh %s, %d processes", config.stage, workdir,
                   parallel.describe(placement.mesh), jax.process_count())
      writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
      ctx = StageContext(cfg=cfg, config=config, model=model, placement=placement, tokenizer=tokenizer, writer=writer,
                         is_main=is_main)
      run = build_run(ctx)
      checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint, cfg.to_dict(),
                                           state_sharding=placement.state_sharding,
                                           resume=config.train.resume)
      try:
        state = run_loop(run, config.train, placement=placement, eval_every=config.eval.every,
                         checkpoint_every=config.checkpoint.every, checkpointer=checkpointer,
                         writer=writer, is_main=is_main, stop_requested=stop.requested)
        step = int(jax.device_get(state.step))
        finished = step >= run.total_steps
        if finished and export is not None:
          export(ctx, state)
      finally:
        checkpointer.close()
        writer.close()
  if not finished:
    print(stopped_message(step, checkpointer.last_saved, workdir), file=sys.stderr)
  return StageResult(state=state, finished=finished, workdir=workdir)


def with_concrete_chat_template(cfg: ConfigDict) -> ConfigDict:
  """`cfg` (a copy, when it changes) whose `data.chat_template` names the template itself
  ("auto" resolved for the tokenizer), so config.json, the resume check and the export record
  what the run trains with."""
  import copy
  name = cfg.data.get("chat_template", "auto") if "data" in cfg else "auto"
  if "data" not in cfg or name != "auto":
    return cfg
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    cfg.data.chat_template = resolve_chat_template_name(str(cfg.get("tokenizer", "bytes")), name)
  return cfg


def stopped_message(step: int, saved: int | None, workdir: str) -> str:
  """What a run stopped by a signal tells the user."""
  if saved is None:
    return (f"alignax: stopped at step {step} by a signal, before any checkpoint; nothing is saved "
            f"in {workdir} yet.")
  return (f"alignax: stopped at step {step} by a signal; checkpoint step {saved} is saved in "
          f"{workdir}. Run the same command to resume.")
