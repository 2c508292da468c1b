"""Typed config sections: what every layer's frozen config dataclass shares.

A layer owns the type of its section (`DataConfig` in `alignax.data.config`, `TrainConfig` in
`alignax.train.config`, `CheckpointConfig`, `ParallelConfig`, `ModelConfig`), as optax owns its
hyperparameters; `alignax.config.resolve` builds them all from the ConfigDict once, at start-up,
so code below the runner reads typed, validated values and never a ConfigDict.

  @dataclasses.dataclass(frozen=True)
  class CheckpointConfig(Section):
    SECTION = "checkpoint"
    every: int = 0
    def check(self):
      require(self.every >= 0, "checkpoint.every", "must be >= 0")

`CheckpointConfig.from_mapping(cfg.checkpoint)` rejects unknown keys (with the closest known
one), converts each value to its field's type (an int where a float is declared, a list read
back from JSON where a tuple is), then runs `check`. Every error is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, ClassVar, Iterable, Mapping

from alignax.errors import ConfigError


def require(ok: bool, key: str, msg: str) -> None:
  """Raises ConfigError(`config.<key>: <msg>`) unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{key}: {msg}")


def one_of(value: Any, key: str, choices: Iterable[Any]) -> None:
  choices = tuple(choices)
  require(value in choices, key, f"must be one of {choices}, got {value!r}")


def finite(value: float, key: str) -> None:
  require(math.isfinite(value), key, f"must be finite, got {value}")


def _convert(value: Any, annotation: Any, key: str) -> Any:
  """`value` as the declared field type (bool, int, float, str, a tuple, a nested Section)."""
  origin = typing.get_origin(annotation)
  if isinstance(annotation, type) and issubclass(annotation, Section):
    if isinstance(value, annotation):
      return value
    return annotation.from_mapping(value, prefix=key)
  if origin is tuple or annotation is tuple:
    if isinstance(value, str):
      value = [v.strip() for v in value.split(",") if v.strip()]
    require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
    args = typing.get_args(annotation)
    item = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else None
    return tuple(_convert(v, item, key) if item is not None else v for v in value)
  if annotation is bool:
    require(isinstance(value, (bool, int)) and value in (0, 1, True, False), key,
            f"must be true or false, got {value!r}")
    return bool(value)
  if annotation is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
      value, ok = int(value), True
    require(ok, key, f"must be a whole number, got {value!r}")
    return int(value)
  if annotation is float:
    require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
            f"must be a number, got {value!r}")
    finite(float(value), key)
    return float(value)
  if annotation is str:
    require(isinstance(value, str), key, f"must be a string, got {value!r}")
    return value
  return value


@dataclasses.dataclass(frozen=True)
class Section:
  """Base of the typed sections: `from_mapping` to build, `check` to validate, `to_dict`."""

  SECTION: ClassVar[str] = ""

  def check(self) -> None:
    """Raises ConfigError naming the key of a value that cannot work (override)."""

  def __post_init__(self):
    self.check()

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any] | None, prefix: str | None = None):
    """Builds the section from a dict or ConfigDict (missing keys take the field defaults)."""
    prefix = cls.SECTION if prefix is None else prefix
    values = dict(values.to_dict() if hasattr(values, "to_dict") else (values or {}))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
      if name not in fields:
        near = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.5)
        hint = f" (did you mean {prefix}.{near[0]}?)" if near else ""
        raise ConfigError(f"config.{prefix}.{name}: unknown key{hint}; known: {', '.join(fields)}")
    kwargs = {name: _convert(value, hints[name], f"{prefix}.{name}") for name, value in values.items()}
    return cls(**kwargs)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)
