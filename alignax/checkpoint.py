"""Checkpoints that never lose work, and the params-only exports that chain stages.

`WORKDIR/checkpoints/<step>/` holds, through an orbax `CheckpointManager` (async, keep-N):
  state   the TrainState (params, optimizer state, step, rng, guard counters, extra)
  data    the data iterator's state (JSON), so a resumed run reads the same next batch
  config  the resolved config (JSON)
  meta    step, wall time, library versions

Orbax writes each step into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous step as the latest. A checkpoint that fails to restore (corrupt or
truncated files) is reported and the next older step is tried.

`WORKDIR/export/` holds what the next stage needs: params as a plain nested dict and
`export.json` (model config, tokenizer, stage, extras such as reward normalization).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from alignax.models.config import ModelConfig


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message says which and why."""


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


def model_differences(saved: dict, current: dict) -> list[str]:
  """Model keys whose values differ (shape-changing edits make a checkpoint unusable)."""
  keys = sorted(set(saved) | set(current))
  return [f"model.{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
          for k in keys if saved.get(k) != current.get(k)]


SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
              "max_seq_len", "norm", "position", "mlp", "tie_embeddings", "use_bias", "qkv_bias",
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
    ckpt_cfg: `checkpoint.*` (keep, async_save).
    config: the resolved config (saved with each step; compared on restore).
    state_sharding: `state -> shardings` for restoring onto the current mesh (None: as saved).
    resume: restore when a checkpoint exists (`train.resume`).
  """

  def __init__(self, workdir: str, ckpt_cfg, config, *, state_sharding: Callable | None = None,
               resume: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.config = config
    self.state_sharding = state_sharding
    self.resume = resume
    if not resume and os.path.isdir(self.directory) and jax.process_index() == 0:
      logging.warning("train.resume=False: removing old checkpoints in %s", self.directory)
      shutil.rmtree(self.directory)
    self._t0 = time.time()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(ckpt_cfg.keep), enable_async_checkpointing=bool(ckpt_cfg.async_save),
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config", "meta"))
    self.last_saved: int | None = None

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def _check_compatible(self, step: int, saved: dict) -> None:
    saved_model = {k: saved.get("model", {}).get(k) for k in SHAPE_KEYS}
    current_model = {k: self.config.model.get(k) for k in SHAPE_KEYS}
    diffs = model_differences(saved_model, current_model)
    if diffs:
      raise CheckpointError(
          f"the checkpoint at {self.directory}/{step} was written with a different model; "
          + "; ".join(diffs) + ". Use another workdir, or --config.train.resume=False to start fresh.")

  def restore(self, state, batches=None, step: int | None = None):
    """The latest (or `step`) checkpoint restored onto the current state's shardings, or None.

    A checkpoint that fails to read is logged and the next older one is tried; if none can be
    read, CheckpointError says so. The data iterator's state is set from the checkpoint.
    """
    if not self.resume:
      return None
    steps = [step] if step is not None else self.steps()[::-1]
    if not steps:
      return None
    shardings = self.state_sharding(state) if self.state_sharding else None
    target = _abstract(state, shardings)
    errors = []
    for s in steps:
      try:
        saved_config = self.manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
      except Exception as e:  # damaged metadata: same fallback as damaged arrays below
        msg = f"checkpoint step {s} in {self.directory} cannot be restored: {type(e).__name__}: {e}"
        logging.error(msg)
        errors.append(msg.splitlines()[0])
        continue
      self._check_compatible(s, saved_config or {})
      try:
        args = {"state": ocp.args.StandardRestore(target)}
        if batches is not None:
          args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(s, args=ocp.args.Composite(**args))
      except Exception as e:  # orbax raises many types for damaged files; report and fall back
        msg = f"checkpoint step {s} in {self.directory} cannot be restored: {type(e).__name__}: {e}"
        logging.error(msg)
        errors.append(msg.splitlines()[0])
        continue
      if batches is not None and restored.data is not None:
        batches.set_state(own_data_state(restored.data))
      if errors:
        logging.warning("using checkpoint step %d instead of the damaged later step(s)", s)
      logging.info("restored checkpoint step %d from %s", s, self.directory)
      self.last_saved = s
      return restored.state
    raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

  def maybe_save(self, step: int, state, batches=None, force: bool = False) -> bool:
    """Saves `state` at `step` (asynchronously) unless already saved; refuses a halted state."""
    if self.last_saved == step:
      return False
    halted = int(np.asarray(jax.device_get(state.halted_at)).max())  # [M] for a sweep's members
    if halted >= 0:
      logging.error("not saving step %d: the run halted on a non-finite step %d; the last good "
                    "checkpoint is step %s", step, halted, self.last_saved)
      return False
    data_state = gather_data_states(batches.get_state() if batches is not None and
                                    hasattr(batches, "get_state") else {})
    meta = {"step": int(step), "wall_time": time.time(), "elapsed_seconds": time.time() - self._t0,
            "versions": library_versions()}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(json.dumps(self.config.to_dict(), default=str))),
        meta=ocp.args.JsonSave(meta)), force=force)
    self.last_saved = step
    return True

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------------------------------------
# Params-only exports: the hand-off between stages.

EXPORT_DIR = "export"


def export_path(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, EXPORT_DIR))


def has_export(workdir: str) -> bool:
  return os.path.exists(os.path.join(export_path(workdir), "export.json"))


def save_export(workdir: str, params, *, model: ModelConfig, stage: str, tokenizer: str,
                extra: dict | None = None, chat_template: str = "markers") -> str:
  """Writes params (as a plain nested dict) and `export.json`; all processes call this.

  `export.json` is written last, so its presence marks a complete export.
  """
  path = export_path(workdir)
  if jax.process_index() == 0 and os.path.exists(path):
    shutil.rmtree(path)
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), pure)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    meta = {"stage": stage, "tokenizer": tokenizer, "chat_template": chat_template,
            "model": _model_dict(model), "extra": extra or {},
            "versions": library_versions(), "time": time.time()}
    tmp = os.path.join(path, "export.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, default=str)
    os.replace(tmp, os.path.join(path, "export.json"))
  return path


def _model_dict(model: ModelConfig) -> dict:
  import dataclasses
  return dataclasses.asdict(model)


def read_export_meta(workdir: str) -> dict:
  meta_path = os.path.join(export_path(workdir), "export.json")
  if not os.path.exists(meta_path):
    raise CheckpointError(f"{workdir} has no finished export ({meta_path} is missing): "
                          "run that stage first, or name another workdir")
  with open(meta_path, encoding="utf-8") as f:
    return json.load(f)


def load_export(workdir: str, abstract_params: Any = None, shardings: Any = None):
  """(params, meta) from `WORKDIR/export`.

  With `abstract_params` (an `nnx.State` of ShapeDtypeStructs, e.g. from `abstract_lm`) the
  params come back as that State, placed by `shardings` when given; otherwise as a nested dict
  of host arrays.
  """
  meta = read_export_meta(workdir)
  path = os.path.join(export_path(workdir), "params")
  with ocp.StandardCheckpointer() as ckptr:
    if abstract_params is None:
      return ckptr.restore(path), meta
    pure_target = nnx.to_pure_dict(abstract_params)
    if shardings is not None:
      pure_sh = nnx.to_pure_dict(shardings)
      pure_target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 pure_target, pure_sh)
    else:
      pure_target = jax.tree.map(ocp.utils.to_shape_dtype_struct, pure_target)
    try:
      pure = ckptr.restore(path, pure_target)
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"the export in {workdir} does not match the expected params: {e}") from None
  state = jax.tree.map(lambda x: x, abstract_params)
  nnx.replace_by_pure_dict(state, pure)
  return state, meta


def export_model_config(workdir: str) -> ModelConfig:
  return ModelConfig.from_mapping(read_export_meta(workdir)["model"])


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM / SIGINT stop the loop at the next step boundary.


class StopSignal:
  """Records SIGTERM/SIGINT; `requested()` is polled by the loop between steps.

  A second SIGINT falls through to the default handler (an immediate KeyboardInterrupt), so a
  user can always get out.
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning("received %s: finishing the current step, then saving",
                    signal.Signals(signum).name)

  def requested(self) -> bool:
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
