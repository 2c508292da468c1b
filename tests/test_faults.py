"""Never silently wrong: bad settings refused by name, non-finite updates caught, a failing run
stopped, one writer per workdir, metrics written exactly once, I/O faults explained in one line,
upstream configs validated before anything runs."""

import errno
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alignax import metrics as metrics_lib
from alignax import parallel
from alignax.config import ConfigError, base_config, load_config_file, resolve
from alignax.train import loop as loop_lib
from alignax.train import workdir_lock
from alignax.train.config import TrainConfig
from alignax.train.state import TrainState
from alignax.train.step import make_train_step
from cli_helpers import REPO, SMALL_PRETRAIN, run_cli
from checkpoint_helpers import ckpt_args


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("key,value,words", [
    ("optimizer.lr", float("inf"), "must be finite"),
    ("optimizer.lr", float("nan"), "must be finite"),
    ("optimizer.lr", 0.0, "must be positive"),
    ("optimizer.eps", 0.0, "must be positive"),
    ("optimizer.b1", 2.0, "[0, 1)"),
    ("optimizer.b2", 1.0, "[0, 1)"),
    ("optimizer.weight_decay", -1.0, ">= 0"),
    ("optimizer.clip_norm", float("inf"), "must be finite"),
    ("train.max_nonfinite", 1.5, "whole count"),
    ("train.max_nonfinite", 0.0, "fraction"),
    ("train.resume_changed", "maybe", "must be one of"),
])
def test_validation_refuses_bad_settings_by_name(key, value, words):
  cfg = base_config("pretrain")
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(ConfigError, match=rf"config\.{key}:") as e:
    resolve(cfg)
  assert words in str(e.value)


def test_validation_refuses_negative_eval_prompts():
  cfg = load_config_file(os.path.join(REPO, "configs/dpo.py"), "tiny")
  cfg.eval.num_prompts = -3
  with pytest.raises(ConfigError, match=r"config\.eval\.num_prompts: must be >= 0"):
    resolve(cfg)


def test_an_upstream_stage_is_validated_before_any_stage_runs(tmp_path):
  """A typo in the SFT config that DPO would auto-run fails before pretraining starts."""
  from alignax.algorithms import validate_chain
  bad = tmp_path / "bad_sft.py"
  bad.write_text(
      "import sys\nsys.path.insert(0, %r)\n" % os.path.join(REPO, "configs")
      + "from sft import get_config as _get\n"
      + "def get_config(preset=None):\n  c = _get(preset)\n  c.optimizer.b2 = 1.5\n  return c\n")
  cfg = load_config_file(os.path.join(REPO, "configs/dpo.py"), "tiny")
  cfg.workdir = str(tmp_path / "dpo")
  cfg.init.workdir = str(tmp_path / "sft")  # no export there: it would be run first
  cfg.init.config = f"{bad}:tiny"
  with pytest.raises(ConfigError, match=r"bad_sft.py:tiny \(run first into .*\): config\.optimizer\.b2"):
    validate_chain(cfg)
  assert not os.path.exists(tmp_path / "sft")  # nothing ran


# ----------------------------------------------------------------------------- the guard

def _quadratic_loss(params, batch, rng, extra, hparams):
  del rng, extra, hparams
  err = params["w"] * batch["scale"][:, None] - 1.0
  return jnp.sum(err ** 2), jnp.float32(err.size), {}


def _toy_state(optimizer):
  return TrainState.create({"w": jnp.ones((3,), jnp.float32)}, optimizer, jax.random.key(0))


def test_a_nonfinite_update_from_finite_gradients_is_skipped_and_counted():
  # An infinite step size turns finite gradients into an infinite update.
  optimizer = optax.sgd(jnp.inf)
  step = jax.jit(make_train_step(_quadratic_loss, optimizer))
  state = _toy_state(optimizer)
  new, metrics = step(state, {"scale": jnp.full((2,), 2.0)})
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(new.nonfinite) == 1 and float(metrics["applied"]) == 0.0
  np.testing.assert_array_equal(np.asarray(new.params["w"]), np.ones(3))


class _Batches:
  """A host iterator of toy batches; `poison` steps carry a NaN scale (a non-finite loss)."""

  def __init__(self, poison):
    self.poison, self.i = set(poison), 0

  def __next__(self):
    self.i += 1
    return {"scale": np.full((2,), np.nan if self.i in self.poison else 1.0, np.float32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def _toy_run(total, poison):
  optimizer = optax.sgd(0.1)
  return loop_lib.Run(name="toy", state=_toy_state(optimizer),
                      train_step=make_train_step(_quadratic_loss, optimizer),
                      batches=_Batches(poison), evaluate=None, tokens_per_batch=2, total_steps=total)


def _loop_cfg(**train):
  values = dict(log_every=1, progress=False, nonfinite="skip", max_nonfinite=0.1)
  values.update(train)
  return TrainConfig(**values)


def _toy_placement():
  mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  return parallel.Placement(parallel.make_mesh(mesh))


def test_a_skip_run_that_keeps_failing_stops_with_a_message(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  run = _toy_run(20, poison=range(2, 20))
  with pytest.raises(loop_lib.HaltError, match=r"3 of 4 steps .*train\.max_nonfinite=0\.1 allows \(2 of "
                                               r"train\.steps=20\)"):
    loop_lib.run_loop(run, _loop_cfg(), placement=_toy_placement(), writer=writer)


def test_a_few_nonfinite_steps_within_the_budget_are_skipped(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  state = loop_lib.run_loop(_toy_run(20, poison=[3, 9]), _loop_cfg(max_nonfinite=2),
                            placement=_toy_placement(), writer=writer)
  assert int(state.step) == 20 and int(state.nonfinite) == 2


# ----------------------------------------------------------------------------- metrics exactly once

def test_a_rerun_of_a_finished_run_writes_no_second_final_row(tmp_path):
  from alignax import checkpoint as ckpt_lib
  cfg = base_config("pretrain")
  cfg.checkpoint.update(dict(every=5, keep=2, async_save=False))
  cfg.workdir = str(tmp_path)
  rows = []
  for _ in range(2):
    writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
    run = _toy_run(10, poison=[])
    run.evaluate = lambda state: {"w0": float(state.params["w"][0])}
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(cfg))
    loop_lib.run_loop(run, _loop_cfg(), checkpoint_every=5, placement=_toy_placement(), writer=writer,
                      checkpointer=checkpointer)
    checkpointer.close()
    rows.append(metrics_lib.read_metrics(str(tmp_path)))
  assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]]
  assert sum(1 for r in rows[1] if "eval/w0" in r and r["step"] == 10) == 1


def test_train_and_eval_rows_do_not_share_metric_names():
  assert loop_lib._prefixed("train", {"rewards/accuracy": 1.0, "loss": 2.0, "eval/x": 3.0}) == {
      "train/rewards/accuracy": 1.0, "train/loss": 2.0, "eval/x": 3.0}
  assert loop_lib._prefixed("eval", {"rewards/accuracy": 1.0}) == {"eval/rewards/accuracy": 1.0}


def _tensorboard_scalars(logdir: str, tag: str) -> dict:
  """{step: [values]} as TensorBoard reads them: event files in order, and a SessionLog START at
  step s (tensorboardX's purge_step) discards the earlier events at steps >= s."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  values = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        values = {s: v for s, v in values.items() if s < event.step}
      for v in event.summary.value:
        if v.tag == tag:
          values.setdefault(event.step, []).append(v.simple_value)
  return values


def test_tensorboard_hides_the_events_after_the_restored_step(tmp_path):
  import time
  first = metrics_lib.MetricsWriter(str(tmp_path))
  first.truncate_after(-1)
  for step in range(1, 9):
    first.write(step, {"train/loss": float(step)})
  first.close()
  time.sleep(1.1)  # event file names carry the second they were opened in
  second = metrics_lib.MetricsWriter(str(tmp_path))
  second.truncate_after(4)  # resumed from the step-4 checkpoint
  for step in range(5, 9):
    second.write(step, {"train/loss": 10.0 + step})
  second.close()
  assert _tensorboard_scalars(str(tmp_path), "train/loss") == {
      1: [1.0], 2: [2.0], 3: [3.0], 4: [4.0], 5: [15.0], 6: [16.0], 7: [17.0], 8: [18.0]}
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6, 7, 8]


# ----------------------------------------------------------------------------- one writer per workdir

def test_a_second_run_on_a_held_workdir_refuses_naming_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    lock_path = tmp_path / workdir_lock.LOCK_FILE
    lock_path.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                     "started": workdir_lock._process_start(holder.pid),
                                     "time": "then", "command": "alignax train --config=x"}))
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"in use by process {holder.pid} on this host .*alignax train --config=x"):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock_path = tmp_path / workdir_lock.LOCK_FILE
  lock_path.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "1"}))
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
  assert f"process {dead.pid} is gone" in capsys.readouterr().err
  assert not lock_path.exists()


@pytest.mark.slow
def test_two_cli_runs_on_one_workdir_the_second_refuses(tmp_path):
  from cli_helpers import last_step, start_cli, wait_for
  workdir = str(tmp_path / "run")
  args = SMALL_PRETRAIN + ["--config.train.steps=2000", "--config.train.log_every=1",
                           "--config.eval.every=0", f"--config.workdir={workdir}"]
  first = start_cli(*args)
  try:
    wait_for(lambda: last_step(workdir) >= 1 or first.poll() is not None, what="the first run's step 1")
    second = run_cli(*args, check=False)
    assert second.returncode == 1
    assert f"is in use by process {first.pid} on this host" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.poll() is None  # the first run goes on
  finally:
    first.kill()
    first.wait()


# ----------------------------------------------------------------------------- faults explained

def test_an_io_fault_deep_in_a_library_is_one_line_naming_path_and_cause(capsys):
  from alignax import cli
  def save():
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/5/state")
    except OSError as e:
      raise RuntimeError("async save failed") from e
  with pytest.raises(SystemExit) as e:
    cli._guarded(save)()
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "/runs/x/checkpoints/5/state: the disk is full" in err


@pytest.mark.slow
def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  proc = run_cli(*SMALL_PRETRAIN, "--config.train.steps=2", f"--config.workdir={blocker}/run",
                 check=False)
  assert proc.returncode == 1
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("alignax:")]
  assert lines and "a path component is not a directory" in lines[-1] and str(blocker) in lines[-1]
  assert "Traceback" not in proc.stderr
