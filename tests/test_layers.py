"""The package's layers: imports only point down, and no module imports itself in a cycle.

Read from the source (every `import`, lazy ones inside functions included), so a new cycle or
upward import fails here whatever the import order at run time.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alignax")

# Bottom to top; a module belongs to the layer of the longest prefix that names it. A module may
# import its own layer and those below, never one above.
LAYERS = [
    # errors, typed-section helpers, statistics, metric files, sharding primitives
    ("alignax", "alignax.errors", "alignax.sections", "alignax.stats", "alignax.metrics",
     "alignax.sharding"),
    # pure pieces: the model, the losses, the world generator, the sections below the runner
    ("alignax.models", "alignax.losses", "alignax.flops", "alignax.tasks", "alignax.data.config",
     "alignax.train.config", "alignax.cai.constitution", "alignax.cai.prompts",
     "alignax.cai.resumable"),
    # records to batches; sampling
    ("alignax.data", "alignax.generation"),
    # placement, checkpoints, the pure train step and the loop around it
    ("alignax.checkpoint", "alignax.checkpoint_params", "alignax.parallel", "alignax.train"),
    # the config, resolved once into typed sections
    ("alignax.config",),
    # running a stage; evaluating and loading a run's model
    ("alignax.train.runner", "alignax.train.members", "alignax.tasks.evaluation",
     "alignax.run_models", "alignax.cai"),
    # the stages
    ("alignax.algorithms",),
    # the commands and the studio
    ("alignax.commands", "alignax.studio", "alignax.cai.pipeline"),
    # the command line
    ("alignax.cli",),
]


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
  """The alignax modules `name` imports (`from pkg import mod` counts as importing pkg.mod)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
  return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
  best, layer = -1, None
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, layer = len(p), i
  return layer


def test_every_module_has_a_layer():
  assert not [m for m in MODULES if layer_of(m) is None]


def test_imports_only_point_down():
  upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, deps in GRAPH.items() for b in deps if layer_of(b) > layer_of(a))
  assert not upward, "upward imports:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_there_are_no_import_cycles():
  assert not _cycles(GRAPH)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_check_finds_cycles(graph, expected):
  assert _cycles(graph) == expected


def test_the_layer_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
  """An import inside a function counts: `checkpoint` importing `algorithms` lazily is upward."""
  src = tmp_path / "mod.py"
  src.write_text("def f():\n  from alignax.algorithms import registry\n  from . import config\n")
  found = _imports("alignax.checkpoint", str(src))
  assert found == {"alignax.algorithms.registry", "alignax.config"}
  assert layer_of("alignax.algorithms.registry") > layer_of("alignax.checkpoint")
