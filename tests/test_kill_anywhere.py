"""SIGKILL at random moments (start-up, before the first checkpoint, mid-save, mid-export, after
finishing), then rerun: the run ends with the export and metrics.jsonl of an uninterrupted run,
every row written exactly once. For pretraining and for DPO."""

import json
import os
import random
import subprocess
import time

import jax
import numpy as np
import pytest

from alignax import checkpoint as ckpt_lib
from cli_helpers import SMALL_PRETRAIN, TIMING_FIELDS, metric_rows, run_cli, start_cli

KILLS = 10  # over two workdirs; the phases hit are asserted below


def _phase(workdir: str) -> str:
  if ckpt_lib.has_export(workdir):
    return "exported"
  ckpts = os.path.join(workdir, "checkpoints")
  done = [d for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  return "checkpointed" if done else "before the first checkpoint"


def _kill_repeatedly(args, workdir: str, kills: int, seconds: float, rng: random.Random) -> list[str]:
  """Starts the run `kills` times, SIGKILLing each at a uniform random moment of `seconds` (one
  uninterrupted run's wall time; the first kill within its first quarter, which start-up fills,
  so it lands before the first checkpoint), then reruns it to the end. Returns the phase each
  kill (or finish) left behind."""
  phases = []
  for i in range(kills):
    proc = start_cli(*args, f"--config.workdir={workdir}")
    try:
      proc.wait(timeout=rng.uniform(0.0, seconds / 4 if i == 0 else seconds))
      finished = True
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      finished = False
    phases.append(("finished, " if finished else "") + _phase(workdir))
  run_cli(*args, f"--config.workdir={workdir}")
  return phases


def _rows(workdir: str) -> list[tuple]:
  """metrics.jsonl as (step, kind, values without wall-clock fields), in file order."""
  out = []
  for r in metric_rows(workdir):
    kind = "eval" if any(k.startswith("eval/") for k in r) else "train"
    out.append((r["step"], kind, json.dumps({k: v for k, v in r.items() if k not in TIMING_FIELDS},
                                            sort_keys=True)))
  return out


def _assert_same_run(ref: str, killed: str) -> None:
  a, b = _rows(ref), _rows(killed)
  assert len({(s, k) for s, k, _ in b}) == len(b), "a step's row was written twice"
  assert [x[:2] for x in a] == [x[:2] for x in b]
  for x, y in zip(a, b):
    assert x == y, x[:2]
  pa, ma = ckpt_lib.load_export(ref)
  pb, mb = ckpt_lib.load_export(killed)
  assert ma["stage"] == mb["stage"] and ma["model"] == mb["model"]
  for u, v in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _check(args, tmp_path, seed: int) -> list[str]:
  """KILLS kills over two fresh workdirs, each rerun to the end and compared with one
  uninterrupted run."""
  ref = str(tmp_path / "uninterrupted")
  t0 = time.time()
  run_cli(*args, f"--config.workdir={ref}")
  seconds = time.time() - t0
  rng = random.Random(seed)
  phases = []
  for w in range(2):
    killed = str(tmp_path / f"killed{w}")
    phases += _kill_repeatedly(args, killed, KILLS // 2, seconds, rng)
    _assert_same_run(ref, killed)
    assert not os.path.exists(os.path.join(killed, ".lock"))
  print("kills left:", phases)
  assert "before the first checkpoint" in phases
  assert any(p != "before the first checkpoint" for p in phases)
  return phases


@pytest.mark.slow
def test_pretraining_killed_anywhere_ends_as_if_never_killed(tmp_path):
  args = SMALL_PRETRAIN + ["--config.train.steps=16", "--config.train.log_every=1",
                           "--config.eval.every=8", "--config.checkpoint.every=4"]
  _check(args, tmp_path, seed=0)


PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Answer {i} is right.", "rejected": f"No idea {i}."}
         for i in range(24)]


@pytest.mark.slow
def test_dpo_killed_anywhere_ends_as_if_never_killed(tmp_path):
  base = str(tmp_path / "base")
  run_cli(*SMALL_PRETRAIN, "--config.train.steps=2", f"--config.workdir={base}")
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
  args = ["train", "--config=configs/dpo.py:tiny", "--config.data.source=files",
          f"--config.data.train_files={data}", "--config.data.eval_records=4",
          "--config.data.loader=memory", f"--config.init.workdir={base}", "--config.train.steps=12",
          "--config.train.batch_size=4", "--config.data.seq_len=64", "--config.train.progress=False",
          "--config.eval.num_prompts=0", "--config.train.log_every=1", "--config.eval.every=4",
          "--config.checkpoint.every=3"]
  _check(args, tmp_path, seed=1)
