"""`checkpoint.*`: how often a run saves and how many steps it keeps."""

from __future__ import annotations

import dataclasses


from alignax.sections import Section, require


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
  """Attributes:
    every: steps between saves; 0 = only at the end (and on SIGTERM).
    keep: checkpoints kept (the newest).
    async_save: write in the background while training goes on.
  """

  SECTION = "checkpoint"
  every: int = 0
  keep: int = 2
  async_save: bool = True

  def check(self) -> None:
    require(self.every >= 0, "checkpoint.every", "must be >= 0")
    require(self.keep >= 1, "checkpoint.keep", "must be >= 1")
