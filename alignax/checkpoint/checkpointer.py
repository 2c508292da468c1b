"""`Checkpointer`: the orbax CheckpointManager of a run (state, data iterator states, config,
meta, checksums), saving asynchronously and restoring the newest step that verifies."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from alignax.errors import CheckpointError
from alignax.models import lora
from alignax.checkpoint.config import CheckpointConfig
from alignax.checkpoint.resume import MODEL_DEFAULTS
from alignax.checkpoint.integrity import (CHECKSUM_ITEM, ITEM_NAMES, JSON_ITEMS, DamagedStep,
                                          check_json_items, check_state, console, json_value,
                                          step_checksums)


def library_versions() -> dict:
  import flax
  import optax
  versions = {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
              "orbax": getattr(ocp, "__version__", "?"), "python": platform.python_version()}
  try:
    import alignax
    versions["alignax"] = alignax.__version__
  except ImportError:  # pragma: no cover
    pass
  return versions


def _abstract(tree, shardings=None):
  """ShapeDtypeStructs (with target shardings when given) to restore into."""
  if shardings is None:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def saved_part(state):
  """What a checkpoint holds of `state`: all of it, except the frozen base models of a LoRA run
  (they are its `init` export, reloaded at start-up), so its checkpoints hold adapters only."""
  if not lora.has_lora(getattr(state, "params", None)):
    return state
  return state.replace(params=lora.trainable_of(state.params))


def with_frozen_of(restored, current):
  """`restored` (a `saved_part`) with the frozen bases of `current` put back."""
  if not lora.has_lora(getattr(current, "params", None)):
    return restored
  return restored.replace(params=lora.combine(restored.params, lora.partition(current.params)[1]))


def model_differences(saved: dict, current: dict) -> list[str]:
  """Model keys whose values differ (shape-changing edits make a checkpoint unusable)."""
  keys = sorted(set(saved) | set(current))
  return [f"model.{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]


SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
              "max_seq_len", "norm", "position", "mlp", "tie_embeddings", "use_bias", "qkv_bias",
              "attention_bias", "mlp_bias", "qk_norm", "post_norms", "pre_norms", "qk_norm_scope",
              "param_dtype")


def gather_data_states(state: dict) -> dict:
  """Every process's data-iterator state, as {"per_process": [state_0, state_1, ...]}.

  Each process reads its own shard, so each has its own iterator state; orbax's JSON item is
  written once, so the states are gathered (as JSON bytes) to every process first.
  """
  if jax.process_count() == 1:
    return {"per_process": [state]}
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).reshape(-1)
  size = int(sizes.max())
  padded = np.zeros(size, np.uint8)
  padded[: raw.size] = raw
  rows = multihost_utils.process_allgather(padded).reshape(len(sizes), size)
  return {"per_process": [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]}


def own_data_state(saved: dict) -> dict:
  """This process's iterator state from a checkpoint's data item."""
  if "per_process" not in saved:  # a single-state item
    return saved
  states = saved["per_process"]
  if len(states) != jax.process_count():
    raise CheckpointError(f"the checkpoint holds data-iterator states of {len(states)} processes, "
                          f"this run has {jax.process_count()}: resuming exactly needs the same "
                          "number of processes (or --config.train.resume=False)")
  return states[jax.process_index()]


class Checkpointer:
  """Saves and restores a run's state under `WORKDIR/checkpoints`.

  Args:
    workdir: the run directory.
    ckpt_cfg: the `CheckpointConfig` (keep, async_save).
    config: the resolved config as a plain dict (`cfg.to_dict()`): saved with each step; its
      `model` shape keys are compared on restore.
    state_sharding: `state -> shardings` for restoring onto the current mesh (None: as saved).
    resume: restore when a checkpoint exists (`train.resume`).
  """

  def __init__(self, workdir: str, ckpt_cfg: CheckpointConfig, config: dict, *, state_sharding: Callable | None = None,
               resume: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not isinstance(config, dict):
      raise TypeError(f"Checkpointer: config must be a plain dict (cfg.to_dict()), got "
                      f"{type(config).__name__}")
    self.config = config
    self.state_sharding = state_sharding
    self.resume = resume
    if not resume and os.path.isdir(self.directory) and jax.process_index() == 0:
      logging.warning("train.resume=False: removing old checkpoints in %s", self.directory)
      shutil.rmtree(self.directory)
    self._t0 = time.time()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep, enable_async_checkpointing=ckpt_cfg.async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES)
    self.last_saved: int | None = None

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def _check_compatible(self, step: int, saved: dict) -> None:
    # A key newer than the checkpoint takes its default (what the older alignax built).
    def shapes(config):
      return {k: config.get("model", {}).get(k, MODEL_DEFAULTS.get(f"model.{k}")) for k in SHAPE_KEYS}
    saved_model, current_model = shapes(saved), shapes(self.config)
    diffs = model_differences(saved_model, current_model)
    if diffs:
      raise CheckpointError(
          f"the checkpoint at {self.directory}/{step} was written with a different model; "
          + "; ".join(diffs) + ". Use another workdir, or --config.train.resume=False to start fresh.")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _has_item(self, step: int, item: str) -> bool:
    return os.path.isdir(os.path.join(self._step_dir(step), item))

  def _restore_json(self, step: int) -> dict:
    """{item: value} of the step's JSON items, verified against its checksums (DamagedStep).

    A step written before checksums existed restores unverified, with a console note.
    """
    names = [n for n in JSON_ITEMS + (CHECKSUM_ITEM,) if self._has_item(step, n)]
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{n: ocp.args.JsonRestore() for n in names}))
    items = {n: restored[n] for n in names}
    sums = items.pop(CHECKSUM_ITEM, None)
    if sums is None:
      console(f"checkpoint step {step} in {self.directory} has no checksums (written by an older "
              "alignax): restoring it unverified")
    else:
      check_json_items(items, sums)
    items[CHECKSUM_ITEM] = sums
    return items

  def _report_damaged(self, step: int, e: Exception, errors: list[str]) -> None:
    reason = str(e) if isinstance(e, DamagedStep) else f"{type(e).__name__}: {e}"
    msg = f"checkpoint step {step} in {self.directory} cannot be restored: {reason}"
    logging.error(msg)
    first = msg.splitlines()[0]
    console(first + "; skipping it")
    errors.append(first)

  def restore(self, state, batches=None, step: int | None = None):
    """The latest (or `step`) checkpoint restored onto the current state's shardings, or None.

    A step that fails to read, or whose values differ from its checksums, is reported on the
    console and the next older one is tried; if none can be read, CheckpointError says so. The
    data iterator's state is set from the checkpoint.
    """
    if not self.resume:
      return None
    steps = [step] if step is not None else self.steps()[::-1]
    if not steps:
      return None
    full_state, state = state, saved_part(state)
    shardings = self.state_sharding(state) if self.state_sharding else None
    target = _abstract(state, shardings)
    errors, damaged = [], []
    for s in steps:
      try:
        items = self._restore_json(s)
      except Exception as e:  # damaged JSON (or metadata): same fallback as damaged arrays below
        self._report_damaged(s, e, errors)
        damaged.append(s)
        continue
      self._check_compatible(s, items.get("config") or {})
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
        if items[CHECKSUM_ITEM] is not None:
          check_state(restored, items[CHECKSUM_ITEM])
      except Exception as e:  # orbax raises many types for damaged files; report and fall back
        self._report_damaged(s, e, errors)
        damaged.append(s)
        continue
      if batches is not None and items.get("data") is not None:
        batches.set_state(own_data_state(items["data"]))
      if damaged:
        msg = (f"damaged checkpoint step(s) {', '.join(map(str, damaged))}: using step {s} "
               "instead")
        logging.warning(msg)
        console(msg)
      logging.info("restored checkpoint step %d from %s", s, self.directory)
      self.last_saved = s
      return with_frozen_of(restored, full_state)
    raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

  def maybe_save(self, step: int, state, batches=None, force: bool = False) -> bool:
    """Saves `state` at `step` (asynchronously) unless already saved; refuses a halted state.

    The checksums are taken from the host values before orbax starts writing (see
    `state_digests`; blocking, proportional to the state's bytes), so a step whose files later
    change cannot restore silently.
    """
    if self.last_saved == step:
      return False
    state = saved_part(state)
    halted = int(np.asarray(jax.device_get(state.halted_at)).max())  # [M] for a sweep's members
    if halted >= 0:
      logging.error("not saving step %d: the run halted on a non-finite step %d; the last good "
                    "checkpoint is step %s", step, halted, self.last_saved)
      return False
    data_state = gather_data_states(batches.get_state() if batches is not None and
                                    hasattr(batches, "get_state") else {})
    meta = {"step": int(step), "wall_time": time.time(), "elapsed_seconds": time.time() - self._t0,
            "versions": library_versions()}
    json_items = {"data": json_value(data_state), "config": json_value(self.config),
                  "meta": json_value(meta)}
    sums = step_checksums(state, json_items)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        **{n: ocp.args.JsonSave(v) for n, v in json_items.items()},
        **{CHECKSUM_ITEM: ocp.args.JsonSave(sums)}), force=force)
    self.last_saved = step
    return True

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
