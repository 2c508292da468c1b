"""One writer per run directory: `WORKDIR/.lock` names the process that trains in it.

Two runs in one workdir would interleave their metrics rows and race on the same checkpoint
steps, so the second refuses at once, naming the holder. A lock whose process is gone (killed, or
the machine rebooted) is stale and is taken over with a message. Only process 0 of a multi-process
run holds the lock: the other processes write under process 0's direction.

The lock file is JSON: {"pid", "host", "started" (the process's start time, so a reused pid is
not mistaken for the holder), "time", "command"}.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot), or None where /proc is absent."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) may hold spaces; fields after its closing ")" are fixed.
  return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  now = _process_start(pid)
  return started is None or now is None or now == started


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds `WORKDIR/.lock` for the run; released on exit.

  Raises WorkdirLockedError when a live process (this host) or any process on another host (whose
  liveness cannot be checked from here) holds it.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.enabled = enabled
    self._held = False

  def _info(self) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}

  def _read(self) -> dict | None:
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):  # cut short by a kill between create and write: stale
      return {}

  def acquire(self) -> None:
    if not self.enabled:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):  # a takeover races with other takers: retry the exclusive create
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._check_holder(self._read())
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self._info(), f)
      self._held = True
      return
    raise WorkdirLockedError(f"{os.path.dirname(self.path)}: could not take {self.path} (another run "
                             "keeps taking it)")

  def _check_holder(self, holder: dict | None) -> None:
    """Returns after removing a stale lock; raises when the holder is alive."""
    if holder is None:
      return  # released meanwhile
    workdir = os.path.dirname(self.path)
    pid, host = holder.get("pid"), holder.get("host")
    same_host = host == socket.gethostname()
    if pid is not None and (not same_host or _alive(int(pid), holder.get("started"))):
      where = "this host" if same_host else f"host {host}"
      raise WorkdirLockedError(
          f"{workdir} is in use by process {pid} on {where} (since {holder.get('time')}: "
          f"{holder.get('command', '?')}); two runs in one workdir would mix their checkpoints and "
          f"metrics. Wait for it, use another --config.workdir, or delete {self.path} if that run "
          "is not running")
    print(f"alignax: taking over the stale lock of {workdir} (process {pid} is gone)",
          file=sys.stderr, flush=True)
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if self._held:
      self._held = False
      try:
        with open(self.path, encoding="utf-8") as f:
          mine = json.load(f).get("pid") == os.getpid()
      except (OSError, ValueError):
        mine = False
      if mine:
        os.remove(self.path)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False
