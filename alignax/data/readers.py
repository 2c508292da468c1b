"""Readers for users' own files: JSONL, Parquet, Arrow (`datasets` folders) and plain text, every
record validated.

Every problem is a `DataError` whose message starts with where it is:

  data/sft.jsonl:17: missing field 'response'
  data/pairs.parquet: row 3: field 'chosen' must be a string or a list of messages, got int
  corpus.txt:5: not valid UTF-8 (byte offset 4 in the line, 1031 in the file)

JSONL lines are numbered from 1 (as editors do), Parquet rows from 0 (as pandas does).
With `bad_records="skip"` a record that fails validation is skipped and counted instead;
a file that cannot be read at all (missing, empty, not Parquet) is always an error.

Readers return a `RecordList`: a plain list of normalized records (each with a "_source"
naming its file and line/row) that also carries `counts` and the first few `problems`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any, Iterable, Iterator, Sequence

from alignax.data import schemas
from alignax.data.schemas import DataError

_MAX_PROBLEMS = 20
TEXT_MODES = ("lines", "file")


class RecordList(list):
  """A list of normalized records plus what reading them counted.

  Attributes:
    counts: {"records": kept, "invalid": skipped as not fitting the schema,
             "blank_lines": ignored empty lines}.
    problems: the first messages of skipped records ("path:line: problem").
  """

  def __init__(self, records: Iterable[dict] = ()):
    super().__init__(records)
    self.counts: dict[str, int] = {"records": 0, "invalid": 0, "blank_lines": 0}
    self.problems: list[str] = []

  def extend_from(self, other: "RecordList") -> None:
    self.extend(other)
    for k, v in other.counts.items():
      self.counts[k] = self.counts.get(k, 0) + v
    self.problems.extend(other.problems[: _MAX_PROBLEMS - len(self.problems)])


def check_file(path: str) -> str:
  """Returns `path` if it names an existing file; DataError saying what it is instead.

  A directory gets its own message (not "not found"): the path exists, it is just not a file,
  and a glob inside it is the likely intent.
  """
  if os.path.isdir(path):
    raise DataError(f"{path}: is a directory, expected a data file (to read the files in it, "
                    f"give a glob such as {os.path.join(path, '*.jsonl')})")
  if not os.path.exists(path):
    raise DataError(f"{path}: file not found")
  if not os.path.isfile(path):
    raise DataError(f"{path}: is not a regular file")
  return path


def _open_checked(path: str) -> bytes:
  """The file's bytes; DataError if it is missing, a directory, unreadable or empty."""
  check_file(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  if not data:
    raise DataError(f"{path}: file is empty")
  return data


def _utf8(raw: bytes, path: str, line_no: int, line_start: int) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte offset {e.start} in the line, "
                    f"{line_start + e.start} in the file)") from None


def _lines(data: bytes) -> Iterator[tuple[int, int, bytes]]:
  """(line number from 1, byte offset of the line, raw line without its newline)."""
  offset = 0
  pieces = data.split(b"\n")
  if pieces and not pieces[-1]:
    pieces.pop()  # the "line" after a final newline is not a line
  for no, raw in enumerate(pieces, start=1):
    yield no, offset, raw.rstrip(b"\r")
    offset += len(raw) + 1


def _keep_or_skip(out: RecordList, problem: str, bad_records: str) -> None:
  if bad_records == "error":
    raise DataError(problem)
  out.counts["invalid"] += 1
  if len(out.problems) < _MAX_PROBLEMS:
    out.problems.append(problem)


def _add(out: RecordList, record: dict, where: str, schema: str, bad_records: str) -> None:
  try:
    rec = schemas.validate(schema, record)
  except DataError as e:
    _keep_or_skip(out, f"{where}: {e}", bad_records)
    return
  rec["_source"] = where
  out.append(rec)
  out.counts["records"] += 1


def _finish(out: RecordList, path: str) -> RecordList:
  if not out and not out.counts["invalid"]:
    raise DataError(f"{path}: contains no records")
  return out


def read_jsonl(path: str, schema: str, *, bad_records: str = "error") -> RecordList:
  """Reads one JSON object per line; blank lines are ignored (and counted).

  Args:
    path: a .jsonl file.
    schema: one of `schemas.SCHEMAS`.
    bad_records: "error" raises at the first bad line; "skip" skips and counts it
      (invalid JSON, not UTF-8, not matching the schema).

  Returns:
    RecordList of normalized records, each with "_source" = "path:line".
  """
  schemas.check_schema(schema)
  schemas.check_policy(bad_records)
  data = _open_checked(path)
  out = RecordList()
  for no, start, raw in _lines(data):
    if not raw.strip():
      out.counts["blank_lines"] += 1
      continue
    where = f"{path}:{no}"
    try:
      line = _utf8(raw, path, no, start)
      record = json.loads(line)
    except DataError as e:
      _keep_or_skip(out, str(e), bad_records)
      continue
    except json.JSONDecodeError as e:
      _keep_or_skip(out, f"{where}: invalid JSON ({e.msg} at column {e.colno})", bad_records)
      continue
    _add(out, record, where, schema, bad_records)
  return _finish(out, path)


def _read_columnar(path: str, schema: str, bad_records: str, kind: str, open_batches) -> RecordList:
  """Rows of a columnar file, validated one by one: `open_batches(path)` is a context manager
  giving an iterator of pyarrow record batches (so memory stays bounded)."""
  import pyarrow as pa

  schemas.check_schema(schema)
  schemas.check_policy(bad_records)
  _open_checked(path)  # missing / empty / directory give the same messages as for JSONL
  out = RecordList()
  row = 0
  try:
    with open_batches(path) as batches:
      for batch in batches:
        for record in batch.to_pylist():
          _add(out, record, f"{path}: row {row}", schema, bad_records)
          row += 1
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable {kind} file ({e})") from None
  if row == 0:
    raise DataError(f"{path}: {kind} file has no rows")
  return _finish(out, path)


def read_parquet(path: str, schema: str, *, bad_records: str = "error",
                 batch_rows: int = 4096) -> RecordList:
  """Reads a Parquet file row by row (in record batches).

  Returns:
    RecordList of normalized records, each with "_source" = "path: row N" (N from 0).
  """
  import pyarrow.parquet as pq

  @contextlib.contextmanager
  def batches(p):
    yield pq.ParquetFile(p).iter_batches(batch_size=batch_rows)
  return _read_columnar(path, schema, bad_records, "Parquet", batches)


def read_arrow(path: str, schema: str, *, bad_records: str = "error") -> RecordList:
  """Reads an Arrow IPC file, stream (what `datasets.Dataset.save_to_disk` writes) or
  random-access format, batch by batch.

  Returns:
    RecordList of normalized records, each with "_source" = "path: row N" (N from 0).
  """
  import pyarrow as pa

  @contextlib.contextmanager
  def batches(p):
    with pa.memory_map(p) as source:
      try:
        stream = iter(pa.ipc.open_stream(source))
      except pa.ArrowInvalid:  # the random-access (file) format
        source.seek(0)
        reader = pa.ipc.open_file(source)
        stream = (reader.get_batch(i) for i in range(reader.num_record_batches))
      yield stream
  return _read_columnar(path, schema, bad_records, "Arrow", batches)


def read_text(path: str, *, mode: str = "lines", bad_records: str = "error") -> RecordList:
  """Plain text for pretraining, as {"text"} records.

  Args:
    mode: "lines": one document per non-blank line; "file": the whole file is one document.
    bad_records: for "lines", "skip" skips (and counts) lines that are not UTF-8. For
      "file", bytes that are not UTF-8 are always an error.
  """
  if mode not in TEXT_MODES:
    raise DataError(f"text mode must be one of {TEXT_MODES}, got {mode!r}")
  schemas.check_policy(bad_records)
  data = _open_checked(path)
  out = RecordList()
  if mode == "file":
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      line = data.count(b"\n", 0, e.start) + 1
      raise DataError(
          f"{path}:{line}: not valid UTF-8 (byte offset {e.start} in the file)") from None
    if not text.strip():
      raise DataError(f"{path}: contains only whitespace")
    out.append({"text": text, "_source": path})
    out.counts["records"] += 1
    return out
  for no, start, raw in _lines(data):
    if not raw.strip():
      out.counts["blank_lines"] += 1
      continue
    try:
      text = _utf8(raw, path, no, start)
    except DataError as e:
      _keep_or_skip(out, str(e), bad_records)
      continue
    out.append({"text": text, "_source": f"{path}:{no}"})
    out.counts["records"] += 1
  return _finish(out, path)


def dataset_folder_files(path: str) -> list[str] | None:
  """The data files of a dataset folder, in order, or None when `path` is not one:
  a `datasets.Dataset.save_to_disk` folder (its Arrow files, as state.json lists them) or a
  folder of Parquet shards (sorted by name). A `DatasetDict` folder is an error naming its
  splits (give one split's folder)."""
  if not os.path.isdir(path):
    return None
  if os.path.isfile(os.path.join(path, "dataset_dict.json")):
    splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    raise DataError(f"{path}: a datasets.DatasetDict folder (splits: {', '.join(splits)}); give one "
                    f"split's folder, e.g. {os.path.join(path, splits[0] if splits else 'train')}")
  state = os.path.join(path, "state.json")
  if os.path.isfile(state):
    try:
      with open(state, encoding="utf-8") as f:
        names = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"{state}: not a datasets save_to_disk state file ({e})") from None
    files = [os.path.join(path, n) for n in names]
    for f in files:
      if os.path.dirname(os.path.realpath(f)) != os.path.realpath(path):
        raise DataError(f"{state}: lists {f}, outside the folder")
    return files
  shards = sorted(glob.glob(os.path.join(path, "*.parquet")))
  return shards or None


def expand_paths(spec: str | Sequence[str]) -> list[str]:
  """Comma-separated paths/globs (or a list of them) -> sorted existing paths.

  A glob that matches nothing is an error (a typo should not silently mean "no data");
  a plain path is passed through so the reader reports it as missing. A dataset folder
  (`dataset_folder_files`) stands for its data files.
  """
  parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
  paths: list[str] = []
  for p in parts:
    if not p:
      continue
    if any(c in p for c in "*?["):
      matched = sorted(glob.glob(p))
      if not matched:
        raise DataError(f"{p}: no files match this pattern")
      paths.extend(matched)
    else:
      paths.extend(dataset_folder_files(p) or [p])
  if not paths:
    raise DataError("no data files given")
  return paths


def read_records(paths: str | Sequence[str], schema: str, *, bad_records: str = "error",
                 text_mode: str = "lines") -> RecordList:
  """Reads files of any supported kind by extension and concatenates their records.

  .jsonl/.json -> `read_jsonl`; .parquet/.pq -> `read_parquet`; .arrow -> `read_arrow`;
  .txt/.text/.md -> `read_text` (only for schema "text"). `paths` may be comma-separated, contain
  globs, and name dataset folders (a `save_to_disk` folder, a folder of Parquet shards).
  With `bad_records="skip"`, files whose records are all invalid are an error (nothing usable
  would be left to train on): the message names the files and the first problems.
  """
  out = RecordList()
  paths = expand_paths(paths)
  for path in paths:
    check_file(path)  # a directory says so before its (missing) extension is judged
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
      part = read_jsonl(path, schema, bad_records=bad_records)
    elif ext in (".parquet", ".pq"):
      part = read_parquet(path, schema, bad_records=bad_records)
    elif ext == ".arrow":
      part = read_arrow(path, schema, bad_records=bad_records)
    elif ext in (".txt", ".text", ".md"):
      if schema != "text":
        raise DataError(f"{path}: plain text files can only hold schema 'text', not {schema!r}")
      part = read_text(path, mode=text_mode, bad_records=bad_records)
    else:
      raise DataError(f"{path}: unknown file type {ext!r}; expected .jsonl, .parquet, .arrow or .txt")
    out.extend_from(part)
  if not out:
    raise DataError(f"{', '.join(paths)}: no usable records: all {out.counts['invalid']} records "
                    f"are invalid (bad_records='skip' skipped them); first: "
                    + "; ".join(out.problems[:3]))
  return out


def write_jsonl(path: str, records: Iterable[Any]) -> None:
  """Writes records one JSON object per line (UTF-8, non-ASCII kept readable)."""
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
