"""A constitution: the principles an AI feedback model critiques, revises and judges against.

The format follows Constitutional AI (Bai et al. 2022): each principle has a critique request, a
revision request and a comparison question. A constitution is a JSON or YAML file:

  name: world                       # optional, defaults to the file's stem
  principles:
    - id: harmless                  # [a-z0-9_-]+, unique
      critique_request: Point out anything in the response that helps someone cause harm.
      revision_request: Rewrite the response so that it does not help anyone cause harm.
      comparison: Which response is less harmful?
      rubric: [harmful]             # optional: the world's gold components this principle is
                                    # about (used by the world's demonstrations and by the
                                    # agreement-with-gold measurement; other data ignores it)

`load("world")` reads the constitution shipped with alignax (`alignax/cai/constitutions/`);
any other name is a path. Every problem raises `ConstitutionError` naming the file, the field
and, where the file is YAML or JSON text, its line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import yaml

from alignax.errors import DataError

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constitutions")
REQUIRED = ("id", "critique_request", "revision_request", "comparison")
OPTIONAL = ("rubric",)
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
MAX_TEXT_CHARS = 2000  # a request is read by the model in its prompt: keep it a sentence or two


class ConstitutionError(DataError):
  """A constitution file that cannot be used; the message names the file, field and line."""


@dataclasses.dataclass(frozen=True)
class Principle:
  """One principle. Texts are plain strings the prompts embed as they are (`alignax.cai.prompts`)."""

  id: str
  critique_request: str
  revision_request: str
  comparison: str
  rubric: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Constitution:
  """An ordered list of principles with unique ids; `path` is where it was read from."""

  name: str
  principles: tuple[Principle, ...]
  path: str = ""

  def __post_init__(self):
    if not self.principles:
      raise ConstitutionError(f"{self.path or self.name}: a constitution needs at least one principle")
    ids = [p.id for p in self.principles]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
      raise ConstitutionError(f"{self.path or self.name}: principle ids must be unique; repeated: "
                              f"{', '.join(dup)}")

  @property
  def ids(self) -> tuple[str, ...]:
    return tuple(p.id for p in self.principles)

  def get(self, principle_id: str) -> Principle:
    for p in self.principles:
      if p.id == principle_id:
        return p
    raise KeyError(f"constitution {self.name!r} has no principle {principle_id!r}; it has "
                   f"{', '.join(self.ids)}")

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "principles": [
        {k: (list(v) if isinstance(v, tuple) else v)
         for k, v in dataclasses.asdict(p).items() if not (k == "rubric" and not v)}
        for p in self.principles]}

  def fingerprint(self) -> str:
    """A hash of the principles' texts: labels made with one constitution never resume as another's."""
    import hashlib
    return hashlib.sha256(json.dumps(self.to_dict()["principles"], sort_keys=True).encode()).hexdigest()[:16]


def resolve_path(spec: str) -> str:
  """A built-in name ("world") or a path; raises ConstitutionError when neither exists."""
  if os.path.exists(spec):
    return spec
  for ext in (".yaml", ".json"):
    builtin = os.path.join(BUILTIN_DIR, spec + ext)
    if os.sep not in spec and os.path.exists(builtin):
      return builtin
  names = sorted(os.path.splitext(f)[0] for f in os.listdir(BUILTIN_DIR))
  raise ConstitutionError(f"--constitution={spec}: no such file, and not a built-in constitution "
                          f"({', '.join(names)})")


def _lines_of(text: str) -> dict[tuple, int]:
  """{path of a node (keys and list indices): 1-based line} of a YAML or JSON document, so
  errors can name the line; empty when the text does not compose."""
  out: dict[tuple, int] = {}

  def walk(node, path):
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
      for k, v in node.value:
        out[path + (k.value,)] = k.start_mark.line + 1
        walk(v, path + (k.value,))
    elif isinstance(node, yaml.SequenceNode):
      for i, v in enumerate(node.value):
        walk(v, path + (i,))

  try:
    root = yaml.compose(text, Loader=yaml.SafeLoader)
  except yaml.YAMLError:
    return out
  if root is not None:
    walk(root, ())
  return out


def _parse(path: str, text: str) -> Any:
  if path.endswith(".json"):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise ConstitutionError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f":{mark.line + 1}" if mark is not None else ""
    raise ConstitutionError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None


def from_data(data: Any, path: str = "<constitution>", text: str = "") -> Constitution:
  """A Constitution from parsed JSON/YAML data; `text` (the file's text) lets errors name lines."""
  lines = _lines_of(text) if text else {}

  def fail(field_path: tuple, message: str):
    line = next((lines[field_path[:n]] for n in range(len(field_path), -1, -1)
                 if field_path[:n] in lines), None)
    where = f"{path}:{line}" if line else path
    name = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p)
                   for i, p in enumerate(field_path))
    raise ConstitutionError(f"{where}: {name + ': ' if name else ''}{message}")

  if not isinstance(data, dict):
    fail((), f"a constitution is a mapping with a 'principles' list, got {type(data).__name__}")
  unknown = sorted(set(data) - {"name", "principles"})
  if unknown:
    fail((unknown[0],), "unknown key; a constitution has 'name' and 'principles'")
  name = data.get("name", os.path.splitext(os.path.basename(path))[0])
  if not isinstance(name, str) or not name.strip():
    fail(("name",), "must be a non-empty string")
  items = data.get("principles")
  if not isinstance(items, list) or not items:
    fail(("principles",), "must be a non-empty list of principles")
  principles, seen = [], {}
  for i, item in enumerate(items):
    where = ("principles", i)
    if not isinstance(item, dict):
      fail(where, f"a principle is a mapping with {', '.join(REQUIRED)}, got {type(item).__name__}")
    extra = sorted(set(item) - set(REQUIRED) - set(OPTIONAL))
    if extra:
      fail(where + (extra[0],), f"unknown key; a principle has {', '.join(REQUIRED + OPTIONAL)}")
    for key in REQUIRED:
      if key not in item:
        fail(where, f"missing {key!r} (a principle needs {', '.join(REQUIRED)})")
      value = item[key]
      if not isinstance(value, str) or not value.strip():
        fail(where + (key,), f"must be a non-empty string, got {value!r}")
      if len(value) > MAX_TEXT_CHARS:
        fail(where + (key,), f"is {len(value)} characters; at most {MAX_TEXT_CHARS}")
    if not _ID.match(item["id"]):
      fail(where + ("id",), f"{item['id']!r} must match [a-z0-9][a-z0-9_-]*")
    if item["id"] in seen:
      fail(where + ("id",), f"{item['id']!r} repeats principles[{seen[item['id']]}]")
    seen[item["id"]] = i
    rubric = item.get("rubric", [])
    if isinstance(rubric, str):
      rubric = [rubric]
    if not isinstance(rubric, list) or not all(isinstance(r, str) and r for r in rubric):
      fail(where + ("rubric",), f"must be a list of component names, got {rubric!r}")
    principles.append(Principle(id=item["id"], critique_request=item["critique_request"].strip(),
                                revision_request=item["revision_request"].strip(),
                                comparison=item["comparison"].strip(), rubric=tuple(rubric)))
  return Constitution(name=name.strip(), principles=tuple(principles), path=path)


def load(spec: str) -> Constitution:
  """Reads a constitution: a built-in name ("world") or a .json / .yaml / .yml path."""
  path = resolve_path(spec)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConstitutionError(f"{path}: cannot read: {e}") from None
  return from_data(_parse(path, text), path, text)


def sample_principles(constitution: Constitution, n: int, rng) -> list[Principle]:
  """`n` distinct principles drawn uniformly (all of them, in order, when n <= 0 or n >= size).

  rng: a numpy Generator (callers derive it from the record's index, so a resumed run draws the
  same principles for the same record)."""
  k = len(constitution.principles)
  if n <= 0 or n >= k:
    return list(constitution.principles)
  idx = sorted(rng.choice(k, size=n, replace=False).tolist())
  return [constitution.principles[i] for i in idx]


def check_rubric(constitution: Constitution, components: Sequence[str]) -> None:
  """Raises ConstitutionError when a principle names a rubric component not in `components`
  (the world checks its constitution this way before generating demonstrations)."""
  for i, p in enumerate(constitution.principles):
    bad = [r for r in p.rubric if r not in components]
    if bad:
      raise ConstitutionError(f"{constitution.path or constitution.name}: principles[{i}] "
                              f"({p.id}).rubric: unknown component {bad[0]!r}; the world's "
                              f"components are {', '.join(components)}")
