"""Running `alignax` as a user would, in a subprocess, with small fast settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A pretraining run small enough for tests: 2-layer d=64 model, world of 200 KB, memory loader.
SMALL_PRETRAIN = [
    "train",
    "--config=configs/pretrain.py:tiny", "--config.model.d_model=64", "--config.model.n_layers=2",
    "--config.model.d_ff=128", "--config.train.batch_size=4", "--config.data.seq_len=64",
    "--config.data.loader=memory", "--config.train.progress=False",
    "--config.world.pretrain_bytes=200000", "--config.optimizer.warmup_steps=5",
]


def cli_env(devices: int = 1) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.setdefault("ALIGNAX_DATA_DIR", os.path.join(REPO, ".pytest_cache", "tfds"))
  # Many test runs compile the same small programs: JAX's persistent cache shares them.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "jax"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  return env


def cli_command(*args: str) -> list[str]:
  return [sys.executable, "-m", "alignax.cli", *args]


def run_cli(*args: str, devices: int = 1, timeout: int = 600, check: bool = True):
  """Runs `alignax ARGS` to completion; returns the CompletedProcess (text stdout/stderr)."""
  proc = subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(devices), capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"alignax {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def start_cli(*args: str, devices: int = 1):
  """Starts `alignax ARGS` in the background; returns the Popen."""
  return subprocess.Popen(cli_command(*args), cwd=REPO, env=cli_env(devices),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def metric_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # a line being written right now
  return rows


def last_step(workdir: str) -> int:
  rows = metric_rows(workdir)
  return max((r["step"] for r in rows), default=0)


TIMING_FIELDS = ("time", "train/tokens_per_sec")


def comparable(rows: list[dict]) -> dict:
  """Rows keyed by (step, kind) without wall-clock fields, for exact comparison."""
  out = {}
  for r in rows:
    kind = "eval" if any(k.startswith("eval/") for k in r) else "train"
    out[(r["step"], kind)] = {k: v for k, v in r.items() if k not in TIMING_FIELDS}
  return out


def wait_for(predicate, timeout: float = 240.0, what: str = "") -> None:
  """Polls `predicate` until it is true; TimeoutError after `timeout` seconds."""
  t0 = time.time()
  while not predicate():
    if time.time() - t0 > timeout:
      raise TimeoutError(f"waiting for {what}")
    time.sleep(0.02)
