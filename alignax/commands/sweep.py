"""Grid sweeps: one run per point of a grid of config overrides, then a summary over seeds.

  alignax sweep --config=configs/dpo.py:tiny --out=runs/beta_sweep \
      --grid=dpo.beta=0.03,0.1,0.3 --grid=seed=0,1,2 --config.train.steps=100

Every point runs in OUT/<key=value,...> (a finished run, one with an export, is not rerun, so the
command resumes). The summary takes each run's last logged value of every `eval/*` metric and
averages it over the `seed` axis (mean, sample std, n, and the 95% confidence interval of the
mean by Student's t over seeds); it is printed as a table and written to OUT/summary.json and
OUT/summary.csv, with every run's own figures in OUT/runs.json.

With `--vectorize` the points become *members* of compiled programs (`alignax.train.members`):
points that differ only in keys the stage's record lists as vectorizable (seed, learning rate
and the optimizer's numbers, the algorithm's continuous hyperparameters) train as one program,
with the run on a leading array axis; points that differ in any other key (shapes, loss type,
schedule, steps) are grouped, one program per group. Each group keeps its stacked checkpoint in
OUT/_groups/<group>/; each member still writes its own OUT/<point>/ run directory.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import traceback

from alignax.config import ConfigDict, ConfigError, config_key_exists, get_key, suggest_keys
from alignax.stats import t_interval

SEED_KEY = "seed"
GROUPS_DIR = "_groups"
# Keys a vectorized sweep can neither put on the member axis nor group by.
UNSWEEPABLE = ("workdir", "stage", "parallel.distributed")


def _cast(key: str, text: str, current):
  """`text` as the type of the config's current value of `key` (bool before int: bool is an int)."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
      raise ConfigError(f"--grid {key}: {text!r} is not a bool")
    return lowered in ("true", "1")
  for kind in (int, float):
    if isinstance(current, kind):
      try:
        return kind(text)
      except ValueError:
        raise ConfigError(f"--grid {key}: {text!r} is not a{'n' if kind is int else ''} "
                          f"{kind.__name__}") from None
  return text


def parse_grid(cfg: ConfigDict, specs: list[str]) -> dict[str, list]:
  """`["dpo.beta=0.1,0.3", "seed=0,1"]` -> {"dpo.beta": [0.1, 0.3], "seed": [0, 1]}, typed by the
  config's current values; unknown keys, repeated keys and empty value lists are errors."""
  grid: dict[str, list] = {}
  for spec in specs:
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not values.strip():
      raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,...")
    if not config_key_exists(cfg, key):
      close = suggest_keys(cfg, key)
      hint = f" (did you mean: {', '.join(close)}?)" if close else ""
      raise ConfigError(f"--grid: unknown config key {key!r}{hint}")
    if isinstance(get_key(cfg, key), ConfigDict):
      raise ConfigError(f"--grid: {key!r} is a section, not a value")
    if key in grid:
      raise ConfigError(f"--grid: {key!r} is given twice")
    grid[key] = [_cast(key, v.strip(), get_key(cfg, key)) for v in values.split(",")]
  return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
  """The cartesian product, in the order the keys and values were given (last key fastest)."""
  keys = list(grid)
  return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(point: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in point.items()) or "default"


def point_config(cfg: ConfigDict, point: dict, out: str) -> ConfigDict:
  """The base config with the point's values set and its own workdir under `out`."""
  run_cfg = copy.deepcopy(cfg)
  with run_cfg.unlocked():
    for key, value in point.items():
      *parents, leaf = key.split(".")
      node = run_cfg
      for p in parents:
        node = node[p]
      node[leaf] = value
    run_cfg.workdir = os.path.join(out, run_name(point))
  return run_cfg


def final_eval(rows: list[dict]) -> dict[str, float]:
  """Last logged value of every `eval/*` metric in a run's metrics rows."""
  last: dict[str, float] = {}
  for row in rows:
    for name, value in row.items():
      if name.startswith("eval/") and isinstance(value, (int, float)) and math.isfinite(value):
        last[name] = float(value)
  return last


def summarize(runs: list[dict]) -> list[dict]:
  """Groups finished runs by their point without the seed; per metric: mean, std (n-1), n, and
  ci95 (the half-width of the mean's 95% Student-t interval over seeds).

  runs: [{"point": {...}, "metrics": {name: value}}]. Groups keep the grid's order.
  """
  groups: dict[tuple, list[dict]] = {}
  for run in runs:
    setting = tuple((k, v) for k, v in run["point"].items() if k != SEED_KEY)
    groups.setdefault(setting, []).append(run["metrics"])
  summary = []
  for setting, metric_rows in groups.items():
    row = {"setting": dict(setting), "n": len(metric_rows), "metrics": {}}
    for name in sorted({n for m in metric_rows for n in m}):
      values = [m[name] for m in metric_rows if name in m]
      mean = sum(values) / len(values)
      std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
             if len(values) > 1 else 0.0)
      row["metrics"][name] = {"mean": mean, "std": std, "n": len(values), "ci95": t_interval(values)}
    summary.append(row)
  return summary


def format_table(summary: list[dict], metrics: list[str] | None = None) -> str:
  """A Markdown table: one row per setting, `mean ± ci95` per metric (the 95% interval of the
  mean over seeds)."""
  if not summary:
    return "(no finished runs)"
  names = metrics or sorted({n for row in summary for n in row["metrics"]})
  keys = list(summary[0]["setting"])
  header = keys + ["n"] + [n.removeprefix("eval/") for n in names]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in summary:
    cells = [str(row["setting"][k]) for k in keys] + [str(row["n"])]
    for name in names:
      m = row["metrics"].get(name)
      cells.append("" if m is None else
                   f"{m['mean']:.3f}" + (f" ± {m['ci95']:.3f}" if m["n"] > 1 else ""))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_summary(out: str, runs: list[dict], summary: list[dict]) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "runs.json"), "w", encoding="utf-8") as f:
    json.dump(runs, f, indent=2)
  with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  names = sorted({n for row in summary for n in row["metrics"]})
  with open(os.path.join(out, "summary.csv"), "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    keys = list(summary[0]["setting"]) if summary else []
    writer.writerow(keys + ["n"] + [f"{n}/{s}" for n in names for s in ("mean", "std", "ci95")])
    for row in summary:
      cells = [row["setting"][k] for k in keys] + [row["n"]]
      for n in names:
        m = row["metrics"].get(n)
        cells += ["", "", ""] if m is None else [m["mean"], m["std"], m["ci95"]]
      writer.writerow(cells)


def plan_groups(cfg: ConfigDict, grid: dict[str, list]) -> tuple[dict[str, list[dict]], list, list]:
  """How a vectorized sweep splits the grid: ({group name: [points]}, vectorized keys, grouped keys).

  A group's points differ only in the stage record's vectorizable keys; the group name is its
  grouped keys' values ("all" when every key is vectorized).
  """
  from alignax.algorithms import registry
  if cfg.stage not in registry.names():
    raise ConfigError(f"--vectorize trains the members of one stage; config.stage={cfg.stage!r} is "
                      f"not one (stages: {', '.join(registry.names())}); sweep a stage's own config")
  for key in grid:
    for bad in UNSWEEPABLE:
      if key == bad or key.startswith(bad + "."):
        raise ConfigError(f"--grid {key}: cannot be swept with --vectorize (each member gets its own "
                          f"OUT/<point> run directory; {bad} is fixed for the whole sweep)")
  allowed = set(registry.get(cfg.stage).vectorized_keys())
  vectorized = [k for k in grid if k in allowed]
  grouped = [k for k in grid if k not in allowed]
  groups: dict[str, list[dict]] = {}
  for point in grid_points(grid):
    name = run_name({k: point[k] for k in grouped}) if grouped else "all"
    groups.setdefault(name, []).append(point)
  return groups, vectorized, grouped


def describe_plan(groups: dict[str, list[dict]], vectorized: list, grouped: list) -> str:
  n = sum(len(g) for g in groups.values())
  lines = [f"vectorize: {n} points as {len(groups)} program(s) of "
           f"{'/'.join(str(len(g)) for g in groups.values())} members"]
  lines.append(f"  members differ in: {', '.join(vectorized) or '(nothing)'}")
  if grouped:
    lines.append(f"  one program per value of: {', '.join(grouped)} (they change shapes or the "
                 f"compiled step)")
  return "\n".join(lines)


def _collect(points: list[dict], out: str, cfg: ConfigDict) -> list[dict]:
  from alignax import checkpoint as ckpt_lib
  from alignax.metrics import read_metrics
  runs = []
  for point in points:
    workdir = point_config(cfg, point, out).workdir
    if ckpt_lib.has_export(workdir):
      runs.append({"name": run_name(point), "point": point, "metrics": final_eval(read_metrics(workdir))})
  return runs


def run_vectorized_sweep(cfg: ConfigDict, specs: list[str], out: str, *, continue_on_error: bool = True):
  """The sweep as one compiled program per group (see the module doc); same outputs as
  `run_sweep`. Returns (runs, summary, failed)."""
  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms import run_members
  grid = parse_grid(cfg, specs)
  groups, vectorized, grouped = plan_groups(cfg, grid)
  print(describe_plan(groups, vectorized, grouped), flush=True)
  failed = []
  for i, (group, points) in enumerate(groups.items()):
    todo = [p for p in points if not ckpt_lib.has_export(point_config(cfg, p, out).workdir)]
    label = f"[{i + 1}/{len(groups)}] {group}"
    if not todo:
      print(f"{label}: finished, skipped", flush=True)
      continue
    print(f"{label}: {len(todo)} members -> {os.path.join(out, GROUPS_DIR, group)}", flush=True)
    try:
      results = run_members([(run_name(p), point_config(cfg, p, out)) for p in todo],
                            os.path.join(out, GROUPS_DIR, group))
      if not all(r.finished for r in results):
        failed.append((group, "stopped before finishing (rerun to resume)"))
        break
    except Exception as e:  # one bad group should not lose the others' results
      if not continue_on_error:
        raise
      traceback.print_exc()
      failed.extend((run_name(p), f"{type(e).__name__}: {e}".splitlines()[0]) for p in todo)
  runs = _collect([p for g in groups.values() for p in g], out, cfg)
  summary = summarize(runs)
  write_summary(out, runs, summary)
  return runs, summary, failed


def run_sweep(cfg: ConfigDict, specs: list[str], out: str, *, continue_on_error: bool = True):
  """Runs every grid point (skipping finished ones) and writes the summary.

  Returns (runs, summary, failed): `failed` lists (run name, error line) of points that raised;
  with `continue_on_error=False` the first failure propagates instead.
  """
  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms import run_stage
  from alignax.metrics import read_metrics

  points = grid_points(parse_grid(cfg, specs))
  runs, failed = [], []
  for i, point in enumerate(points):
    run_cfg = point_config(cfg, point, out)
    name = run_name(point)
    if ckpt_lib.has_export(run_cfg.workdir):
      print(f"[{i + 1}/{len(points)}] {name}: finished, skipped", flush=True)
    else:
      print(f"[{i + 1}/{len(points)}] {name} -> {run_cfg.workdir}", flush=True)
      try:
        if not run_stage(run_cfg).finished:
          failed.append((name, "stopped before finishing (rerun to resume)"))
          break  # a stop signal: stop the sweep too
      except Exception as e:  # one bad point should not lose the others' results
        if not continue_on_error:
          raise
        traceback.print_exc()
        failed.append((name, f"{type(e).__name__}: {e}".splitlines()[0]))
        continue
    runs.append({"name": name, "point": point,
                 "metrics": final_eval(read_metrics(run_cfg.workdir))})
  summary = summarize(runs)
  write_summary(out, runs, summary)
  return runs, summary, failed
