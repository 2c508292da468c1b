"""Grain pipelines: records -> fixed-shape numpy batches for one process.

Every pipeline has the same spine (grain for reading, shuffling, mapping, packing, batching):

  validation pass over the whole source (when the pipeline is built, before any batch)-->
  source indices --shard--> [i::shard_count] --shuffle(seed)--> --repeat(num_epochs)-->
  --map: fetch record, validate, tokenize (numpy)--> --screen: skip or raise, split-->
  --pack (grain FirstFitPackIterDataset) or one example per row--> --batch(B)-->
  --fixed batches: a short last batch is padded with empty rows or dropped, and counted-->

The validation pass (`screen_source`) runs every record through the same validate/encode the
map runs, once, so bad records are known before training compiles anything:
  * bad_records="error": any record the pipeline could not use raises one DataError listing
    the first few with file:line and the count per reason;
  * bad_records="skip": each reason is logged once (absl WARNING, one line per reason, with
    the first file:line), and `stats()` reports the distinct records per reason from the
    first batch on; later epochs skip those records without counting them again;
  * nothing usable at all (or a shard with nothing usable) raises DataError naming the
    files, whatever the policy: a repeating pipeline would otherwise spin forever.
The pass covers the whole source on every process (not just its shard), so every process
stops on the same error and reports the same counts.

Conversations (SFT, preference, unpaired, prompts) go through `chat_template` ("markers", the
default, or "plain"; see `alignax.data.chat`).

`source` is anything with `len()` and `[i]` giving a record dict: a list (e.g. from
`readers.read_records` or `World.splits()`), or a TFDS data source from `tfds_builders`.

Batch contract (all `[B, T]`, B = `batch_size` per process):
  tokens int32, positions int32, segment_ids int32, loss_mask float32.
  segment_ids == 0 is padding; packed documents in a row get ids 1, 2, 3, ...; positions
  restart at 0 for each document (or chunk); loss_mask[t] = 1 where predicting tokens[t] from
  tokens[<t] counts, so it is 0 on the first token of every segment and on padding.

Shapes never change: with `drop_remainder=False` (default) a short last batch is filled with
empty rows (segment_ids 0, loss_mask 0; "valid" 0 and "index" -1 where those exist), so
pair/prompt losses must weight rows by "valid". With `drop_remainder=True` it is dropped.
Either way it is counted.

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

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from alignax.data import chat, schemas
from alignax.data.schemas import (EMPTY_TEXT, PROMPT_TOO_LONG, DataError)
from alignax.data.screening import (POLICY_REASONS, TOO_LONG, Screening, enforce, screen_source,
                                    skip_marker as _skip, verdict as _verdict)
from alignax.data.tokenizer import ByteTokenizer, Tokenizer

Example = dict[str, Any]
Batch = dict[str, Any]

LONG_DOC_POLICIES = ("split", "truncate")
TOO_LONG_POLICIES = ("truncate", "skip")
_GAUGES = frozenset({"epoch"})  # merged by max, not summed


# ============================================================================ iterators


class _CountingIterator(grain.DatasetIterator):
  """A grain iterator stage that keeps counters; they are part of its checkpoint state."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.counts: dict[str, int] = {}

  def _count(self, key: str, n: int = 1) -> None:
    self.counts[key] = self.counts.get(key, 0) + int(n)


class _ScreenIterator(_CountingIterator):
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


class _FixedBatchIterator(_CountingIterator):
  """Makes every batch exactly `batch_size` rows: a short last batch is padded or dropped."""

  def __init__(self, parent, *, batch_size: int, drop_remainder: bool, pad_id: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._pad_id = pad_id

  def __next__(self) -> Batch:
    while True:
      batch = next(self._parent)
      rows = _num_rows(batch)
      if rows == self._batch_size:
        break
      if self._drop_remainder:
        self._count("dropped_rows", rows)
        self._count("dropped_tokens", _measure(batch)[0])
        continue  # the parent is exhausted: the next call raises StopIteration
      batch = _pad_rows(batch, self._batch_size - rows, self._pad_id)
      self._count("padding_rows", self._batch_size - rows)
      break
    tokens, loss_tokens = _measure(batch)
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


class _Stage(grain.IterDataset):
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
      if isinstance(it, _CountingIterator):
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


# ============================================================================ batch helpers


def _num_rows(batch: Batch) -> int:
  for v in batch.values():
    return _num_rows(v) if isinstance(v, dict) else len(v)
  raise ValueError("empty batch")


def _pad_rows(batch: Batch, n: int, pad_id: int) -> Batch:
  """Appends n empty rows: tokens = pad_id, index = -1, everything else 0."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, dict):
      out[k] = _pad_rows(v, n, pad_id)
      continue
    fill = pad_id if k == "tokens" else (-1 if k in ("index", "gold_label") else 0)
    out[k] = np.concatenate([v, np.full((n,) + v.shape[1:], fill, v.dtype)])
  return out


def _measure(batch: Batch) -> tuple[int, int]:
  """(non-padding tokens, loss tokens) over every LM sub-batch of `batch`."""
  tokens = loss = 0
  for k, v in batch.items():
    if isinstance(v, dict):
      t, l = _measure(v)
      tokens, loss = tokens + t, loss + l
    elif k == "segment_ids":
      tokens += int(np.count_nonzero(v))
    elif k == "loss_mask":
      loss += int(np.count_nonzero(v))
  return tokens, loss


# ============================================================================ encoding helpers


def _ids(tok: Tokenizer, text: str) -> np.ndarray:
  """Token ids [n] int32 of plain text; the byte tokenizer takes a numpy fast path."""
  if isinstance(tok, ByteTokenizer):
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  return np.asarray(tok.encode(text), np.int32)


def lm_row(ids: Sequence[int], mask: Sequence[float], seq_len: int, pad_id: int,
           *, left: bool = False) -> dict[str, np.ndarray]:
  """One sequence as one row of the batch contract, padded to `seq_len`.

  Args:
    ids: [n] token ids, n <= seq_len. mask: [n] loss mask (1 = target).
    left: pad on the left (prompts for generation) instead of the right.

  Returns:
    tokens, positions, segment_ids [seq_len] int32 and loss_mask [seq_len] float32, with
    loss_mask 0 on the first token (nothing precedes it) and on padding.
  """
  n = len(ids)
  sl = slice(seq_len - n, seq_len) if left else slice(0, n)
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[sl] = ids
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[sl] = 1
  positions = np.zeros(seq_len, np.int32)
  positions[sl] = np.arange(n, dtype=np.int32)
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[sl] = mask
  if n:
    loss_mask[sl.start] = 0.0
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
          "loss_mask": loss_mask}


def _packed_to_contract(batch: Batch) -> Batch:
  """grain's packer output ({tokens, loss_mask} + *_segment_ids, *_positions) -> contract."""
  positions = batch["tokens_positions"]
  return {"tokens": batch["tokens"].astype(np.int32),
          "positions": positions.astype(np.int32),
          "segment_ids": batch["tokens_segment_ids"].astype(np.int32),
          # The first token of each packed segment has no context inside its segment.
          "loss_mask": (batch["loss_mask"] * (positions > 0)).astype(np.float32)}


def _prompt_tokens(tok: Tokenizer, prompt: list, template: str) -> int:
  """Tokens of the prompt as a generator would see it: the conversation so far plus the role
  marker that opens the response (what `chat.encode_prompt` gives for a single-turn response)."""
  return len(chat.encode_chat(tok, prompt, add_generation_prompt=True, template=template)[0])


def _prompt_and_response(tok: Tokenizer, prompt: list, response: list, seq_len: int,
                         max_prompt_len: int | None, ended: bool = True,
                         template: str = "markers", n_prompt: int | None = None):
  """(ids [<= T] int32, loss mask [<= T] float32, prompt length, full length) of prompt +
  response, cut to `seq_len`; the mask is on the response's assistant text and eos only.
  `ended=False` drops the final `<eos>` (a response that was cut off before ending).
  `n_prompt`: `_prompt_tokens` of `prompt` if already known (both sides of a pair share it).
  Returns a skip marker instead when the prompt leaves no room for a response token."""
  if n_prompt is None:
    n_prompt = _prompt_tokens(tok, prompt, template)
  ids, mask = chat.encode_chat(tok, prompt + response, template=template)
  if not ended:
    ids, mask = ids[:-1], mask[:-1]
  mask = np.asarray(mask, np.float32)
  mask[:n_prompt] = 0.0  # assistant turns inside a multi-turn prompt are context, not targets
  too_long_prompt = max_prompt_len is not None and n_prompt > max_prompt_len
  if too_long_prompt or not mask[:seq_len].any():
    limit = max_prompt_len if too_long_prompt else seq_len
    return _skip(PROMPT_TOO_LONG, f"prompt is {n_prompt} tokens, too long for max length "
                 f"{limit} (no response token would fit)")
  return np.asarray(ids[:seq_len], np.int32), mask[:seq_len], n_prompt, len(ids)


# ============================================================================ the spine


def _check_common(*, batch_size, seq_len, shard_index, shard_count, num_epochs, seed,
                  bad_records):
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  if seq_len < 2:
    raise DataError(f"seq_len must be >= 2, got {seq_len}")
  if not 0 <= shard_index < shard_count:
    raise DataError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  if num_epochs is not None and num_epochs <= 0:
    raise DataError(f"num_epochs must be positive or None (forever), got {num_epochs}")
  if not 0 <= seed < 2**32:
    raise DataError(f"seed must be in [0, 2**32), got {seed}")
  schemas.check_policy(bad_records)


def shard_indices(num_records: int, shard_index: int, shard_count: int) -> grain.MapDataset:
  """The source indices process `shard_index` reads: a strided slice, so shards are disjoint,
  cover the data, and differ in size by at most one."""
  ds = grain.MapDataset.range(num_records)[shard_index::shard_count]
  if len(ds) == 0:
    raise DataError(f"shard {shard_index} of {shard_count} is empty: the source has only "
                    f"{num_records} records")
  return ds


def shuffle_seed(seed: int) -> int:
  """The seed handed to grain's shuffle.

  grain's ShuffleMapDataset shuffles epoch e with seed + e, so user seeds 1 and 2 would see
  the same orders shifted by one epoch; hashing the user seed first decorrelates runs.
  """
  return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


@dataclasses.dataclass
class _Examples:
  """The encoded stream of one shard and what the validation pass found in the source."""

  ds: grain.IterDataset
  screening: "Screening"
  epoch_len: int  # records of this shard per epoch


def _examples(source, schema: str, encode: Callable[[dict], Example], *, bad_records: str,
              shuffle: bool, seed: int, num_epochs: int | None, shard_index: int,
              shard_count: int, read_threads: int, keep_index: bool = False) -> _Examples:
  """Source -> validation pass -> shuffled, repeated stream of encoded examples (or skip markers).

  `encode(normalized_record) -> example` returns numpy arrays, or `_skip(reason)`; it may add
  "_counts" {counter: increment}. With `keep_index`, examples get "index" (the source index).
  The validation pass (`screen_source`, then `enforce`) raises here, before any batch, on bad
  records under bad_records="error" and on a source or shard with nothing usable.
  """
  if len(source) == 0:
    raise DataError("the data source is empty")
  ds = shard_indices(len(source), shard_index, shard_count)
  shard_len = len(ds)
  screening = screen_source(source, schema, encode)
  enforce(screening, bad_records=bad_records, shard_count=shard_count)
  bad = screening.bad
  if shuffle:
    ds = ds.shuffle(shuffle_seed(seed))
  ds = ds.repeat(num_epochs)

  def fetch_and_encode(stream_index: int, src_index: int) -> Example:
    index = int(src_index)
    if index in bad:  # known from the validation pass: neither read nor encoded again
      known = bad[index]
      ex = {"_skip": known.reason, "_message": known.message, "_where": known.where}
    else:
      ex = _verdict(source[index], index, schema, encode)
      if keep_index and "_skip" not in ex:
        ex["index"] = np.int32(index)
    ex["_epoch"] = stream_index // shard_len
    return ex

  # Threads only pay off for slow sources (files); in-memory records are faster without.
  options = grain.ReadOptions(num_threads=read_threads,
                              prefetch_buffer_size=max(16, 4 * read_threads))
  return _Examples(ds.map_with_index(fetch_and_encode).to_iter_dataset(options), screening,
                   shard_len)


def _finish(examples: _Examples, *, bad_records: str, split_len: int | None,
            rows: Callable[[grain.IterDataset], grain.IterDataset], batch_size: int,
            drop_remainder: bool, pad_id: int, to_contract: Callable | None,
            info: dict, iterator_cls=DataIterator, **iterator_kwargs) -> DataIterator:
  ds = _Stage(examples.ds, lambda p: _ScreenIterator(p, bad_records=bad_records,
                                                     split_len=split_len,
                                                     epoch_len=examples.epoch_len))
  ds = rows(ds).batch(batch_size, drop_remainder=False)
  if to_contract is not None:
    ds = ds.map(to_contract)
  ds = _Stage(ds, lambda p: _FixedBatchIterator(p, batch_size=batch_size,
                                                drop_remainder=drop_remainder, pad_id=pad_id))
  return iterator_cls(ds.__iter__(), info=info, data_counts=examples.screening.counts(),
                      **iterator_kwargs)


def _first_fit(seq_len: int, num_bins: int, pad_id: int):
  def rows(ds: grain.IterDataset) -> grain.IterDataset:
    # grain's first-fit packer: documents stay whole, a row is closed when nothing fits,
    # segment ids count from 1 per row, positions restart per document. It raises on an
    # element longer than seq_len, so the screen stage splits/truncates before it.
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_bins, shuffle_bins=False,
        padding_struct={"tokens": pad_id, "loss_mask": 0.0})
  return rows


def _one_per_row(seq_len: int, pad_id: int):
  def rows(ds: grain.IterDataset) -> grain.IterDataset:
    return ds.map(lambda ex: lm_row(ex["tokens"], ex["loss_mask"], seq_len, pad_id))
  return rows


# ============================================================================ pipelines


def lm_pipeline(source, tok: Tokenizer, *, batch_size: int, seq_len: int,
                long_docs: str = "split", num_packing_bins: int | None = None,
                bad_records: str = "error", shuffle: bool = True, seed: int = 0, num_epochs: int | None = 1,
                shard_index: int = 0, shard_count: int = 1, drop_remainder: bool = False,
                read_threads: int = 0) -> DataIterator:
  """Pretraining: {"text"} documents -> `<bos> text <eos>` -> packed rows.

  Args:
    source: records {"text": str} (len() and [i]).
    tok: tokenizer (bos_id, eos_id, pad_id, encode).
    batch_size: rows per batch (per process). seq_len: T.
    long_docs: "split" a document longer than T into T-token chunks (each its own segment;
      the first token of a chunk is not a target, its context is in the previous chunk) or
      "truncate" it to its first T tokens. Counted as split/split_chunks or
      truncated/truncated_tokens.
    num_packing_bins: rows the first-fit packer fills at once (default max(batch_size, 64));
      more bins, less padding (B=8, T=128, ~130-byte documents: 8 bins fill 89% of the
      tokens, 64 bins 94%), at the cost of reading further ahead.
    bad_records: "error" or "skip" (and count) records that are not {"text": str} or whose
      text is empty (or only whitespace).
    shuffle, seed: shuffle records; each epoch gets a different, deterministic order.
    num_epochs: passes over the data; None repeats forever (training). Packing runs across
      the epoch boundary, so a row may hold the end of one epoch and the start of the next.
    shard_index, shard_count: this process reads records shard_index::shard_count.
    drop_remainder: drop (and count) a short last batch instead of padding it with empty rows.
    read_threads: grain read threads (0: read in the calling thread, fastest in memory).

  Returns:
    DataIterator of {"tokens", "positions", "segment_ids" [B, T] int32, "loss_mask" [B, T]
    float32}. Empty documents are bad records ("skipped/empty_text" under "skip").
  """
  _check_common(batch_size=batch_size, seq_len=seq_len, shard_index=shard_index,
                shard_count=shard_count, num_epochs=num_epochs, seed=seed,
                bad_records=bad_records)
  if long_docs not in LONG_DOC_POLICIES:
    raise DataError(f"long_docs must be one of {LONG_DOC_POLICIES}, got {long_docs!r}")
  bos, eos = np.int32(tok.bos_id), np.int32(tok.eos_id)

  def encode(rec: dict) -> Example:
    body = _ids(tok, rec["text"])
    if body.size == 0:
      return _skip(EMPTY_TEXT)
    ids = np.concatenate([[bos], body, [eos]]).astype(np.int32)
    ex = {"tokens": ids, "loss_mask": np.ones(len(ids), np.float32)}
    if long_docs == "truncate" and len(ids) > seq_len:
      ex = {k: v[:seq_len] for k, v in ex.items()}
      ex["_counts"] = {"truncated": 1, "truncated_tokens": len(ids) - seq_len}
    return ex

  examples = _examples(source, "text", encode, bad_records=bad_records,
                       shuffle=shuffle, seed=seed,
                       num_epochs=num_epochs, shard_index=shard_index,
                       shard_count=shard_count, read_threads=read_threads)
  bins = num_packing_bins or max(batch_size, 64)
  return _finish(examples, bad_records=bad_records, split_len=seq_len,
                 rows=_first_fit(seq_len, bins, tok.pad_id), batch_size=batch_size,
                 drop_remainder=drop_remainder, pad_id=tok.pad_id,
                 to_contract=_packed_to_contract,
                 info=dict(kind="lm", batch_size=batch_size, seq_len=seq_len,
                           long_docs=long_docs, num_packing_bins=bins,
                           bad_records=bad_records, seed=seed,
                           num_epochs=num_epochs, shard_index=shard_index,
                           shard_count=shard_count))


def sft_pipeline(source, tok: Tokenizer, *, batch_size: int, seq_len: int,
                 packed: bool = False, too_long: str = "truncate",
                 bad_records: str = "error", num_packing_bins: int | None = None,
                 shuffle: bool = True, seed: int = 0, num_epochs: int | None = 1,
                 shard_index: int = 0, shard_count: int = 1, drop_remainder: bool = False,
                 read_threads: int = 0,
                 chat_template: str = "markers") -> DataIterator:
  """SFT: conversations -> chat template (loss on assistant text + eos) -> packed or padded rows.

  Args:
    source: SFT records ({"prompt", "response"} or {"messages"}).
    packed: first-fit pack several conversations per row (segment ids 1, 2, ...); else one
      conversation per row, right-padded.
    too_long: a conversation longer than T is "truncate"d to T tokens (counted truncated,
      truncated_tokens) or "skip"ped (counted skipped/too_long). If truncation leaves no
      assistant token, it is a prompt_too_long bad record.
    bad_records: "error" or "skip" for invalid records, empty responses, prompts too long.
    Other arguments: as `lm_pipeline`.

  Returns:
    DataIterator of LM batches {"tokens", "positions", "segment_ids", "loss_mask"} [B, T].
  """
  _check_common(batch_size=batch_size, seq_len=seq_len, shard_index=shard_index,
                shard_count=shard_count, num_epochs=num_epochs, seed=seed,
                bad_records=bad_records)
  if too_long not in TOO_LONG_POLICIES:
    raise DataError(f"too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")

  def encode(rec: dict) -> Example:
    ids, mask = chat.encode_chat(tok, rec["messages"], template=chat_template)
    ex: Example = {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.float32)}
    if len(ids) <= seq_len:
      return ex
    if too_long == "skip":
      return _skip(TOO_LONG, f"conversation is {len(ids)} tokens, longer than seq_len {seq_len}")
    ex = {k: v[:seq_len] for k, v in ex.items()}
    if not ex["loss_mask"][1:].any():
      return _skip(PROMPT_TOO_LONG, f"no assistant token within the first {seq_len} tokens "
                   f"(conversation is {len(ids)} tokens)")
    ex["_counts"] = {"truncated": 1, "truncated_tokens": len(ids) - seq_len}
    return ex

  examples = _examples(source, "sft", encode, bad_records=bad_records,
                       shuffle=shuffle, seed=seed,
                       num_epochs=num_epochs, shard_index=shard_index,
                       shard_count=shard_count, read_threads=read_threads)
  bins = num_packing_bins or max(batch_size, 64)
  rows = _first_fit(seq_len, bins, tok.pad_id) if packed else _one_per_row(seq_len, tok.pad_id)
  return _finish(examples, bad_records=bad_records, split_len=None, rows=rows,
                 batch_size=batch_size, drop_remainder=drop_remainder, pad_id=tok.pad_id,
                 to_contract=_packed_to_contract if packed else None,
                 info=dict(kind="sft", batch_size=batch_size, seq_len=seq_len, packed=packed,
                           too_long=too_long, bad_records=bad_records, seed=seed,
                           num_epochs=num_epochs, shard_index=shard_index,
                           shard_count=shard_count))


def preference_pipeline(source, tok: Tokenizer, *, batch_size: int, seq_len: int,
                        max_prompt_len: int | None = None, bad_records: str = "error",
                        shuffle: bool = True, seed: int = 0, num_epochs: int | None = 1,
                        shard_index: int = 0, shard_count: int = 1,
                        drop_remainder: bool = False, read_threads: int = 0,
                        chat_template: str = "markers") -> DataIterator:
  """Preference pairs -> {"chosen": LM batch, "rejected": LM batch, "valid" [B]}.

  Each side is prompt + response through the chat template, one sequence per row,
  right-padded to T; both sides share the prompt tokens. loss_mask is 1 on the response's
  assistant text and its eos only (never on the prompt, even a multi-turn one).

  Bad records (by `bad_records`, counted as skipped/<reason>): invalid, identical_pair
  (chosen == rejected), empty_response, prompt_too_long (the prompt, counted with the
  <|assistant|> marker that opens the response, leaves no room for a response token within
  T, or is longer than `max_prompt_len` if given). A response that does not
  fit is cut at T (counted once per pair in truncated/truncated_tokens).

  Optional record fields (see schemas.PREFERENCE_FLAGS / PREFERENCE_NUMBERS):
  chosen_ended / rejected_ended = false leave that response without its `<eos>`; margin is
  passed through; chosen_gold / rejected_gold become `gold_label`.

  Returns:
    DataIterator of {"chosen": {...}, "rejected": {...}, "valid", "margin", "gold_label":
    [B] float32, "index" [B] int32 (record index in `source`, -1 on filler rows)}, each side {"tokens", "positions", "segment_ids" [B, T] int32, "loss_mask"
    [B, T] float32, "response_len" [B] int32 (loss tokens in the row)}. valid is 0 on filler
    rows; gold_label is 1 (gold prefers chosen), 0 (gold prefers rejected) or -1 (unknown).
  """
  _check_common(batch_size=batch_size, seq_len=seq_len, shard_index=shard_index,
                shard_count=shard_count, num_epochs=num_epochs, seed=seed,
                bad_records=bad_records)

  def side(prompt, response, ended, n_prompt):
    out = _prompt_and_response(tok, prompt, response, seq_len, max_prompt_len, ended=ended,
                               template=chat_template, n_prompt=n_prompt)
    if isinstance(out, dict):
      return out, 0, 0
    ids, mask, _, n_full = out
    row = lm_row(ids, mask, seq_len, tok.pad_id)
    row["response_len"] = np.int32(row["loss_mask"].sum())
    lost = max(0, n_full - seq_len)
    return row, int(lost > 0), lost

  def encode(rec: dict) -> Example:
    n_prompt = _prompt_tokens(tok, rec["prompt"], chat_template)  # encoded once for both sides
    chosen, t1, lost1 = side(rec["prompt"], rec["chosen"], rec.get("chosen_ended", True), n_prompt)
    if "_skip" in chosen:
      return chosen
    rejected, t2, lost2 = side(rec["prompt"], rec["rejected"], rec.get("rejected_ended", True),
                               n_prompt)
    if "_skip" in rejected:
      return rejected
    ex = {"chosen": chosen, "rejected": rejected, "valid": np.float32(1.0),
          "margin": np.float32(rec.get("margin", 0.0)), "gold_label": _gold_label(rec)}
    if t1 or t2:
      ex["_counts"] = {"truncated": 1, "truncated_tokens": lost1 + lost2}
    return ex

  examples = _examples(source, "preference", encode, bad_records=bad_records,
                       shuffle=shuffle, seed=seed,
                       num_epochs=num_epochs, shard_index=shard_index,
                       shard_count=shard_count, read_threads=read_threads,
                       keep_index=True)
  return _finish(examples, bad_records=bad_records, split_len=None, rows=_rows_as_is,
                 batch_size=batch_size, drop_remainder=drop_remainder, pad_id=tok.pad_id,
                 to_contract=None,
                 info=dict(kind="preference", batch_size=batch_size, seq_len=seq_len,
                           max_prompt_len=max_prompt_len, bad_records=bad_records, seed=seed,
                           num_epochs=num_epochs, shard_index=shard_index,
                           shard_count=shard_count))


def _gold_label(rec: dict) -> np.float32:
  """1 when the gold scores rank chosen above rejected, 0 below, -1 when unknown or tied."""
  if "chosen_gold" not in rec or "rejected_gold" not in rec:
    return np.float32(-1.0)
  diff = rec["chosen_gold"] - rec["rejected_gold"]
  return np.float32(1.0 if diff > 0 else 0.0 if diff < 0 else -1.0)


def _rows_as_is(ds: grain.IterDataset) -> grain.IterDataset:
  return ds


def unpaired_pipeline(source, tok: Tokenizer, *, batch_size: int, seq_len: int,
                      max_prompt_len: int | None = None, bad_records: str = "error",
                      shuffle: bool = True, seed: int = 0, num_epochs: int | None = 1,
                      shard_index: int = 0, shard_count: int = 1,
                      drop_remainder: bool = False, read_threads: int = 0,
                      chat_template: str = "markers") -> DataIterator:
  """Unpaired (KTO) {prompt, completion, label} -> LM batch + label, one sequence per row.

  Returns:
    DataIterator of {"tokens", "positions", "segment_ids" [B, T] int32, "loss_mask" [B, T]
    float32 (completion only), "response_len" [B] int32, "label" [B] float32 (1 desirable,
    0 undesirable), "valid" [B] float32}. Bad records as in `preference_pipeline`.
  """
  _check_common(batch_size=batch_size, seq_len=seq_len, shard_index=shard_index,
                shard_count=shard_count, num_epochs=num_epochs, seed=seed,
                bad_records=bad_records)

  def encode(rec: dict) -> Example:
    out = _prompt_and_response(tok, rec["prompt"], rec["completion"], seq_len, max_prompt_len,
                               template=chat_template)
    if isinstance(out, dict):
      return out
    ids, mask, _, n_full = out
    ex = lm_row(ids, mask, seq_len, tok.pad_id)
    ex["response_len"] = np.int32(ex["loss_mask"].sum())
    ex["label"] = np.float32(rec["label"])
    ex["valid"] = np.float32(1.0)
    if n_full > seq_len:
      ex["_counts"] = {"truncated": 1, "truncated_tokens": n_full - seq_len}
    return ex

  examples = _examples(source, "unpaired", encode, bad_records=bad_records,
                       shuffle=shuffle, seed=seed,
                       num_epochs=num_epochs, shard_index=shard_index,
                       shard_count=shard_count, read_threads=read_threads)
  return _finish(examples, bad_records=bad_records, split_len=None, rows=_rows_as_is,
                 batch_size=batch_size, drop_remainder=drop_remainder, pad_id=tok.pad_id,
                 to_contract=None,
                 info=dict(kind="unpaired", batch_size=batch_size, seq_len=seq_len,
                           bad_records=bad_records, seed=seed, num_epochs=num_epochs,
                           shard_index=shard_index, shard_count=shard_count))


def prompts_pipeline(source, tok: Tokenizer, *, batch_size: int, prompt_len: int,
                     bad_records: str = "error", shuffle: bool = False, seed: int = 0,
                     num_epochs: int | None = 1, shard_index: int = 0, shard_count: int = 1,
                     drop_remainder: bool = False, read_threads: int = 0,
                     chat_template: str = "markers") -> PromptIterator:
  """Prompts for generation (RL rollouts, evaluation): left-padded ids ending in <|assistant|>.

  A prompt longer than `prompt_len` tokens is a prompt_too_long bad record (`bad_records`).
  Defaults suit evaluation: no shuffle, one epoch, nothing dropped.

  Returns:
    PromptIterator yielding (arrays, records). arrays: "tokens" [B, P] int32 (left-padded
    with pad_id), "mask" [B, P] bool (True on prompt tokens), "positions" [B, P] int32 (0 at
    each prompt's first token), "segment_ids" [B, P] int32 (1 on prompt tokens),
    "prompt_len" [B] int32, "index" [B] int32 (record index in `source`, -1 on filler rows),
    "valid" [B] float32. records: per row the validated source record (extras included) or
    None for a filler row.
  """
  _check_common(batch_size=batch_size, seq_len=prompt_len, shard_index=shard_index,
                shard_count=shard_count, num_epochs=num_epochs, seed=seed,
                bad_records=bad_records)

  def encode(rec: dict) -> Example:
    ids = chat.encode_prompt(tok, rec["prompt"], template=chat_template)
    if len(ids) > prompt_len:
      return _skip(PROMPT_TOO_LONG,
                   f"prompt is {len(ids)} tokens, longer than prompt_len {prompt_len}")
    row = lm_row(ids, np.zeros(len(ids), np.float32), prompt_len, tok.pad_id, left=True)
    return {"tokens": row["tokens"], "mask": row["segment_ids"] > 0,
            "positions": row["positions"], "segment_ids": row["segment_ids"],
            "prompt_len": np.int32(len(ids)), "valid": np.float32(1.0)}

  # keep_index: the source index rides along so the host can look the full record up again.
  examples = _examples(source, "prompts", encode, bad_records=bad_records,
                       shuffle=shuffle, seed=seed,
                       num_epochs=num_epochs, shard_index=shard_index,
                       shard_count=shard_count, read_threads=read_threads, keep_index=True)
  return _finish(examples, bad_records=bad_records, split_len=None, rows=_rows_as_is,
                 batch_size=batch_size, drop_remainder=drop_remainder, pad_id=tok.pad_id,
                 to_contract=None, iterator_cls=PromptIterator, source=source,
                 info=dict(kind="prompts", batch_size=batch_size, prompt_len=prompt_len,
                           bad_records=bad_records, seed=seed, num_epochs=num_epochs,
                           shard_index=shard_index, shard_count=shard_count))


PIPELINES = {"lm": lm_pipeline, "sft": sft_pipeline, "preference": preference_pipeline,
             "unpaired": unpaired_pipeline, "prompts": prompts_pipeline}
