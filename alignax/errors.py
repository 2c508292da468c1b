"""The errors a user sees, at the bottom of the package so every layer can raise them.

Each names what to fix: the config key, the file and line, or the record. The CLI prints them
without a traceback.
"""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key (`config.train.steps: ...`)."""


class DataError(ValueError):
  """Bad input data or a bad data argument; the message names the file/line or record."""


class CheckpointError(RuntimeError):
  """A checkpoint or export that cannot be read, or one whose contents do not fit the run."""
