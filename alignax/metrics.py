"""Metrics out of the run: `WORKDIR/metrics.jsonl`, TensorBoard event files, a progress bar.

Each JSONL line is one object: {"step": int, "time": unix seconds, "train/loss": float, ...}.
Names are "<phase>/<metric>" (train/, eval/). Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import numpy as np
from absl import logging


def _to_float(value):
  value = np.asarray(value)
  return float(value) if value.size == 1 else None


class MetricsWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._want_tb = enabled and tensorboard
    self._tb = None
    self._purge_step: int | None = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  @property
  def tensorboard(self):
    """The TensorBoard writer, opened at the first use. After `truncate_after(step)` it is opened
    with `purge_step=step + 1`, so TensorBoard hides the events an earlier attempt wrote after
    that step, as metrics.jsonl drops its rows."""
    if self._tb is None and self._want_tb:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=self.workdir, flush_secs=10, purge_step=self._purge_step)
    return self._tb

  def write(self, step: int, metrics: Mapping[str, object]) -> dict:
    """Writes scalar metrics for `step`; non-scalars are dropped. Returns what was written."""
    row = {"step": int(step), "time": round(time.time(), 3)}
    for name, value in metrics.items():
      v = _to_float(value)
      if v is not None:
        row[name] = v if math.isfinite(v) else str(v)
    if self.enabled:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
      tb = self.tensorboard
      if tb is not None:
        for name, v in row.items():
          if name not in ("step", "time") and isinstance(v, float):
            tb.add_scalar(name, v, int(step))
    return row

  def write_text(self, step: int, name: str, text: str) -> None:
    """A text panel in TensorBoard (e.g. a table of samples)."""
    if self.enabled and self.tensorboard is not None:
      self.tensorboard.add_text(name, text, int(step))

  def truncate_after(self, step: int) -> int:
    """Drops rows with step > `step` (written after the checkpoint a resumed run starts from).

    Returns how many rows were dropped; the count is logged, so nothing disappears silently.
    Call it before the first `write`: TensorBoard's purge is set when its writer opens.
    """
    if self._tb is None and self._purge_step is None:
      self._purge_step = step + 1
    if not self.enabled or not os.path.exists(self.path):
      return 0
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line)
      except (json.JSONDecodeError, KeyError):
        pass  # a line cut short by a kill mid-write
    dropped = len(lines) - len(keep)
    if dropped:
      tmp = self.path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
      logging.info("metrics.jsonl: dropped %d rows after step %d (written after the last checkpoint)",
                   dropped, step)
    return dropped

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `WORKDIR/metrics.jsonl`."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A tqdm bar over steps showing step, loss and tokens/s; silent when disabled."""

  def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0.5)

  def update(self, n: int = 1, **postfix):
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                              refresh=False)
      self._bar.update(n)

  def close(self):
    if self._bar is not None:
      self._bar.close()
