"""The one training loop: data -> step -> metrics -> eval -> checkpoint, for every stage.

A stage hands the loop a `Run`: its initial state, an un-jitted `train_step`, a checkpointable
batch iterator and an `evaluate` function. The loop owns everything with side effects: device
placement, jit, the progress bar, metrics files, checkpoints and signals.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from alignax import metrics as metrics_lib
from alignax.data.iterators import measure
from alignax.train.config import TrainConfig
from alignax.train.state import TrainState


class HaltError(RuntimeError):
  """The non-finite guard stopped the run (policy "halt")."""


@dataclasses.dataclass
class Run:
  """What a stage contributes to the loop.

  Attributes:
    name: stage name, shown on the progress bar.
    state: the initial TrainState (replaced by a checkpoint when resuming).
    train_step: `(state, batch) -> (state, metrics)`, pure; the loop jits it.
    batches: an iterator of host batches with `get_state()`/`set_state()` (for exact resume) and
      optionally `stats()` (counters of the data pipeline, logged).
    evaluate: `(state) -> {name: float}` or None; names without a prefix get "eval/".
    total_steps: steps to run.
    tokens_per_batch: tokens a batch trains on (for tokens/s), or a function of the host batch;
      None (offline stages): the data pipeline's own count of the batch's non-padding tokens
      (`batch_tokens`), over all processes.
    on_log: optional `(step, row) -> None` hook after each metrics row (e.g. extra text panels).
    after_step: optional `(step, metrics) -> None` check after every step (e.g. that a host-side
      reward function succeeded); when it raises, the loop saves a checkpoint, then re-raises.
  """

  name: str
  state: TrainState
  train_step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, jax.Array]]]
  batches: Iterator
  evaluate: Callable[[TrainState], Mapping[str, float]] | None
  total_steps: int
  tokens_per_batch: int | Callable[[Any], int] | None = None
  on_log: Callable[[int, dict], None] | None = None
  after_step: Callable[[int, Mapping[str, jax.Array]], None] | None = None


def batch_tokens(host_batch) -> int:
  """Non-padding tokens of a host batch, over all processes: the count the data pipeline
  keeps (`stats()["tokens"]`), so tokens/s and the data counters agree."""
  return measure(host_batch)[0] * jax.process_count()


def tokens_of(run: Run, host_batch) -> int:
  n = run.tokens_per_batch
  if n is None:
    return batch_tokens(host_batch)
  return n(host_batch) if callable(n) else n


def _step_of(state) -> int:
  return int(np.asarray(jax.device_get(state.step)).max())  # members all share the step


PHASES = ("train", "eval", "data")


def _prefixed(prefix: str, values: Mapping[str, Any]) -> dict:
  """Names under `prefix/` unless they already name a phase (so a loss's "rewards/accuracy" is
  train/rewards/accuracy in training rows and eval/rewards/accuracy in eval rows)."""
  return {(k if k.split("/", 1)[0] in PHASES else f"{prefix}/{k}"): v for k, v in values.items()}


def _raise_if_failing(state: TrainState, train: TrainConfig, total_steps: int, checkpointer) -> None:
  """Stops a "skip" run whose non-finite steps exceed `train.max_nonfinite` (HaltError)."""
  if train.nonfinite != "skip":
    return
  count = int(np.asarray(jax.device_get(state.nonfinite)).max())  # [M] for members: the worst
  limit = train.nonfinite_limit(total_steps)
  if count > limit:
    saved = getattr(checkpointer, "last_saved", None)
    where = f"the last good checkpoint is step {saved}" if saved is not None else "no checkpoint was saved"
    raise HaltError(f"{count} of {_step_of(state)} steps had a non-finite loss, gradient or update, more "
                    f"than train.max_nonfinite={train.max_nonfinite} allows ({limit:g} of "
                    f"train.steps={total_steps}); their updates were skipped, so no params are "
                    f"non-finite; {where}. Lower optimizer.lr or check "
                    f"the data (train/nonfinite in metrics.jsonl counts them)")


def _raise_if_halted(state: TrainState, checkpointer) -> None:
  # halted_at is a scalar, or [M] for the members of a vectorized sweep (any member stops all)
  halted = np.asarray(jax.device_get(state.halted_at)).reshape(-1)
  if not (halted >= 0).any():
    return
  saved = getattr(checkpointer, "last_saved", None)
  first = int(halted[halted >= 0].min())
  which = "" if halted.size == 1 else f" in member(s) {np.flatnonzero(halted >= 0).tolist()}"
  raise HaltError(f"non-finite loss, gradient or update at step {first + 1}{which} (train.nonfinite='halt'); "
                  f"updates stopped there, so the params are those after step {first}; "
                  f"the last good checkpoint is step {saved}")


def run_loop(run: Run, train: TrainConfig, *, placement, eval_every: int = 0, checkpoint_every: int = 0,
             checkpointer=None, writer: metrics_lib.MetricsWriter, is_main: bool = True,
             stop_requested: Callable[[], bool] = lambda: False) -> TrainState:
  """Trains `run` to `run.total_steps`, resuming from `checkpointer` when it holds a step.

  Args:
    run: the stage's pieces.
    train: log_every, progress bar, the non-finite policy and budget.
    eval_every: steps between `run.evaluate` calls (`eval.every`; 0: only at the start and end).
    checkpoint_every: steps between saves (`checkpoint.every`; 0: only at the end).
    placement: an object with `state_sharding(state)`, `put_batch(batch)` and `jit_step(fn, state)`
      (from `alignax.parallel`).
    checkpointer: None, or an object with `restore(state, batches) -> state | None`,
      `maybe_save(step, state, batches, force=False)` and `wait()`.
    writer: the metrics writer.
    stop_requested: polled after each step; when True the loop saves and returns early.

  Returns:
    The final state.
  """
  state = run.state
  restored = checkpointer.restore(state, run.batches) if checkpointer is not None else None
  if restored is not None:
    state = restored
  # Rows written after the restored step (or, starting fresh, by an attempt killed before its
  # first checkpoint) would be written again: drop them (counted in the log).
  writer.truncate_after(_step_of(state) if restored is not None else -1)
  start = _step_of(state)
  if stop_requested():  # a signal during start-up: nothing trained, nothing to save
    logging.warning("stop requested before step %d: exiting before training", start + 1)
    return state
  step_fn = placement.jit_step(run.train_step, state)
  log_every, ckpt_every = train.log_every, checkpoint_every

  if start == 0 and eval_every and run.evaluate is not None:
    writer.write(0, _prefixed("eval", run.evaluate(state)))  # the baseline every curve starts from
  progress = metrics_lib.Progress(run.total_steps, start, run.name, enabled=is_main and train.progress)
  t_last, tokens_since = time.perf_counter(), 0
  step = start
  try:
    while step < run.total_steps:
      host_batch = next(run.batches)
      tokens_since += tokens_of(run, host_batch)
      state, step_metrics = step_fn(state, placement.put_batch(host_batch))
      step += 1
      if run.after_step is not None:
        try:
          run.after_step(step, step_metrics)
        except Exception:
          if checkpointer is not None:
            checkpointer.maybe_save(step, state, run.batches, force=True)
          raise
      if step % log_every == 0 or step == run.total_steps:
        fetched = jax.device_get(step_metrics)
        now = time.perf_counter()
        row = _prefixed("train", fetched)
        row["train/tokens_per_sec"] = tokens_since / max(now - t_last, 1e-9)
        t_last, tokens_since = now, 0
        if hasattr(run.batches, "stats"):
          row.update({f"data/{k}": v for k, v in run.batches.stats().items()})
        written = writer.write(step, row)
        if run.on_log is not None:
          run.on_log(step, written)
        progress.update(0, loss=written.get("train/loss", float("nan")),
                        tok_s=int(written["train/tokens_per_sec"]))
        _raise_if_halted(state, checkpointer)
        _raise_if_failing(state, train, run.total_steps, checkpointer)
      if eval_every and step % eval_every == 0 and step < run.total_steps and run.evaluate is not None:
        writer.write(step, _prefixed("eval", run.evaluate(state)))
      if checkpointer is not None and ckpt_every and step % ckpt_every == 0:
        _raise_if_halted(state, checkpointer)
        _raise_if_failing(state, train, run.total_steps, checkpointer)
        checkpointer.maybe_save(step, state, run.batches)
      progress.update(1)
      if stop_requested():
        logging.warning("stop requested at step %d: saving and exiting", step)
        if checkpointer is not None:
          checkpointer.maybe_save(step, state, run.batches, force=True)
        return state
    _raise_if_halted(state, checkpointer)
    _raise_if_failing(state, train, run.total_steps, checkpointer)
    # A rerun of a finished run trains nothing: its final eval row is already there.
    if run.evaluate is not None and step == run.total_steps and step > start:
      writer.write(step, _prefixed("eval", run.evaluate(state)))
    if checkpointer is not None:
      checkpointer.maybe_save(step, state, run.batches, force=True)
  finally:
    progress.close()
    writer.flush()
    if checkpointer is not None:
      checkpointer.wait()
  return state
