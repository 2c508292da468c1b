"""The grain iterator stages every pipeline ends in, and their counters.

Iterators (`DataIterator`) are grain `DatasetIterator`s: `get_state()` is a JSON-serializable
dict and `set_state(state)` resumes exactly (same next batch as an uninterrupted iterator,
packing included). `stats()` returns the counters the training loop logs:

  records           records read from the source, every epoch (the packer reads a little ahead
                    of what it has emitted, so this includes records waiting in its bins)
  examples          sequences handed to packing/batching (after splitting long documents)
  usable_records    distinct records of the source the pipeline can use (validation pass)
  skipped/<reason>  distinct records of the source skipped (validation pass; not re-counted per
                    epoch): invalid (including records the file readers left out),
                    identical_pair, empty_response, prompt_too_long, empty_text (those obey
                    `bad_records`), too_long (too_long="skip")
  truncated, truncated_tokens   sequences cut to fit and the tokens they lost
  split, split_chunks           documents longer than seq_len and the chunks they became
  batches, rows, tokens, loss_tokens   emitted; tokens counts non-padding positions
  padding_rows      empty rows added to fill the last batch
  dropped_rows, dropped_tokens  the short last batch dropped by drop_remainder=True
  epoch             the (0-based) epoch of the latest record read
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import grain
import numpy as np

from alignax.data import schemas
from alignax.data.screening import POLICY_REASONS
from alignax.errors import DataError

Example = dict[str, Any]
Batch = dict[str, Any]

_GAUGES = frozenset({"epoch"})  # merged by max, not summed


class CountingIterator(grain.DatasetIterator):
  """A grain iterator stage that keeps counters; they are part of its checkpoint state."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.counts: dict[str, int] = {}

  def _count(self, key: str, n: int = 1) -> None:
    self.counts[key] = self.counts.get(key, 0) + int(n)


class ScreenIterator(CountingIterator):
  """Counts records; skips (or raises on) marked ones; splits sequences longer than `split_len`.

  Skipped records are not counted here: the validation pass counted each once (see
  `DataIterator.stats`). As a last guard against spinning, an epoch (`epoch_len` records of
  this shard) in which no record was usable raises DataError.

  One record can become several examples (chunks), so the state remembers the parent state
  before the record being split and how many of its chunks were emitted.
  """

  def __init__(self, parent, *, bad_records: str, split_len: int | None, epoch_len: int):
    super().__init__(parent)
    self._bad_records = bad_records
    self._split_len = split_len
    self._epoch_len = epoch_len
    self._chunks: list[Example] = []
    self._next = 0
    self._doc_state: dict | None = None
    self._guard = {"epoch": 0, "seen": 0, "usable": 0}  # records of the current epoch

  def __next__(self) -> Example:
    while True:
      if self._next < len(self._chunks):
        out = self._chunks[self._next]
        self._next += 1
        self._count("examples")
        return out
      self._doc_state = self._parent.get_state()
      self._chunks = self._process(next(self._parent), count=True)
      self._next = 0

  def _process(self, ex: Example, *, count: bool) -> list[Example]:
    reason = ex.get("_skip")
    if count:
      self._count("records")
      epoch = ex.pop("_epoch", 0)
      self.counts["epoch"] = max(self.counts.get("epoch", 0), epoch)
      self._watch(epoch, usable=reason is None, ex=ex)
    if reason is not None:
      if reason in POLICY_REASONS and self._bad_records == "error":
        raise DataError(f"{ex.get('_where', 'record')}: {ex['_message']} (bad_records='error'; "
                        f"pass bad_records='skip' to skip and count such records)")
      return []
    if count:
      for key, n in ex.get("_counts", {}).items():
        self._count(key, n)
    ex = {k: v for k, v in ex.items() if not k.startswith("_")}
    if self._split_len is None or len(ex["tokens"]) <= self._split_len:
      return [ex]
    n = len(ex["tokens"])
    starts = range(0, n, self._split_len)
    if count:
      self._count("split")
      self._count("split_chunks", len(starts))
    return [{k: v[s:s + self._split_len] for k, v in ex.items()} for s in starts]

  def _watch(self, epoch: int, *, usable: bool, ex: Example) -> None:
    """Raises once a whole epoch of this shard went by without one usable record."""
    g = self._guard
    if epoch != g["epoch"]:
      g.update(epoch=epoch, seen=0, usable=0)
    g["seen"] += 1
    g["usable"] += int(usable)
    if g["seen"] >= self._epoch_len and not g["usable"]:
      raise DataError(f"an epoch of {self._epoch_len} records gave no usable record (the last: "
                      f"{ex.get('_where', 'record')}: {ex.get('_message', '')}); stopping "
                      f"instead of reading the same bad records forever")

  def get_state(self) -> dict[str, Any]:
    mid = self._next < len(self._chunks)
    return {"parent": self._doc_state if mid else self._parent.get_state(),
            "chunk": self._next if mid else 0,
            "counts": dict(self.counts), "guard": dict(self._guard)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    # Skips are counted by the validation pass now; older states counted every encounter.
    self.counts = {k: v for k, v in state["counts"].items() if not k.startswith("skipped/")}
    self._guard = dict(state.get("guard") or {"epoch": 0, "seen": 0, "usable": 0})
    self._chunks, self._next = [], 0
    if state["chunk"]:
      # Re-read the record that was being split (already counted) and resume mid-way.
      self._doc_state = self._parent.get_state()
      self._chunks = self._process(next(self._parent), count=False)
      self._next = state["chunk"]


class FixedBatchIterator(CountingIterator):
  """Makes every batch exactly `batch_size` rows: a short last batch is padded or dropped."""

  def __init__(self, parent, *, batch_size: int, drop_remainder: bool, pad_id: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._pad_id = pad_id

  def __next__(self) -> Batch:
    while True:
      batch = next(self._parent)
      rows = num_rows(batch)
      if rows == self._batch_size:
        break
      if self._drop_remainder:
        self._count("dropped_rows", rows)
        self._count("dropped_tokens", measure(batch)[0])
        continue  # the parent is exhausted: the next call raises StopIteration
      batch = pad_rows(batch, self._batch_size - rows, self._pad_id)
      self._count("padding_rows", self._batch_size - rows)
      break
    tokens, loss_tokens = measure(batch)
    self._count("batches")
    self._count("rows", self._batch_size)
    self._count("tokens", tokens)
    self._count("loss_tokens", loss_tokens)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "counts": dict(self.counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.counts = dict(state["counts"])


class Stage(grain.IterDataset):
  """Wraps one of the iterators above as a grain IterDataset."""

  def __init__(self, parent: grain.IterDataset, make: Callable[[Any], grain.DatasetIterator]):
    super().__init__(parent)
    self._make = make

  def __iter__(self) -> grain.DatasetIterator:
    return self._make(self._parent.__iter__())


class MapBatches:
  """Applies `fn` to each batch of a pipeline's iterator on the host, passing `get_state`,
  `set_state` and `stats` through, so the wrapped iterator checkpoints and reports as before."""

  def __init__(self, it, fn: Callable[[Batch], Batch]):
    self._it, self._fn = it, fn

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return self._fn(next(self._it))

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)

  def stats(self) -> dict[str, int]:
    return self._it.stats()


class DataIterator(grain.DatasetIterator):
  """The iterator every pipeline returns: numpy batch dicts with fixed shapes.

  `get_state()` -> JSON-serializable dict; `set_state(state)` resumes exactly;
  `stats()` -> dict of counters (see the module docstring).
  """

  def __init__(self, parent: grain.DatasetIterator, *, info: Mapping[str, Any],
               data_counts: Mapping[str, int] | None = None):
    super().__init__(parent)
    self.info = dict(info)  # the pipeline's arguments, for logs
    # What the validation pass found in the source ("usable_records", "skipped/<reason>"):
    # fixed for the source, so not part of the checkpoint state.
    self.data_counts = dict(data_counts or {})

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def stats(self) -> dict[str, int]:
    """Counters summed over the pipeline's counting stages (gauges like "epoch" by max), plus
    the validation pass's distinct-record counts."""
    out: dict[str, int] = dict(self.data_counts)
    stack: list[Any] = [self]
    while stack:
      it = stack.pop()
      if isinstance(it, CountingIterator):
        for k, v in it.counts.items():
          out[k] = max(out.get(k, 0), v) if k in _GAUGES else out.get(k, 0) + v
      stack.extend(getattr(it, "_parents", ()))
    return dict(sorted(out.items()))


class PromptIterator(DataIterator):
  """Yields `(arrays, records)`: the batch and, per row, the validated source record (with all
  its extra fields, e.g. the answer a reward function needs), or None for an empty filler row."""

  def __init__(self, parent, *, info, source, data_counts=None):
    super().__init__(parent, info=info, data_counts=data_counts)
    self._source = source

  def __next__(self) -> tuple[Batch, list[dict | None]]:
    arrays = next(self._parent)
    records = [schemas.validate_prompts(self._source[int(i)]) if i >= 0 else None
               for i in arrays["index"]]
    return arrays, records


def num_rows(batch: Batch) -> int:
  for v in batch.values():
    return num_rows(v) if isinstance(v, dict) else len(v)
  raise ValueError("empty batch")


def pad_rows(batch: Batch, n: int, pad_id: int) -> Batch:
  """Appends n empty rows: tokens = pad_id, index = -1, everything else 0."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, dict):
      out[k] = pad_rows(v, n, pad_id)
      continue
    fill = pad_id if k == "tokens" else (-1 if k in ("index", "gold_label") else 0)
    out[k] = np.concatenate([v, np.full((n,) + v.shape[1:], fill, v.dtype)])
  return out


def measure(batch: Batch) -> tuple[int, int]:
  """(non-padding tokens, loss tokens) over every LM sub-batch of `batch`."""
  tokens = loss = 0
  for k, v in batch.items():
    if isinstance(v, dict):
      t, l = measure(v)
      tokens, loss = tokens + t, loss + l
    elif k == "segment_ids":
      tokens += int(np.count_nonzero(v))
    elif k == "loss_mask":
      loss += int(np.count_nonzero(v))
  return tokens, loss
