"""Two processes on localhost (4 simulated CPU devices each, gloo collectives) train like one
process with 8: the shared train step on a data x fsdp x tensor mesh that spans both processes,
and the real `alignax train` CLI in pmap mode (metrics written by process 0 only, checkpoints
written by both that resume exactly)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from cli_helpers import REPO, SMALL_PRETRAIN, cli_command, cli_env
from multihost_worker import train_losses

pytestmark = pytest.mark.slow
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(cmd, log_path, devices):
  log = open(log_path, "w", encoding="utf-8")
  return subprocess.Popen(cmd, cwd=REPO, env=cli_env(devices), stdout=log, stderr=subprocess.STDOUT), log


def _wait_all(procs):
  """Waits for (Popen, log file) pairs; on a failure or timeout stops the others and raises
  with the tails of the logs."""
  failed = []
  try:
    for proc, log in procs:
      try:
        if proc.wait(timeout=TIMEOUT):
          failed.append(log.name)
      except subprocess.TimeoutExpired:
        failed.append(log.name + " (timed out)")
        break
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  if failed:
    tails = []
    for name in failed:
      path = name.split(" ")[0]
      with open(path, encoding="utf-8", errors="replace") as f:
        tails.append(f"--- {name}\n" + "".join(l for l in f.readlines()[-40:] if "Gloo" not in l))
    raise AssertionError("multi-process run failed:\n" + "\n".join(tails))


def _rel(a, b):
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def test_two_processes_train_to_the_one_device_losses(tmp_path):
  out = tmp_path / "losses.json"
  port = _free_port()
  layouts = "data=2 x fsdp=2 x tensor=2"  # data splits the processes; fsdp, tensor within each
  procs = [_start([sys.executable, WORKER, "steps", f"--port={port}", f"--process_id={i}",
                   "--num_processes=2", f"--out={out}", f"--layouts={layouts}"],
                  tmp_path / f"worker{i}.log", devices=4) for i in range(2)]
  reference, _, _ = train_losses("jit", dict(data=1, fsdp=1, tensor=1))  # while they run
  _wait_all(procs)
  results = json.loads(out.read_text())
  assert sorted(results) == sorted(layouts.split(","))
  for name, losses in results.items():
    print(f"\n2 processes, {name:<28} " + " ".join(f"{x:.7f}" for x in losses))
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(losses, reference)), (name, losses, reference)


def test_two_processes_run_rl_iterations_like_one_device(tmp_path):
  """PPO and RLOO iterations (rollout, reward model, update) on jit data=8 and pmap over 8
  devices split over two processes reach the 1-device numbers."""
  from multihost_worker import rl_losses
  out = tmp_path / "rl.json"
  port = _free_port()
  procs = [_start([sys.executable, WORKER, "rl", f"--port={port}", f"--process_id={i}", "--num_processes=2",
                   f"--out={out}", "--kinds=ppo,rloo"], tmp_path / f"rl{i}.log", devices=4) for i in range(2)]
  reference = {k: rl_losses(k, "jit", dict(data=1, fsdp=1, tensor=1)) for k in ("ppo", "rloo")}
  _wait_all(procs)
  results = json.loads(out.read_text())
  for kind, layouts in results.items():
    for name, rows in layouts.items():
      for got, want in zip(rows, reference[kind]):
        assert all(abs(a - b) <= 2e-4 * abs(b) + 2e-5 for a, b in zip(got, want)), (kind, name, rows, reference[kind])


def test_two_processes_train_sweep_members_like_separate_runs(tmp_path):
  """Four members (own keys, learning-rate scales and batches) on a members=2 x data=4 mesh over
  two processes: each member's losses equal its own run on one device."""
  from multihost_worker import member_reference
  out = tmp_path / "members.json"
  port = _free_port()
  procs = [_start([sys.executable, WORKER, "members", f"--port={port}", f"--process_id={i}",
                   "--num_processes=2", f"--out={out}"], tmp_path / f"members{i}.log", devices=4)
           for i in range(2)]
  reference = member_reference()
  _wait_all(procs)
  results = json.loads(out.read_text())
  assert len(results) == 4 and len({tuple(r) for r in reference}) == 4
  for got, want in zip(results, reference):
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(got, want)), (got, want)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _by_step(rows):
  """{(step, "train" | "eval"): row}; asserts no (step, kind) was written twice."""
  out = {}
  for row in rows:
    kind = "eval" if any(k.startswith("eval/") for k in row) else "train"
    assert (row["step"], kind) not in out, f"step {row['step']} ({kind}) written twice"
    out[(row["step"], kind)] = row
  return out


def _assert_same_metrics(rows, reference, steps=None):
  got, want = _by_step(rows), _by_step(reference)
  keys = sorted(k for k in want if steps is None or k[0] in steps)
  assert sorted(k for k in got if steps is None or k[0] in steps) == keys
  for key in keys:
    for name in ("train/loss", "train/grad_norm", "train/count", "eval/loss", "eval/tokens"):
      if name in want[key]:
        assert _rel(got[key][name], want[key][name]) <= 1e-5, (key, name, got[key], want[key])


def test_two_process_pmap_cli_run_matches_one_process_and_resumes(tmp_path):
  workdir, refdir = str(tmp_path / "run"), str(tmp_path / "reference")
  args = [*SMALL_PRETRAIN, "--config.parallel.mode=pmap", "--config.train.batch_size=8", "--config.train.steps=6",
          "--config.train.log_every=1", "--config.eval.every=3", "--config.eval.batches=2",
          "--config.optimizer.warmup_steps=2", "--config.checkpoint.every=3", "--config.checkpoint.keep=3"]

  def two_processes():
    port = _free_port()
    return [_start(cli_command(*args, f"--config.workdir={workdir}",
                               f"--config.parallel.distributed.coordinator=localhost:{port}",
                               "--config.parallel.distributed.num_processes=2",
                               f"--config.parallel.distributed.process_id={i}"),
                   tmp_path / f"cli{i}.log", devices=4) for i in range(2)]

  # The reference: one process, 8 devices, reading the 2 processes' data shards side by side.
  reference = _start([sys.executable, WORKER, "reference", "--shards=2", "--",
                      *args[1:], f"--config.workdir={refdir}"], tmp_path / "reference.log", devices=8)
  _wait_all(two_processes() + [reference])
  rows = _rows(workdir)
  _assert_same_metrics(rows, _rows(refdir))
  print("\n2-process CLI vs 1 process, train/loss:",
        [(r["step"], round(r["train/loss"], 7)) for r in rows if "train/loss" in r])

  # Only process 0 wrote logs, metrics (no step twice, above), TensorBoard and the config.
  files = os.listdir(workdir)
  assert len([f for f in files if f.startswith("events.out.tfevents")]) == 1
  assert len([f for f in files if ".log.INFO." in f]) == 1
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert {f for f in os.listdir(os.path.join(workdir, "checkpoints", "3", "state"))
          if f.startswith("ocdbt.process_")} == {"ocdbt.process_0", "ocdbt.process_1"}

  # Lose the last checkpoint: both processes restore step 3 (state written by both, each its
  # own data iterator position) and redo steps 4-6 exactly.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  _wait_all(two_processes())
  resumed = _rows(workdir)
  _assert_same_metrics(resumed, rows)
  assert [r["step"] for r in resumed if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
