"""A sweep as one compiled program vs one run at a time: wall time, per-member speed, memory.

  python benchmarks/sweep.py                       # DPO 3 betas x 3 seeds, SFT 3 lrs x 3 seeds
  python benchmarks/sweep.py --tasks=dpo --steps=150 --modes=vectorized,processes

From the tiny pipeline's SFT export (`--base`; its pretrain and SFT stages are run first when
missing), each task's grid is trained, in one run of this script, every way `--modes` names:

  processes   one `alignax train` process per grid point (start-up, data set-up and
              compilation paid per point)
  sweep       `alignax sweep`: the points one after another in one process
  vectorized  `alignax sweep --vectorize`: the points as members of one vmapped program
  vectorized_map  the same with `parallel.members_step=map` (members one after another inside
              the one program: no batching, shared start-up and compilation)

Each mode is a fresh subprocess timed from outside (wall seconds include start-up, data set-up,
compilation, training, evaluation and exports; JAX's persistent compilation cache is off, as by
default); member steps/s is grid points x steps / wall seconds; peak memory is the largest resident set of its
processes (`wait4`). Prints a table and writes JSON (default
benchmarks/results/sweep_<platform>.json). Timings on shared machines are noisy: compare modes
within one run, as ratios.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BASE = flags.DEFINE_string("base", "runs/pipeline_tiny", "Pipeline directory with the pretrain/ and sft/ exports.")
_TASKS = flags.DEFINE_list("tasks", ["dpo", "sft"], "Sweeps to time: dpo (beta x seed), sft (lr x seed).")
_MODES = flags.DEFINE_list("modes", ["vectorized", "sweep", "processes"], "How to run each grid.")
_STEPS = flags.DEFINE_integer("steps", 150, "Train steps per point.")
_BETAS = flags.DEFINE_string("betas", "0.03,0.1,0.3", "DPO betas.")
_LRS = flags.DEFINE_string("lrs", "0.0003,0.001,0.003", "SFT learning rates.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Seeds.")
_EVAL_PROMPTS = flags.DEFINE_integer("eval_prompts", 0, "World eval prompts per evaluation (at the start and "
                                     "the end of each run; 0: held-out loss only). Evaluation runs per "
                                     "member in every mode.")
_WORK = flags.DEFINE_string("work", "/tmp/alignax_sweep_bench", "Scratch directory (wiped per mode).")
_KEEP_CACHE = flags.DEFINE_bool("keep_compile_cache", False, "Keep $JAX_COMPILATION_CACHE_DIR for the timed runs.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/sweep_<platform>.json).")


def _grid(task: str) -> list[tuple[str, list[str]]]:
  key, values = ("dpo.beta", _BETAS.value) if task == "dpo" else ("optimizer.lr", _LRS.value)
  return [(key, values.split(",")), ("seed", _SEEDS.value.split(","))]


def _common(task: str) -> list[str]:
  init = os.path.join(_BASE.value, "pretrain" if task == "sft" else "sft")
  return [f"--config=configs/{task}.py:tiny", f"--config.init.workdir={init}",
          f"--config.train.steps={_STEPS.value}", "--config.eval.every=0",
          f"--config.eval.num_prompts={_EVAL_PROMPTS.value}", "--config.train.progress=False",
          "--config.data.loader=memory"]


def _run(cmds: list[list[str]]) -> tuple[float, int]:
  """Runs the commands one after another; (wall seconds, peak RSS bytes of any of them)."""
  env = dict(os.environ)
  # JAX's default: no persistent compilation cache (with one, the sequential modes would compile
  # each program once and reuse it across points; `--keep_compile_cache` keeps the caller's).
  if not _KEEP_CACHE.value:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  peak, t0 = 0, time.perf_counter()
  for cmd in cmds:
    proc = subprocess.Popen([sys.executable, "-m", "alignax.cli", *cmd], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
      raise SystemExit(f"alignax {' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    peak = max(peak, usage.ru_maxrss * 1024)  # Linux reports KiB
  return time.perf_counter() - t0, peak


def bench(task: str, mode: str) -> dict:
  grid = _grid(task)
  points = [(a, b) for a in grid[0][1] for b in grid[1][1]]
  work = os.path.join(_WORK.value, f"{task}_{mode}")
  shutil.rmtree(work, ignore_errors=True)
  common = _common(task)
  specs = [f"--grid={k}={','.join(v)}" for k, v in grid]
  if mode == "processes":
    cmds = [["train", *common, f"--config.workdir={work}/{grid[0][0]}={a},seed={b}",
             f"--config.{grid[0][0]}={a}", f"--config.seed={b}"] for a, b in points]
  elif mode == "sweep":
    cmds = [["sweep", *common, f"--out={work}", *specs]]
  elif mode == "vectorized":
    cmds = [["sweep", *common, f"--out={work}", *specs, "--vectorize"]]
  elif mode == "vectorized_map":
    cmds = [["sweep", *common, f"--out={work}", *specs, "--vectorize", "--config.parallel.members_step=map"]]
  else:
    raise SystemExit(f"--modes: unknown {mode!r}")
  print(f"{task} / {mode}: {len(points)} points x {_STEPS.value} steps ...", flush=True)
  wall, peak = _run(cmds)
  return {"task": task, "mode": mode, "points": len(points), "steps": _STEPS.value, "wall_s": round(wall, 1),
          "member_steps_per_s": round(_STEPS.value * len(points) / wall, 2),
          "peak_rss_mib": round(peak / 2**20)}


def ensure_base() -> None:
  from alignax import checkpoint as ckpt_lib
  from alignax.algorithms import run_stage
  from alignax.config import load_config_file
  from alignax.algorithms.pipeline_config import stage_config
  cfg = load_config_file(os.path.join(REPO, "configs", "pipeline.py"), "tiny")
  cfg.workdir = _BASE.value
  for name in ("pretrain", "sft"):
    scfg = stage_config(cfg, name)
    if not ckpt_lib.has_export(scfg.workdir):
      print(f"base: running {name} into {scfg.workdir}", flush=True)
      if not run_stage(scfg).finished:
        raise SystemExit(f"{name} stopped before finishing; rerun to resume")


def main(_):
  ensure_base()
  import jax
  results = [bench(t, m) for t in _TASKS.value for m in _MODES.value]
  print()
  print("| task | mode | points x steps | wall s | speed-up | member steps/s | peak RSS MiB |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    slowest = max(x["wall_s"] for x in results if x["task"] == r["task"])
    r["speedup_vs_slowest"] = round(slowest / r["wall_s"], 2)
    print(f"| {r['task']} | {r['mode']} | {r['points']} x {r['steps']} | {r['wall_s']} | "
          f"{r['speedup_vs_slowest']}x | {r['member_steps_per_s']} | {r['peak_rss_mib']} |")
  meta = {"platform": jax.devices()[0].platform, "cpus": os.cpu_count(), "machine": platform.machine(),
          "eval_prompts": _EVAL_PROMPTS.value, "base": _BASE.value}
  out = _OUT.value or os.path.join(REPO, "benchmarks", "results", f"sweep_{meta['platform']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump({"results": results, "meta": meta}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
