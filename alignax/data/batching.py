"""The spine every pipeline shares: how records are read, shuffled, sharded and batched.

  source indices --shard--> [i::shard_count] --shuffle(seed)--> --repeat(num_epochs)-->
  --map: fetch record, validate, encode--> --screen: skip or raise, split-->
  --rows: pack (first fit) or one example per row--> --batch(B)--> --fixed batches-->

`BatchOptions` holds everything about that spine that is not specific to a record format; a
pipeline adds its format's encoder and row layout (`alignax.data.pipeline`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import numpy as np

from alignax.data import schemas
from alignax.data.encoders import Encoder, lm_row
from alignax.data.iterators import DataIterator, FixedBatchIterator, ScreenIterator, Stage
from alignax.data.screening import Screening, enforce, screen_source, verdict
from alignax.errors import DataError


@dataclasses.dataclass(frozen=True)
class BatchOptions:
  """How one process reads a source into batches (every record format alike).

  Attributes:
    batch_size: rows per batch, on this process.
    bad_records: "error" (raise, naming file:line) or "skip" (count) records the pipeline
      cannot use.
    shuffle, seed: shuffle records; each epoch gets a different, deterministic order.
    num_epochs: passes over the data; None repeats forever (training).
    shard_index, shard_count: this process reads records shard_index::shard_count.
    drop_remainder: drop (and count) a short last batch instead of padding it with empty rows.
    read_threads: grain read threads (0: read in the calling thread, fastest in memory).
    chat_template: how conversations are rendered ("markers" or "plain", `alignax.data.chat`).
  """

  batch_size: int
  bad_records: str = "error"
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = 1
  shard_index: int = 0
  shard_count: int = 1
  drop_remainder: bool = False
  read_threads: int = 0
  chat_template: str = "markers"

  def __post_init__(self):
    if self.batch_size <= 0:
      raise DataError(f"batch_size must be positive, got {self.batch_size}")
    if not 0 <= self.shard_index < self.shard_count:
      raise DataError(f"need 0 <= shard_index < shard_count, got {self.shard_index}, "
                      f"{self.shard_count}")
    if self.num_epochs is not None and self.num_epochs <= 0:
      raise DataError(f"num_epochs must be positive or None (forever), got {self.num_epochs}")
    if not 0 <= self.seed < 2**32:
      raise DataError(f"seed must be in [0, 2**32), got {self.seed}")
    schemas.check_policy(self.bad_records)

  @classmethod
  def of(cls, base: "BatchOptions | None" = None, **fields) -> "BatchOptions":
    """`base` with `fields` replaced, or new options from `fields` alone."""
    return cls(**fields) if base is None else dataclasses.replace(base, **fields)

  def info(self) -> dict[str, Any]:
    """The fields a pipeline's `info` (for logs) records."""
    return dict(batch_size=self.batch_size, bad_records=self.bad_records, seed=self.seed,
                num_epochs=self.num_epochs, shard_index=self.shard_index,
                shard_count=self.shard_count)


def check_len(name: str, value: int) -> None:
  if value < 2:
    raise DataError(f"{name} must be >= 2, got {value}")


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
class Examples:
  """The encoded stream of one shard and what the validation pass found in the source."""

  ds: grain.IterDataset
  screening: Screening
  epoch_len: int  # records of this shard per epoch


def examples(source, schema: str, encode: Encoder, opts: BatchOptions, *,
             keep_index: bool = False) -> Examples:
  """Source -> validation pass -> shuffled, repeated stream of encoded examples (or skip markers).

  With `keep_index`, examples get "index" (the source index). The validation pass
  (`screen_source`, then `enforce`) raises here, before any batch, on bad records under
  bad_records="error" and on a source or shard with nothing usable.
  """
  if len(source) == 0:
    raise DataError("the data source is empty")
  ds = shard_indices(len(source), opts.shard_index, opts.shard_count)
  shard_len = len(ds)
  screening = screen_source(source, schema, encode)
  enforce(screening, bad_records=opts.bad_records, shard_count=opts.shard_count)
  bad = screening.bad
  if opts.shuffle:
    ds = ds.shuffle(shuffle_seed(opts.seed))
  ds = ds.repeat(opts.num_epochs)

  def fetch_and_encode(stream_index: int, src_index: int) -> dict:
    index = int(src_index)
    if index in bad:  # known from the validation pass: neither read nor encoded again
      known = bad[index]
      ex = {"_skip": known.reason, "_message": known.message, "_where": known.where}
    else:
      ex = verdict(source[index], index, schema, encode)
      if keep_index and "_skip" not in ex:
        ex["index"] = np.int32(index)
    ex["_epoch"] = stream_index // shard_len
    return ex

  # Threads only pay off for slow sources (files); in-memory records are faster without.
  read = grain.ReadOptions(num_threads=opts.read_threads,
                           prefetch_buffer_size=max(16, 4 * opts.read_threads))
  return Examples(ds.map_with_index(fetch_and_encode).to_iter_dataset(read), screening, shard_len)


Rows = Callable[[grain.IterDataset], grain.IterDataset]


def finish(stream: Examples, opts: BatchOptions, *, split_len: int | None, rows: Rows,
           pad_id: int, to_contract: Callable | None, info: dict,
           iterator_cls=DataIterator, **iterator_kwargs) -> DataIterator:
  """Screen (skip, split), lay examples out in rows, batch, and fix every batch's size."""
  ds = Stage(stream.ds, lambda p: ScreenIterator(p, bad_records=opts.bad_records,
                                                 split_len=split_len,
                                                 epoch_len=stream.epoch_len))
  ds = rows(ds).batch(opts.batch_size, drop_remainder=False)
  if to_contract is not None:
    ds = ds.map(to_contract)
  ds = Stage(ds, lambda p: FixedBatchIterator(p, batch_size=opts.batch_size,
                                              drop_remainder=opts.drop_remainder, pad_id=pad_id))
  return iterator_cls(ds.__iter__(), info=info, data_counts=stream.screening.counts(),
                      **iterator_kwargs)


def first_fit(seq_len: int, num_bins: int, pad_id: int) -> Rows:
  def rows(ds: grain.IterDataset) -> grain.IterDataset:
    # grain's first-fit packer: documents stay whole, a row is closed when nothing fits,
    # segment ids count from 1 per row, positions restart per document. It raises on an
    # element longer than seq_len, so the screen stage splits/truncates before it.
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_bins, shuffle_bins=False,
        padding_struct={"tokens": pad_id, "loss_mask": 0.0})
  return rows


def one_per_row(seq_len: int, pad_id: int) -> Rows:
  def rows(ds: grain.IterDataset) -> grain.IterDataset:
    return ds.map(lambda ex: lm_row(ex["tokens"], ex["loss_mask"], seq_len, pad_id))
  return rows


def as_is(ds: grain.IterDataset) -> grain.IterDataset:
  """Examples that already are rows (pairs, prompts)."""
  return ds
