"""TFDS builders (array_record, no TensorFlow) for the synthetic world and for local files.

Both builders store each record as one JSON string (feature "record"): the records are
nested (message lists) and differ per split (text / sft / preference / prompts), and JSON
keeps them exactly as the pipelines expect. Splits keep their input order
(`disable_shuffling`), so index i of a split is record i of the input.

Build offline into any `data_dir`, then read back as random-access grain sources:

  sources = world_sources(data_dir, seed=3, splits_fn=lambda s: build_world(...).splits())
  it = pipeline.sft_pipeline(sources["sft_train"], tok, batch_size=8, seq_len=128)

`tfds.data_sources(...)` / `builder.as_data_source()` give `ArrayRecordDataSource`s whose
records are {"record": bytes}; `JsonRecords` wraps one to give back python dicts.

Verified in this venv (tensorflow-datasets 4.9.10, no TensorFlow installed): generating with
`file_format="array_record"`, reading through `as_data_source()` and `grain.MapDataset.source`
work and never import tensorflow; GCS metadata lookups are disabled in this TFDS version, so
nothing touches the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging as absl_logging
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from alignax.data import readers, schemas
from alignax.data.schemas import DataError

SplitsFn = Callable[[int], Mapping[str, Sequence[Mapping[str, Any]]]]

# World split name prefix -> record schema it must satisfy.
WORLD_SPLIT_SCHEMAS = {"pretrain": "text", "sft": "sft", "preference": "preference",
                       "prompts": "prompts", "unpaired": "unpaired"}


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({"record": tfds.features.Text()})


def _encode(record: Mapping[str, Any]) -> dict[str, str]:
  try:
    return {"record": json.dumps(record, ensure_ascii=False, sort_keys=True)}
  except TypeError as e:
    raise DataError(f"record is not JSON-serializable ({e}): {str(record)[:200]}") from None


def _tfds_split_name(name: str) -> str:
  # TFDS split names allow letters, digits and underscores only.
  if not re.fullmatch(r"\w+", name):
    raise DataError(f"split name {name!r} must contain only letters, digits and '_'")
  return name


def _download_config() -> tfds.download.DownloadConfig:
  return tfds.download.DownloadConfig(try_download_gcs=False)


@contextlib.contextmanager
def _own_scratch() -> Iterator[None]:
  """Points `tempfile` at a directory removed afterwards: a TFDS builder whose dataset is not
  built yet makes an (empty) `mkdtemp("tfds")` for GCS metadata it never fetches, and would
  leave one in /tmp per run."""
  previous = tempfile.tempdir
  with tempfile.TemporaryDirectory(prefix="alignax_tfds_") as scratch:
    tempfile.tempdir = scratch
    try:
      yield
    finally:
      tempfile.tempdir = previous


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str) -> Iterator[None]:
  """Holds an exclusive lock on `data_dir/.locks/<name>.lock` while one dataset is prepared, so
  that runs started together (a sweep's processes, parallel test workers) build it once: the
  others wait, then find it built. `flock` is released by the kernel if the holder dies."""
  folder = os.path.join(data_dir, ".locks")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, re.sub(r"[^\w.-]", "_", name) + ".lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet(enabled: bool = True) -> Iterator[None]:
  """Silences TFDS's progress bars, banner prints and config warnings, then restores them."""
  if not enabled:
    yield
    return
  # pylint: disable=protected-access
  active, verbosity = tqdm_utils._active, absl_logging.get_verbosity()
  tqdm_utils._active = False
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tqdm_utils._active = active  # pylint: disable=protected-access
    absl_logging.set_verbosity(verbosity)


class JsonRecords:
  """Random access to JSON-encoded records: `len(src)`, `src[i] -> dict`.

  Wraps a TFDS `ArrayRecordDataSource` (records {"record": bytes}); usable directly as a
  pipeline source or with `grain.MapDataset.source`.

  Attributes:
    counts, problems: what reading the input files counted (as `readers.RecordList`), e.g.
      counts["invalid"] records left out under bad_records="skip" and the first messages
      ("path:line: problem"); empty for the world. The pipelines add them to their
      "skipped/invalid" counter, so records dropped while building are never lost silently.
  """

  def __init__(self, data_source, *, counts: Mapping[str, int] | None = None,
               problems: Sequence[str] = ()):
    self._source = data_source
    self.counts = dict(counts or {})
    self.problems = list(problems)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return json.loads(self._source[index]["record"])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [json.loads(r["record"]) for r in self._source.__getitems__(indices)]

  def __repr__(self) -> str:
    return f"JsonRecords({self._source!r})"


# ============================================================================ the world


@dataclasses.dataclass(eq=False)
class WorldDataConfig(tfds.core.BuilderConfig):
  """A world's seed (and an optional tag for other world settings) name its own directory,
  so worlds built from different seeds never collide in one data_dir."""

  seed: int = 0
  tag: str = ""


def world_config(seed: int, tag: str = "") -> WorldDataConfig:
  if tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
    raise DataError(f"world tag {tag!r} must contain only letters, digits, '_', '.', '-'")
  name = f"seed_{seed}" + (f"_{tag}" if tag else "")
  return WorldDataConfig(name=name, seed=seed, tag=tag,
                         description=f"synthetic alignment world, seed {seed} {tag}".strip())


class AlignaxWorld(tfds.core.GeneratorBasedBuilder):
  """The synthetic alignment world's splits, one JSON record per example.

  `splits_fn(seed) -> {split_name: [record, ...]}` produces the data (e.g.
  `lambda s: build_world(WorldConfig(seed=s)).splits()`); it is only called when the
  dataset is not already prepared in `data_dir`. Records are validated by the schema their
  split name's prefix implies (pretrain_* text, sft_* sft, preference_* preference,
  prompts_* prompts); a bad record fails the build with a message naming split and index.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "JSON records, one feature."}

  def __init__(self, *, splits_fn: SplitsFn | None = None, **kwargs):
    self._splits_fn = splits_fn
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=_features(), disable_shuffling=True,
                                 description="alignax synthetic world (JSON records)")

  def _split_generators(self, dl_manager):
    if self._splits_fn is None:
      raise DataError(f"{self.name}/{self.builder_config.name} is not prepared in "
                      f"{self.data_dir} and no splits_fn was given to generate it")
    splits = self._splits_fn(self.builder_config.seed)
    return {_tfds_split_name(name): self._generate_examples(name, records)
            for name, records in splits.items()}

  def _generate_examples(self, split: str, records: Sequence[Mapping[str, Any]]):
    schema = WORLD_SPLIT_SCHEMAS.get(split.split("_")[0])
    for i, record in enumerate(records):
      if schema is not None:
        try:
          schemas.validate(schema, record)
        except DataError as e:
          raise DataError(f"world split {split!r} record {i}: {e}") from None
      yield i, _encode(record)


def build_world_dataset(data_dir: str, seed: int, splits_fn: SplitsFn | None = None, *,
                        tag: str = "", quiet: bool = True) -> AlignaxWorld:
  """Prepares (if needed) and returns the world builder for `seed` under `data_dir`.

  The data lands in `data_dir/alignax_world/seed_<seed>[_<tag>]/1.0.0/`.
  """
  config = world_config(seed, tag)
  with _build_lock(data_dir, f"world_{config.name}"), _quiet(quiet), _own_scratch():
    builder = AlignaxWorld(config=config, data_dir=data_dir,
                           file_format="array_record", splits_fn=splits_fn)
    builder.download_and_prepare(download_config=_download_config())
  return builder


def world_sources(data_dir: str, seed: int, splits_fn: SplitsFn | None = None, *,
                  tag: str = "", quiet: bool = True) -> dict[str, JsonRecords]:
  """{split: JsonRecords} of the world for `seed`, building it first if needed."""
  builder = build_world_dataset(data_dir, seed, splits_fn, tag=tag, quiet=quiet)
  return {name: JsonRecords(src) for name, src in builder.as_data_source().items()}


# ============================================================================ local files


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
  """Files per split, read with `readers.read_records` under one schema."""

  schema: str = "text"
  files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  text_mode: str = "lines"
  bad_records: str = "error"


def _fingerprint(schema: str, files: Mapping[str, Sequence[str]], text_mode: str,
                 bad_records: str) -> str:
  """Hash of the options and each file's path, size and mtime: changed files get a new
  directory instead of silently reusing a stale build."""
  h = hashlib.sha256(f"{schema}|{text_mode}|{bad_records}".encode())
  for split in sorted(files):
    for path in files[split]:
      st = os.stat(path)
      h.update(f"|{split}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  return h.hexdigest()[:12]


def local_files_config(schema: str, files: Mapping[str, str | Sequence[str]], *,
                       text_mode: str = "lines", bad_records: str = "error",
                       name: str | None = None) -> LocalFilesConfig:
  """A config for `files` {split: paths or comma-separated globs}; the default name is
  "<schema>_<fingerprint>" so different file sets never share a directory."""
  schemas.check_schema(schema)
  schemas.check_policy(bad_records)
  expanded = {_tfds_split_name(s): readers.expand_paths(p) for s, p in files.items()}
  for paths in expanded.values():
    for path in paths:
      readers.check_file(path)  # "file not found" / "is a directory" before fingerprinting
  if name is None:
    name = f"{schema}_{_fingerprint(schema, expanded, text_mode, bad_records)}"
  return LocalFilesConfig(name=name, schema=schema, files=expanded, text_mode=text_mode,
                          bad_records=bad_records, description=f"{schema} records from files")


class AlignaxLocalFiles(tfds.core.GeneratorBasedBuilder):
  """Users' JSONL / Parquet / text files as an array_record dataset of normalized records.

  Records are validated while building (errors name file and line); with
  bad_records="skip" invalid records are left out, and what reading counted (the
  `readers.RecordList` counts and first problems of each split) is stored in the dataset's
  metadata.json, so a later run reading the prepared dataset still reports them.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "JSON records, one feature.",
                   "1.1.0": "read counts (records left out as invalid) in the metadata."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=_features(), disable_shuffling=True,
                                 metadata=tfds.core.MetadataDict(),
                                 description="alignax local files (JSON records)")

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    return {split: self._generate_examples(split, paths) for split, paths in cfg.files.items()}

  def _generate_examples(self, split: str, paths: Sequence[str]):
    cfg = self.builder_config
    records = readers.read_records(list(paths), cfg.schema, bad_records=cfg.bad_records,
                                   text_mode=cfg.text_mode)
    # Written with the dataset info once every split is generated (before it is visible).
    self.info.metadata[split] = {"counts": dict(records.counts),
                                 "problems": list(records.problems)}
    for i, record in enumerate(records):
      yield i, _encode(record)


def build_files_dataset(data_dir: str, schema: str, files: Mapping[str, str | Sequence[str]],
                        *, text_mode: str = "lines", bad_records: str = "error",
                        name: str | None = None, quiet: bool = True) -> AlignaxLocalFiles:
  """Prepares (if needed) and returns the builder for `files` {split: paths} under data_dir.

  The data lands in `data_dir/alignax_local_files/<schema>_<fingerprint>/1.1.0/`.
  """
  config = local_files_config(schema, files, text_mode=text_mode, bad_records=bad_records,
                              name=name)
  with _build_lock(data_dir, f"local_files_{config.name}"), _quiet(quiet), _own_scratch():
    builder = AlignaxLocalFiles(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=_download_config())
  return builder


def files_sources(data_dir: str, schema: str, files: Mapping[str, str | Sequence[str]],
                  **kwargs) -> dict[str, JsonRecords]:
  """{split: JsonRecords} of local files, building the dataset first if needed; each carries
  its split's read counts and first problems (see `JsonRecords`)."""
  builder = build_files_dataset(data_dir, schema, files, **kwargs)
  meta = builder.info.metadata or {}
  out = {}
  for name, src in builder.as_data_source().items():
    read = meta.get(name) or {}
    out[name] = JsonRecords(src, counts=read.get("counts"), problems=read.get("problems", ()))
  return out
