"""The validation pass: every record of a source checked once, before the first batch.

A pipeline (`alignax.data.pipeline`) hands `screen_source` its source, schema and encoder; the
pass runs each record through the very checks the pipeline's map runs (schema, identical pair,
empty response or text, prompt too long for the stage's limits, too_long="skip") and `enforce`
applies the `bad_records` policy to what it found: "error" raises one DataError listing the
first bad records with file:line; "skip" logs each reason once and the distinct counts go to
the iterator's `stats()`; a source (or a shard) with nothing usable always raises, so a
repeating pipeline can never spin forever.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Callable, Iterator, NamedTuple

from absl import logging

from alignax.data import schemas
from alignax.data.schemas import (EMPTY_RESPONSE, EMPTY_TEXT, IDENTICAL_PAIR, INVALID,
                                  PAIR_TOO_LONG, PROMPT_TOO_LONG, DataError)

Example = dict[str, Any]

# Reasons governed by `bad_records` ("error" stops, "skip" counts). too_long is always skipped
# and counted: it follows from an explicit option (too_long="skip").
POLICY_REASONS = frozenset({INVALID, IDENTICAL_PAIR, EMPTY_RESPONSE, PROMPT_TOO_LONG, PAIR_TOO_LONG,
                            EMPTY_TEXT})
TOO_LONG = "too_long"


def skip_marker(reason: str, message: str | None = None) -> Example:
  """The example an encoder returns for a record it cannot use: {"_skip": reason, "_message"}."""
  return {"_skip": reason, "_message": message or schemas.issue_message(reason)}


def verdict(raw: Any, index: int, schema: str, encode: Callable[[dict], Example]) -> Example:
  """What the pipeline makes of one raw record: the encoded example, or a skip marker
  {"_skip": reason, "_message", "_where"} (the same call for the validation pass and the map)."""
  try:
    rec = schemas.validate(schema, raw)
  except DataError as e:
    ex = skip_marker(INVALID, str(e))
  else:
    issue = schemas.record_issue(schema, rec)
    ex = skip_marker(issue) if issue else encode(rec)
  if "_skip" in ex:
    ex["_where"] = schemas.where(raw, index)
  return ex


class BadRecord(NamedTuple):
  """A record the pipeline cannot use: why (a counter reason), where, and what exactly."""

  reason: str  # one of POLICY_REASONS, or TOO_LONG
  where: str  # "path:line", "path: row N" (files) or "record i" (other sources)
  message: str


@dataclasses.dataclass
class Screening:
  """What the validation pass found in a whole source.

  Attributes:
    num_records: records in the source.
    bad: {source index: BadRecord} for every record the pipeline would skip.
    read_invalid: records the file readers already left out (bad_records="skip"), from the
      source's `counts["invalid"]` (`readers.RecordList`, `tfds_builders.JsonRecords`).
    read_problems: the readers' first messages for those ("path:line: problem").
  """

  num_records: int
  bad: dict[int, BadRecord]
  read_invalid: int = 0
  read_problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def usable(self) -> int:
    return self.num_records - len(self.bad)

  def by_reason(self) -> dict[str, tuple[int, list[str]]]:
    """{reason: (distinct records, first "where: message"s)}, reasons in order of first record."""
    out: dict[str, tuple[int, list[str]]] = {}
    if self.read_invalid:
      out[INVALID] = (self.read_invalid, list(self.read_problems[:_SHOWN]))
    for index in sorted(self.bad):
      b = self.bad[index]
      n, shown = out.get(b.reason, (0, []))
      if len(shown) < _SHOWN:
        shown.append(f"{b.where}: {b.message}")
      out[b.reason] = (n + 1, shown)
    return out

  def counts(self) -> dict[str, int]:
    """{"usable_records": n, "skipped/<reason>": distinct records} for `DataIterator.stats`."""
    out = {"usable_records": self.usable}
    for reason, (n, _) in self.by_reason().items():
      out[f"skipped/{reason}"] = n
    return out

  def files(self) -> str:
    """The files the bad records came from, for messages ("the data source" if unknown)."""
    names: dict[str, None] = {}
    for text in self.read_problems + [b.where + ":" for b in self.bad.values()]:
      m = _FILE_OF.match(text)
      if m:
        names[m.group("file")] = None
    if not names:
      return "the data source"
    listed = list(names)
    more = f" and {len(listed) - _SHOWN} more files" if len(listed) > _SHOWN else ""
    return ", ".join(listed[:_SHOWN]) + more


_SHOWN = 5  # bad records quoted in one message or log line
_SCREEN_CHUNK = 1024  # records read at once by the validation pass
# "path:17: ..." or "path: row 3: ..." -> path (records without a file say "record i: ...").
_FILE_OF = re.compile(r"(?P<file>.+?)(?::\d+|: row \d+):")
_LOGGED: set[str] = set()  # skip lines already logged in this process (log each only once)


def _read_all(source) -> Iterator[tuple[int, Any]]:
  """(index, raw record) for the whole source, read in chunks where the source can (TFDS)."""
  many = getattr(source, "__getitems__", None)
  n = len(source)
  for start in range(0, n, _SCREEN_CHUNK):
    indices = list(range(start, min(n, start + _SCREEN_CHUNK)))
    yield from zip(indices, many(indices) if many else [source[i] for i in indices])


def screen_source(source, schema: str, encode: Callable[[dict], Example]) -> Screening:
  """The validation pass: every record of `source` through validate / record_issue / encode.

  Runs the very checks the map runs (schema, identical pair, empty response or text, prompt
  too long for the stage's limits, too_long="skip"), once per record, so a bad record is found
  before training instead of when (or if) an epoch reaches it. Cost: one encode of each record.
  """
  bad = {}
  for index, raw in _read_all(source):
    ex = verdict(raw, index, schema, encode)
    if "_skip" in ex:
      bad[index] = BadRecord(ex["_skip"], ex["_where"], ex["_message"])
  read = getattr(source, "counts", None) or {}
  return Screening(len(source), bad, read_invalid=int(read.get(INVALID, 0)),
                   read_problems=list(getattr(source, "problems", None) or ()))


def enforce(screening: Screening, *, bad_records: str, shard_count: int = 1) -> None:
  """Applies `bad_records` to what the validation pass found.

  "error": any bad record of a POLICY_REASONS kind raises one DataError (the first few with
  file:line, then the count per reason). "skip" (and too_long="skip" always): one WARNING line
  per reason. Either way, a source with no usable record, or a shard of `shard_count` with
  none, raises DataError naming the files: a repeating pipeline would otherwise spin forever.
  """
  policy = [b for _, b in sorted(screening.bad.items()) if b.reason in POLICY_REASONS]
  if bad_records == "error" and policy:
    raise DataError(_bad_records_error(screening, policy))
  _log_skipped(screening)
  _check_usable(screening, shard_count)


def _summary(screening: Screening) -> str:
  return ", ".join(f"{reason} {n}" for reason, (n, _) in screening.by_reason().items())


def _bad_records_error(screening: Screening, policy: list[BadRecord]) -> str:
  lines = [f"{b.where}: {b.message}" for b in policy[:_SHOWN]]
  shown = f", the first {_SHOWN} shown" if len(policy) > _SHOWN else ""
  lines.append(f"({len(policy)} bad record{'s' if len(policy) > 1 else ''} of "
               f"{screening.num_records} in {screening.files()}: {_summary(screening)}{shown}; "
               f"bad_records='error' stops before training: fix them, or pass "
               f"bad_records='skip' to skip and count such records)")
  return "\n".join(lines)


def _log_skipped(screening: Screening) -> None:
  total = screening.num_records + screening.read_invalid
  for reason, (n, shown) in screening.by_reason().items():
    option = "too_long='skip'" if reason == TOO_LONG else "bad_records='skip'"
    line = (f"data: skipping {n} of {total} records as {reason} ({option}; counted once in "
            f"data/skipped/{reason}); first: {'; '.join(shown[:3])}")
    if line not in _LOGGED:
      _LOGGED.add(line)
      _warn(line)


def _warn(line: str) -> None:
  """absl WARNING, and the same line on stderr when absl sends warnings only to a log file (as
  a stage does once it logs to WORKDIR/log.INFO): a skip must be seen, not buried in a file."""
  logging.warning("%s", line)
  if not _absl_warnings_reach_stderr():
    print(f"alignax: warning: {line}", file=sys.stderr, flush=True)


def _absl_warnings_reach_stderr() -> bool:
  from absl import flags
  try:
    if not flags.FLAGS.is_parsed() or flags.FLAGS["logtostderr"].value or \
        flags.FLAGS["alsologtostderr"].value:
      return True  # before flag parsing absl (or Python's last-resort handler) uses stderr
    stream = logging.get_absl_handler().python_handler.stream
    threshold = logging.converter.string_to_standard(flags.FLAGS["stderrthreshold"].value)
  except Exception:  # pylint: disable=broad-except - a logging detail must never stop a run
    return False
  return stream in (sys.stderr, sys.__stderr__) or threshold <= logging.converter.STANDARD_WARNING


def _check_usable(screening: Screening, shard_count: int) -> None:
  if not screening.bad:
    return
  b = screening.bad[min(screening.bad)]
  first = f"{b.where}: {b.message}"
  if screening.usable == 0:
    raise DataError(f"no usable records in {screening.files()}: all {screening.num_records} "
                    f"records would be skipped ({_summary(screening)}; first: {first}); "
                    f"nothing is left to train on: fix the data or the length limits")
  n, bad = screening.num_records, screening.bad
  for shard in range(shard_count):
    if shard < n and all(i in bad for i in range(shard, n, shard_count)):
      raise DataError(f"shard {shard} of {shard_count} has no usable records: records "
                      f"{shard}::{shard_count} of {screening.files()} are all bad "
                      f"({screening.usable} usable of {n}; first bad: {first})")
