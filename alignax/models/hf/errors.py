"""The error every Hugging Face mapping raises."""

from alignax.errors import CheckpointError


class HFError(CheckpointError):
  """A Hugging Face checkpoint (or export target) alignax cannot map; the message says why."""
