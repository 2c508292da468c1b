"""A JSONL output that a killed command resumes without losing or duplicating a record.

Rows are appended in chunks of consecutive input indices, each flushed and fsynced; every row
names the index of its input record; the command's settings live beside the file in
OUT.<kind>.json. Opening an existing output keeps its complete chunks, drops a chunk a kill cut
short (its complete lines and a torn last line) and reports the indices already done; a rerun
with other settings is refused, naming them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

from alignax.errors import DataError


def _write_json_atomic(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class ResumableJsonl:
  """The output file of `alignax label` / `alignax revise`.

  Args:
    path: the JSONL file.
    kind: "label" or "revise": names the settings file (PATH.<kind>.json) and the command.
    settings: what must not change between a run and its resume (JSON-able).
    index_of: a written row -> the index of its input record.
    chunk, total: rows are written in chunks of input indices [k * chunk, (k + 1) * chunk) of
      [0, total); a chunk a kill left incomplete is dropped whole on resume and done again, so
      every chunk is computed as one batch, exactly as in an uninterrupted run (sampling keys
      and batch shapes follow the chunk).
  """

  def __init__(self, path: str, kind: str, settings: dict[str, Any], index_of: Callable[[dict], int],
               chunk: int, total: int):
    self.path, self.kind, self.settings, self.index_of = path, kind, settings, index_of
    self.chunk, self.total = int(chunk), int(total)
    self.settings_path = f"{path}.{kind}.json"
    self.done = self._open()

  def _open(self) -> set[int]:
    if not os.path.exists(self.path):
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      _write_json_atomic(self.settings_path, {"settings": self.settings, "finished": False})
      return set()
    if not os.path.exists(self.settings_path):
      raise DataError(f"--out={self.path} exists and was not written by `alignax {self.kind}` (no "
                      f"{os.path.basename(self.settings_path)}); move it away or choose another --out")
    with open(self.settings_path, encoding="utf-8") as f:
      saved = json.load(f).get("settings", {})
    changed = [k for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k)]
    if changed:
      raise DataError(f"--out={self.path} was written with other settings ({', '.join(changed)} "
                      "differ); resuming would mix two runs. Choose another --out")
    with open(self.path, "rb") as f:
      data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the torn tail of a killed write: those records are done again
      with open(self.path, "r+b") as f:
        f.truncate(end)
    lines = data[:end].splitlines(keepends=True)
    done: list[int] = []
    for n, line in enumerate(lines, 1):
      try:
        done.append(int(self.index_of(json.loads(line))))
      except (ValueError, KeyError, TypeError):
        raise DataError(f"{self.path}:{n}: not a record written by `alignax {self.kind}`; move the "
                        "file away or choose another --out") from None
    if len(set(done)) != len(done):
      raise DataError(f"{self.path}: holds an input index more than once; it was not written by "
                      f"one `alignax {self.kind}` run")
    counts: dict[int, int] = {}
    for i in done:
      counts[i // self.chunk] = counts.get(i // self.chunk, 0) + 1
    complete = {k for k, n in counts.items()
                if n == min(self.chunk, self.total - k * self.chunk)}
    if len(complete) < len(counts):  # a chunk cut short: drop its rows, it is done again whole
      keep = [line for line, i in zip(lines, done) if i // self.chunk in complete]
      tmp = self.path + ".tmp"
      with open(tmp, "wb") as f:
        f.write(b"".join(keep))
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
      done = [i for i in done if i // self.chunk in complete]
    return set(done)

  def todo_chunks(self) -> list[list[int]]:
    """The chunks of input indices not written yet, in order."""
    return [list(range(start, min(start + self.chunk, self.total)))
            for start in range(0, self.total, self.chunk) if start not in self.done]

  def append(self, rows: Iterable[dict]) -> None:
    """Appends rows (durably: the call returns once they are on disk)."""
    rows = list(rows)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
      f.flush()
      os.fsync(f.fileno())
    self.done.update(int(self.index_of(r)) for r in rows)

  def rows(self) -> list[dict]:
    with open(self.path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]

  def finish(self, summary: dict[str, Any]) -> None:
    """Marks the output finished, with its summary, in the settings file."""
    _write_json_atomic(self.settings_path, {"settings": self.settings, "finished": True,
                                            "summary": summary})


def progress_bar(total: int, initial: int, desc: str, unit: str, enabled: bool = True):
  """A tqdm bar (None when disabled or nothing is left to do)."""
  if not enabled or initial >= total:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


def sha256_files(paths) -> str:
  """A short hash of the files' bytes (a resume must read the same input)."""
  import hashlib
  h = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()[:16]
