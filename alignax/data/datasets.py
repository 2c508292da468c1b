"""One entry for a stage's data: `get_datasets(format, data, tokenizer, batching)`.

It finds the records (`sources.split_sources`), builds the format's training pipeline
(shuffled, repeated forever) and reads the fixed evaluation batches once (in order, one epoch).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

from alignax.data import pipeline, sources
from alignax.data.batching import BatchOptions
from alignax.data.config import DataConfig
from alignax.data.iterators import DataIterator
from alignax.data.tokenizer import Tokenizer

# format -> (record kind in the sources, the pipeline's name in `pipeline`, its `data.*` knobs)
FORMATS: dict[str, tuple[str, str, Callable[[DataConfig], dict]]] = {
    "lm": ("pretrain", "lm_pipeline", lambda d: dict(long_docs=d.long_docs)),
    "sft": ("sft", "sft_pipeline", lambda d: dict(packed=d.packing, too_long=d.too_long)),
    "preference": ("preference", "preference_pipeline", lambda d: dict(pair_len=d.pair_len)),
    "unpaired": ("preference", "unpaired_pipeline", lambda d: {}),
}


@dataclasses.dataclass
class Datasets:
  """A stage's data.

  Attributes:
    train: the training iterator (shuffled by `batching.seed`, forever; checkpointable).
    eval: the first `eval_batches` batches of the eval split, read once ([] without one).
    sources: the {"train", "eval"} record sources they read (eval may be None).
  """

  train: DataIterator
  eval: list[Any]
  sources: dict[str, Any]


def take_batches(iterator, n: int) -> list:
  """The first `n` batches of an iterator as a list (fixed eval sets are read once and reused)."""
  return list(itertools.islice(iterator, n))


def get_datasets(fmt: str, data: DataConfig, tok: Tokenizer, batching: BatchOptions, *,
                 eval_batches: int, world=None, splits: dict[str, Any] | None = None) -> Datasets:
  """The training iterator and fixed eval batches of one record format.

  Args:
    fmt: "lm" (pretraining text), "sft", "preference" or "unpaired" (`FORMATS`).
    data: the `data.*` section (where records come from, seq_len, format knobs).
    tok: the tokenizer.
    batching: this process's options for training; evaluation reads in order, once.
    eval_batches: how many eval batches to read (0: none).
    world: the `WorldConfig`, for data.source="world".
    splits: {"train", "eval"} sources to use instead of finding them (e.g. the world's pairs
      turned into unpaired examples).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")
  kind, name, knobs = FORMATS[fmt]
  make: Callable[..., DataIterator] = getattr(pipeline, name)
  if splits is None:
    splits = sources.split_sources(data, kind, world)
  args = dict(seq_len=data.seq_len, **knobs(data))
  train = make(splits["train"], tok, dataclasses.replace(batching, num_epochs=None), **args)
  evals = []
  if splits.get("eval") is not None and eval_batches > 0:
    once = dataclasses.replace(batching, shuffle=False, num_epochs=1)
    evals = take_batches(make(splits["eval"], tok, once, **args), eval_batches)
  return Datasets(train=train, eval=evals, sources=splits)
