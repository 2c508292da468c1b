"""Where a stage's records come from: the built-in world or the user's files, via TFDS.

`split_sources(data, kind, world)` returns {"train": source, "eval": source} for a record kind
("pretrain" text, "sft", "preference", "prompts") from the typed `data.*` section
(`DataConfig`) and, for the built-in world, its `WorldConfig`. Sources are random-access (len() and [i])
and feed the grain pipelines in `alignax.data.pipeline`.

  data.source = "world": the world of `world.*`, built once into an array_record TFDS dataset
    under `data.tfds_dir`, keyed by a fingerprint of the world config and the world's code.
  data.source = "files": `data.train_files` / `data.eval_files` (JSONL, Parquet or text), also
    built into TFDS (validated while building; errors name file and line). Without eval files,
    the last `data.eval_records` training records are held out for eval, and logged.
  data.loader = "memory" skips TFDS and keeps records in memory (quick experiments and tests).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
from absl import logging

from alignax.data import readers, tfds_builders
from alignax.data.config import DataConfig
from alignax.errors import DataError

SCHEMAS = {"pretrain": "text", "sft": "sft", "preference": "preference", "prompts": "prompts"}


def default_tfds_dir() -> str:
  return os.environ.get("ALIGNAX_DATA_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "alignax", "tfds"))


def world_fingerprint(world_cfg) -> str:
  """Hash of the world config and the source of the world's modules: code or size changes never
  reuse a stale build."""
  import alignax.tasks as tasks
  h = hashlib.sha256(json.dumps(_jsonable(world_cfg), sort_keys=True).encode())
  folder = os.path.dirname(tasks.__file__)
  for name in sorted(os.listdir(folder)):
    if name.startswith("world") and name.endswith(".py"):
      with open(os.path.join(folder, name), "rb") as f:
        h.update(f.read())
  if getattr(world_cfg, "feedback_demos", 0):  # the demonstrations quote the constitution
    from alignax.cai import constitution, prompts
    from alignax.tasks import feedback
    h.update(constitution.load(world_cfg.constitution).fingerprint().encode())
    for module in (prompts, feedback):
      with open(module.__file__, "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:12]


def tokenizer_world(world_cfg):
  """The world a world BPE is trained on: `world_cfg` without its AI-feedback demonstrations,
  so that adding them (an RLAIF run) keeps the tokenizer, and the pretrained model, of the
  same world without them."""
  import dataclasses
  return dataclasses.replace(world_cfg, feedback_demos=0, constitution="world")


def _jsonable(world_cfg) -> Any:
  import dataclasses
  return dataclasses.asdict(world_cfg)


def _tfds_dir(data: DataConfig) -> str:
  return data.tfds_dir or default_tfds_dir()


def _barrier(name: str) -> None:
  """Process 0 builds datasets; the others wait for it, then read."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _need_world(world) -> None:
  if world is None:
    raise DataError("data.source='world' needs the config's world.* section")


def world_splits(data: DataConfig, world) -> dict[str, Any]:
  """All of the world's splits {name: source} for `world` (a `WorldConfig`)."""
  from alignax.tasks.world import build_world
  _need_world(world)
  wcfg = world
  if data.loader == "memory":
    return build_world(wcfg).splits()
  import dataclasses

  def splits_fn(seed):
    return build_world(dataclasses.replace(wcfg, seed=seed)).splits()

  tag = world_fingerprint(wcfg)
  data_dir = _tfds_dir(data)
  if jax.process_index() == 0:
    tfds_builders.build_world_dataset(data_dir, wcfg.seed, splits_fn, tag=tag)
  _barrier("alignax_world_built")
  return tfds_builders.world_sources(data_dir, wcfg.seed, splits_fn, tag=tag)


def file_splits(data: DataConfig, kind: str) -> dict[str, Any]:
  """{"train", "eval"} sources from `data.train_files` / `data.eval_files`."""
  schema = SCHEMAS[kind]
  text_mode = data.text_mode
  bad = data.bad_records
  files = {"train": ",".join(data.train_files)}
  if data.eval_files:
    files["eval"] = ",".join(data.eval_files)
  if data.loader == "memory":
    out = {s: readers.read_records(p, schema, bad_records=bad, text_mode=text_mode) for s, p in files.items()}
    for s, recs in out.items():
      _log_counts(s, recs)
  else:
    data_dir = _tfds_dir(data)
    if jax.process_index() == 0:
      tfds_builders.build_files_dataset(data_dir, schema, files, text_mode=text_mode, bad_records=bad)
    _barrier("alignax_files_built")
    out = tfds_builders.files_sources(data_dir, schema, files, text_mode=text_mode, bad_records=bad)
  if "eval" not in out:
    out = hold_out(out["train"], data.eval_records)
  return out


def _log_counts(split: str, records) -> None:
  counts = getattr(records, "counts", None)
  if counts:
    logging.info("data %s: %s", split, counts)


class Slice:
  """A contiguous view [start, stop) of a random-access source.

  `counts`/`problems`: what reading the files counted (see `readers.RecordList`), for the
  pipelines' skip counters; `hold_out` gives them to the training slice only, so records left
  out while reading are counted once.
  """

  def __init__(self, source, start: int, stop: int, *, counts=None, problems=()):
    self.source, self.start, self.stop = source, start, stop
    self.counts = dict(counts or {})
    self.problems = list(problems)

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int):
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self.source[self.start + i]

  def __getitems__(self, indices):
    """Batched reads (array_record sources read many records at once much faster)."""
    for i in indices:
      if not 0 <= i < len(self):
        raise IndexError(i)
    moved = [self.start + int(i) for i in indices]
    if hasattr(self.source, "__getitems__"):
      return self.source.__getitems__(moved)
    return [self.source[i] for i in moved]


def hold_out(source, n: int) -> dict[str, Any]:
  """The last `n` records as eval (at most half of them), the rest as train; logged."""
  total = len(source)
  n = min(n, total // 2)
  if n <= 0:
    logging.warning("no eval split: data.eval_files is empty and data.eval_records is 0")
    return {"train": source, "eval": None}
  logging.info("holding out the last %d of %d training records for eval (no data.eval_files)", n, total)
  read = dict(counts=getattr(source, "counts", None), problems=getattr(source, "problems", ()))
  return {"train": Slice(source, 0, total - n, **read), "eval": Slice(source, total - n, total)}


def split_sources(data: DataConfig, kind: str, world=None) -> dict[str, Any]:
  """{"train": source, "eval": source or None} of `kind` records.

  Args:
    data: the `data.*` section.
    kind: "pretrain", "sft", "preference" or "prompts".
    world: the `WorldConfig` (needed when data.source is "world").
  """
  if kind not in SCHEMAS:
    raise ValueError(f"unknown record kind {kind!r}")
  if data.source == "world":
    splits = world_splits(data, world)
    return {"train": splits[f"{kind}_train"], "eval": splits[f"{kind}_eval"]}
  if data.source == "files":
    return file_splits(data, kind)
  raise DataError(f"config.data.source: unknown source {data.source!r}")


# --------------------------------------------------------------------------------------------
# Tokenizers: `tokenizer = "world_bpe:N"` trains (once, cached) a SentencePiece BPE of N pieces
# on the world's corpus; any other value goes to `make_tokenizer` ("bytes", "*.model", ...).

WORLD_BPE = "world_bpe"


def world_tokenizer_path(data: DataConfig, world, vocab_size: int) -> str:
  """The cached world BPE model for `world`, trained first if missing (process 0 only).

  Training is deterministic (one thread, fixed input order), so every stage and process of a
  run resolves the same file; the name carries the world fingerprint and the vocabulary size.
  """
  _need_world(world)
  wcfg = tokenizer_world(world)
  folder = os.path.join(_tfds_dir(data), "tokenizers")
  path = os.path.join(folder, f"world_{world_fingerprint(wcfg)}_bpe{vocab_size}.model")
  if jax.process_index() == 0 and not os.path.exists(path):
    from alignax.data.sentencepiece_tokenizer import train_sentencepiece
    from alignax.tasks.world import build_world
    world = build_world(wcfg)
    texts = [r["text"] for r in world.pretrain_records("train")]
    for r in world.sft_records("train"):
      texts += [r["prompt"], r["response"]]
    os.makedirs(folder, exist_ok=True)
    tmp_prefix = os.path.join(folder, f".tmp_{os.getpid()}_bpe{vocab_size}")
    trained = train_sentencepiece(texts, tmp_prefix, vocab_size)
    os.replace(trained, path)  # atomic: a concurrent reader never sees half a model
    if os.path.exists(tmp_prefix + ".vocab"):
      os.replace(tmp_prefix + ".vocab", path[: -len(".model")] + ".vocab")
    logging.info("trained the world BPE tokenizer (%d pieces) into %s", vocab_size, path)
  _barrier("alignax_world_tokenizer")
  return path


def resolve_tokenizer(spec: str, data: DataConfig | None = None, world=None):
  """The tokenizer `spec` (the config's `tokenizer`) names (see above); a world BPE needs the
  `data.*` section (where it is cached) and the `WorldConfig`."""
  from alignax.data.tokenizers import make_tokenizer
  if spec == WORLD_BPE or spec.startswith(WORLD_BPE + ":"):
    try:
      vocab = int(spec.split(":", 1)[1]) if ":" in spec else 1024
    except ValueError:
      raise DataError(f"config.tokenizer: expected 'world_bpe:<vocab size>', got {spec!r}") from None
    return make_tokenizer(world_tokenizer_path(data or DataConfig(), world, vocab))
  return make_tokenizer(spec)
