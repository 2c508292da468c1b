"""Checkpoints never lose work: exact resume after SIGKILL, kills during async saves, SIGTERM,
restore onto another mesh, damaged checkpoints, changed models, the halt policy."""

import glob
import logging
import os
import random
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from alignax import checkpoint as ckpt_lib
from alignax import parallel
from alignax.config import base_config
from alignax.models import build_lm, llama_style
from alignax.train.state import TrainState
from cli_helpers import SMALL_PRETRAIN, comparable, last_step, metric_rows, run_cli, start_cli
from cli_helpers import wait_for as _wait_for
from checkpoint_helpers import ckpt_args




@pytest.mark.slow
def test_sigkill_then_resume_reproduces_every_metric(tmp_path):
  # Enough steps that the run is still going when the kill lands (compiled steps are fast).
  args = SMALL_PRETRAIN + ["--config.train.steps=200", "--config.train.log_every=1",
                           "--config.eval.every=50", "--config.checkpoint.every=5"]
  ref = str(tmp_path / "uninterrupted")
  run_cli(*args, f"--config.workdir={ref}")

  killed = str(tmp_path / "killed")
  kill_at = random.Random(0).randint(12, 24)
  proc = start_cli(*args, f"--config.workdir={killed}")
  _wait_for(lambda: last_step(killed) >= kill_at or proc.poll() is not None, what=f"step {kill_at}")
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert last_step(killed) < 200
  run_cli(*args, f"--config.workdir={killed}")

  a, b = comparable(metric_rows(ref)), comparable(metric_rows(killed))
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key] == b[key], key  # exact: same data order, same random numbers, same metrics


@pytest.mark.slow
def test_kill_during_async_saves_never_leaves_a_broken_latest(tmp_path):
  """Saving every step and killing at random moments: the latest complete step always restores."""
  workdir = str(tmp_path / "run")
  args = SMALL_PRETRAIN + ["--config.train.steps=400", "--config.train.log_every=1",
                           "--config.eval.every=0", "--config.checkpoint.every=1",
                           f"--config.workdir={workdir}"]
  rng = random.Random(1)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for attempt in range(3):
    proc = start_cli(*args)
    start = last_step(workdir)
    _wait_for(lambda: last_step(workdir) >= start + 3, what="steps after restart")
    time.sleep(rng.uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data", "config", "meta"))
    latest = manager.latest_step()
    assert latest is not None
    restored = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                               data=ocp.args.JsonRestore()))
    params = jax.tree.leaves(restored.state["params"])
    assert params and all(np.all(np.isfinite(np.asarray(x))) for x in params)
    assert restored.data  # the iterator state came with it
    manager.close()


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_saves_and_exits_zero(tmp_path):
  workdir = str(tmp_path / "run")
  args = SMALL_PRETRAIN + ["--config.train.steps=500", "--config.train.log_every=1",
                           "--config.eval.every=0", f"--config.workdir={workdir}"]
  proc = start_cli(*args)
  _wait_for(lambda: last_step(workdir) >= 5, what="step 5")
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-2000:]
  assert "stopped at step" in stderr and "Run the same command to resume" in stderr
  steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
           if os.path.basename(p).isdigit()]
  assert steps and max(steps) >= 5
  assert max(steps) == last_step(workdir)  # saved exactly where it stopped
  assert not os.path.exists(os.path.join(workdir, "export", "export.json"))  # not finished


@pytest.mark.slow
def test_halt_policy_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  # A huge learning rate overflows the params within a few steps.
  proc = run_cli(*SMALL_PRETRAIN, "--config.train.steps=200", "--config.train.log_every=1",
                 "--config.eval.every=0", "--config.checkpoint.every=1",
                 "--config.optimizer.lr=1e12", "--config.optimizer.clip_norm=0",
                 "--config.optimizer.warmup_steps=0", "--config.optimizer.schedule=constant",
                 "--config.train.nonfinite=halt", f"--config.workdir={workdir}", check=False)
  assert proc.returncode == 1
  assert "non-finite loss, gradient or update at step" in proc.stderr
  bad = int(proc.stderr.split("non-finite loss, gradient or update at step")[1].split()[0])
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "data", "config", "meta"))
  latest = manager.latest_step()
  assert latest is not None and latest < bad
  assert f"the last good checkpoint is step {latest}" in proc.stderr
  state = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  assert int(state["halted_at"]) == -1
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))
  manager.close()


# ----------------------------------------------------------------------------- in-process tests


def _small_state(seed=0, d_model=64):
  cfg = llama_style(vocab_size=300, d_model=d_model, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_seq_len=64)
  _, params = build_lm(cfg, seed)
  return cfg, TrainState.create(params, optax.adamw(1e-3), jax.random.key(seed))


def _config(workdir, d_model=64):
  c = base_config("pretrain")
  c.workdir = str(workdir)
  c.model.d_model = d_model
  c.checkpoint.async_save = False
  return c


def _placement(**mesh):
  cfg = ml_collections.ConfigDict(dict(mesh=dict(dict(data=1, fsdp=1, tensor=1), **mesh)))
  return parallel.Placement(parallel.make_mesh(cfg.mesh))


def test_restore_onto_another_mesh_gives_equal_params(tmp_path):
  _, state = _small_state()
  saved_on = _placement(fsdp=8)
  state = saved_on.put_state(state)
  assert "fsdp" in str(state.params["blocks"]["mlp"]["w_in"][...].sharding.spec)
  ck = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(_config(tmp_path)),
                             state_sharding=saved_on.state_sharding)
  ck.maybe_save(3, state)
  ck.close()

  restored_on = _placement(data=2, fsdp=4)
  ck2 = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(_config(tmp_path)),
                              state_sharding=restored_on.state_sharding)
  _, fresh = _small_state(seed=1)  # different values: restore must overwrite them all
  restored = ck2.restore(restored_on.put_state(fresh))
  ck2.close()
  assert int(restored.step) == 0 and restored.params["embed"][...].sharding.mesh.shape["data"] == 2
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _truncate_arrays(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(p) and os.path.getsize(p) > 64]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(os.path.getsize(p) // 3)


def test_damaged_latest_checkpoint_falls_back_to_previous_step(tmp_path, caplog):
  _, state = _small_state()
  cfg = _config(tmp_path)
  ck = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(cfg))
  ck.maybe_save(1, state)
  later = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x + 1, state.params))
  ck.maybe_save(2, later)
  ck.close()
  _truncate_arrays(os.path.join(tmp_path, "checkpoints", "2"))

  ck = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(cfg))
  with caplog.at_level(logging.ERROR):
    restored = ck.restore(state)
  assert "checkpoint step 2" in caplog.text and "cannot be restored" in caplog.text
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(a, b)  # step 1's params, not step 2's
  ck.close()

  _truncate_arrays(os.path.join(tmp_path, "checkpoints", "1"))
  ck = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(cfg))
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint could be restored"):
    ck.restore(state)
  ck.close()


def test_changed_model_shapes_are_rejected_with_the_key(tmp_path):
  _, state = _small_state()
  ck = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(_config(tmp_path)))
  ck.maybe_save(1, state)
  ck.close()
  _, other = _small_state(d_model=32)
  cfg = _config(tmp_path, d_model=32)
  ck = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(cfg))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.d_model: checkpoint has 64, config has 32"):
    ck.restore(other)
  ck.close()


def test_resume_false_starts_fresh(tmp_path):
  _, state = _small_state()
  ck = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(_config(tmp_path)))
  ck.maybe_save(4, state)
  ck.close()
  ck = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(_config(tmp_path)), resume=False)
  assert ck.restore(state) is None and ck.steps() == []
  ck.close()


def test_export_round_trip(tmp_path):
  cfg, state = _small_state()
  ckpt_lib.save_export(str(tmp_path), state.params, model=cfg, stage="pretrain", tokenizer="bytes",
                       extra={"note": 1})
  from alignax.models import abstract_lm
  _, abstract = abstract_lm(ckpt_lib.export_model_config(str(tmp_path)))
  params, meta = ckpt_lib.load_export(str(tmp_path), abstract)
  assert meta["stage"] == "pretrain" and meta["extra"] == {"note": 1}
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ckpt_lib.CheckpointError, match="no finished export"):
    ckpt_lib.read_export_meta(str(tmp_path / "missing"))
