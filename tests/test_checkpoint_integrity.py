"""Never silently wrong: checkpoints prove their bytes, exports refuse NaNs, resumes check their
config. Small hand-made TrainStates saved with `Checkpointer` directly (each test ~1 s)."""

import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from alignax import checkpoint as ckpt_lib
from alignax.config import base_config, load_config_file
from alignax.train.state import TrainState
from checkpoint_helpers import ckpt_args, check_resume

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed=0, shift=0.0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32) + shift,
            "b": jnp.asarray(rng.standard_normal((64,)), jnp.float32)}
  return TrainState.create(params, optax.adam(1e-3), jax.random.key(seed))


def _cfg(workdir):
  c = base_config("pretrain")
  c.workdir = str(workdir)
  c.checkpoint.async_save = False
  return c


def _save(workdir, cfg, *states):
  """Saves `states` as steps 1, 2, ...; returns the checkpoints directory."""
  ck = ckpt_lib.Checkpointer(str(workdir), *ckpt_args(cfg))
  for i, state in enumerate(states, start=1):
    ck.maybe_save(i, state.replace(step=jnp.int32(i)))
  ck.close()
  return os.path.join(str(workdir), "checkpoints")


def _restore(workdir, cfg, like):
  ck = ckpt_lib.Checkpointer(str(workdir), *ckpt_args(cfg))
  try:
    return ck.restore(like)
  finally:
    ck.close()


def _flip_largest_state_file(step_dir, count=64):
  """XORs `count` bytes in the middle of the step's largest array data file."""
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(p)]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    for i in range(mid, mid + count):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


def _what_orbax_alone_restores(step_dir, expected) -> str:
  """What plain orbax makes of a step: "changed" (no error, other values), "error" or "same"."""
  manager = ocp.CheckpointManager(os.path.dirname(step_dir), item_names=ckpt_lib.ITEM_NAMES)
  try:
    state = manager.restore(int(os.path.basename(step_dir)),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  except Exception:  # noqa: BLE001 - a decode error is the other way a flip can show
    return "error"
  finally:
    manager.close()
  same = all(np.array_equal(np.asarray(state["params"][k]), np.asarray(v)) for k, v in expected.items())
  return "same" if same else "changed"


def test_flipped_array_bytes_fall_back_to_the_previous_step_on_the_console(tmp_path, capsys):
  cfg = _cfg(tmp_path)
  first, second = _state(), _state(shift=1.0)
  ckpt_dir = _save(tmp_path, cfg, first, second)
  _flip_largest_state_file(os.path.join(ckpt_dir, "2"))
  outcome = _what_orbax_alone_restores(os.path.join(ckpt_dir, "2"), second.params)
  assert outcome != "same", "the flip did not reach the array data"
  capsys.readouterr()

  restored = _restore(tmp_path, cfg, first)
  err = capsys.readouterr().err
  assert int(restored.step) == 1
  np.testing.assert_array_equal(restored.params["w"], first.params["w"])
  assert "checkpoint step 2" in err and "cannot be restored" in err
  if outcome == "changed":  # orbax alone would have restored wrong numbers: the checksum caught it
    assert "does not match its checksum" in err
  assert "using step 1 instead" in err


def test_valid_but_wrong_array_files_are_caught_by_the_checksum(tmp_path, capsys):
  """Step 1's state files under step 2 decode without any error: only the checksum can tell."""
  import shutil
  cfg = _cfg(tmp_path)
  first = _state()
  ckpt_dir = _save(tmp_path, cfg, first, _state(shift=1.0))
  shutil.rmtree(os.path.join(ckpt_dir, "2", "state"))
  shutil.copytree(os.path.join(ckpt_dir, "1", "state"), os.path.join(ckpt_dir, "2", "state"))
  assert _what_orbax_alone_restores(os.path.join(ckpt_dir, "2"), first.params) == "same"
  restored = _restore(tmp_path, cfg, first)
  err = capsys.readouterr().err
  assert int(restored.step) == 1  # the step counter is a checksummed array too
  assert "checkpoint step 2" in err and "does not match its checksum" in err


def test_every_step_damaged_raises_naming_each(tmp_path, capsys):
  cfg = _cfg(tmp_path)
  ckpt_dir = _save(tmp_path, cfg, _state(), _state(shift=1.0))
  for step in ("1", "2"):
    _flip_largest_state_file(os.path.join(ckpt_dir, step))
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint could be restored") as e:
    _restore(tmp_path, cfg, _state())
  assert "step 2" in str(e.value) and "step 1" in str(e.value)


def _edit_json(step_dir, item, edit):
  path = os.path.join(step_dir, item, ckpt_lib.JSON_FILE)
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(edit(value), f)


def test_a_changed_json_item_is_damaged(tmp_path, capsys, caplog):
  cfg = _cfg(tmp_path)
  first = _state()
  ckpt_dir = _save(tmp_path, cfg, first, _state(shift=1.0))
  # Still valid JSON, one value changed: only the checksum can tell.
  _edit_json(os.path.join(ckpt_dir, "2"), "config", lambda c: {**c, "seed": 7})
  with caplog.at_level(logging.ERROR):
    restored = _restore(tmp_path, cfg, first)
  err = capsys.readouterr().err
  assert int(restored.step) == 1
  assert "checkpoint step 2" in err and "the config item does not match its checksum" in err
  assert "checkpoint step 2" in caplog.text
  # check_resume reads the newest readable config: step 1's, which matches.
  check_resume(str(tmp_path), cfg)


def test_truncated_json_and_damaged_checksums_fall_back(tmp_path, capsys):
  cfg = _cfg(tmp_path)
  cfg.checkpoint.keep = 3
  first = _state()
  ckpt_dir = _save(tmp_path, cfg, first, _state(shift=1.0), _state(shift=2.0))
  meta = os.path.join(ckpt_dir, "3", "meta", ckpt_lib.JSON_FILE)
  with open(meta, "r+b") as f:
    f.truncate(os.path.getsize(meta) // 2)
  _edit_json(os.path.join(ckpt_dir, "2"), ckpt_lib.CHECKSUM_ITEM,
             lambda s: {**s, "state": {k: "0" * 64 for k in s["state"]}})
  restored = _restore(tmp_path, cfg, first)
  err = capsys.readouterr().err
  assert int(restored.step) == 1
  assert "checkpoint step 3" in err and "checkpoint step 2" in err
  assert "damaged checkpoint step(s) 3, 2: using step 1 instead" in err


def test_a_step_without_checksums_restores_with_a_note(tmp_path, capsys):
  cfg = _cfg(tmp_path)
  first = _state()
  ckpt_dir = _save(tmp_path, cfg, first)
  import shutil
  shutil.rmtree(os.path.join(ckpt_dir, "1", ckpt_lib.CHECKSUM_ITEM))  # as an older alignax wrote it
  restored = _restore(tmp_path, cfg, first)
  assert int(restored.step) == 1
  assert "has no checksums" in capsys.readouterr().err


def test_several_processes_skip_the_state_checksum(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  sums = ckpt_lib.step_checksums(_state(), {"meta": {"step": 1}})
  assert sums["state"] is None and "2 processes" in sums["state_skipped"]
  ckpt_lib.check_state(_state(shift=5.0), sums)  # cannot verify: logs, never raises


# ----------------------------------------------------------------------------- exports


def test_a_nan_export_is_refused_and_the_previous_export_kept(tmp_path):
  from alignax.models import llama_style
  model = llama_style(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=64)
  good = _state().params
  ckpt_lib.save_export(str(tmp_path), good, model=model, stage="pretrain", tokenizer="bytes")
  bad = {"w": good["w"], "b": good["b"].at[3].set(jnp.nan)}
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt_lib.save_export(str(tmp_path), bad, model=model, stage="pretrain", tokenizer="bytes")
  assert "b holds NaN or inf" in str(e.value) and str(tmp_path) in str(e.value)
  assert ckpt_lib.has_export(str(tmp_path))
  params, _ = ckpt_lib.load_export(str(tmp_path))
  np.testing.assert_array_equal(params["b"], good["b"])


def test_nonfinite_leaves_names_them_in_tree_order():
  tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf]), "d": jnp.arange(3)},
          "e": jnp.full((2,), jnp.nan)}
  assert ckpt_lib.nonfinite_leaves(tree) == ["b/c", "e"]


# ----------------------------------------------------------------------------- resume


def test_resume_differences_compare_json_values_and_ignore_free_keys():
  saved = {"world": {"pretrain_mix": [["a", 1.0]]}, "optimizer": {"lr": 0.001, "b1": 1},
           "train": {"steps": 10, "batch_size": 8}, "checkpoint": {"every": 5}, "model": {"remat": "dots"}}
  same = {"world": {"pretrain_mix": (("a", 1),)}, "optimizer": {"lr": 1e-3, "b1": 1.0},
          "train": {"steps": 99, "batch_size": 8}, "checkpoint": {"every": 1}, "model": {"remat": "none"}}
  assert ckpt_lib.resume_differences(saved, same) == []
  changed = {**same, "train": {"steps": 10, "batch_size": 16}, "seed": 1}
  assert ckpt_lib.resume_differences(saved, changed) == [
      "seed: checkpoint has <absent>, config has 1",
      "train.batch_size: checkpoint has 8, config has 16"]
  assert ckpt_lib.resume_differences({"x": True}, {"x": 1}) == ["x: checkpoint has True, config has 1"]
  # A model field newer than the checkpoint compares with its default (what was built then).
  newer = {**same, "model": {"remat": "none", "qk_norm": False, "rope_scaling": "none"}}
  assert ckpt_lib.resume_differences(saved, newer) == []
  assert ckpt_lib.resume_differences(saved, {**same, "model": {"qk_norm": True}}) == [
      "model.qk_norm: checkpoint has False, config has True"]


def _dpo_cfg(workdir):
  c = load_config_file(os.path.join(_REPO, "configs", "dpo.py"), "tiny")
  c.workdir = str(workdir)
  c.checkpoint.async_save = False
  return c


def _set(cfg, **dotted):
  with cfg.unlocked():
    for key, value in dotted.items():
      node = cfg
      *parents, leaf = key.split("__")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return cfg


def test_check_resume_refuses_changes_that_change_the_numbers(tmp_path):
  _save(tmp_path, _dpo_cfg(tmp_path), _state())
  config_json = os.path.join(str(tmp_path), "config.json")
  changed = _set(_dpo_cfg(tmp_path), data__seq_len=64, seed=3, train__batch_size=8,
                 tokenizer="world_bpe:256", world__seed=5, dpo__beta=0.3)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    check_resume(str(tmp_path), changed)
  msg = str(e.value)
  for line in ("data.seq_len: checkpoint has 96, config has 64", "seed: checkpoint has 0, config has 3",
               "train.batch_size: checkpoint has 16, config has 8",
               "tokenizer: checkpoint has 'bytes', config has 'world_bpe:256'",
               "world.seed: checkpoint has 0, config has 5", "dpo.beta: checkpoint has 0.1, config has 0.3"):
    assert line in msg
  assert "checkpoint step 1" in msg and "--config.train.resume_changed=allow" in msg
  assert "--config.train.resume=False" in msg and "\n" not in msg
  assert not os.path.exists(config_json)  # check_resume writes nothing


def test_check_resume_allows_harmless_changes_and_resume_changed_allow(tmp_path, capsys, caplog):
  _save(tmp_path, _dpo_cfg(tmp_path), _state())
  harmless = _set(_dpo_cfg(tmp_path), train__steps=300, train__log_every=1, eval__every=0,
                  checkpoint__keep=5, model__remat="none", eval__num_prompts=8)
  check_resume(str(tmp_path), harmless)
  assert "train.steps changed from 150 to 300" in capsys.readouterr().err  # the schedule stretches

  allowed = _set(_dpo_cfg(tmp_path), data__seq_len=64, train__resume_changed="allow")
  with caplog.at_level(logging.WARNING):
    check_resume(str(tmp_path), allowed)
  assert "data.seq_len: checkpoint has 96, config has 64" in capsys.readouterr().err
  assert "data.seq_len" in caplog.text and "resume_changed=allow" in caplog.text

  fresh = _set(_dpo_cfg(tmp_path), data__seq_len=64, train__resume=False)
  check_resume(str(tmp_path), fresh)  # starting fresh: nothing to compare
  check_resume(str(tmp_path / "elsewhere"), _set(_dpo_cfg(tmp_path), seed=9))  # no checkpoints
