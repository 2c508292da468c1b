"""Preemption: SIGTERM / SIGINT stop the loop at the next step boundary."""

from __future__ import annotations

import signal

from absl import logging



class StopSignal:
  """Records SIGTERM/SIGINT; `requested()` is polled by the loop between steps.

  A second SIGINT falls through to the default handler (an immediate KeyboardInterrupt), so a
  user can always get out.
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning("received %s: finishing the current step, then saving",
                    signal.Signals(signum).name)

  def requested(self) -> bool:
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
