"""Checkpoints that never lose work, and the params-only exports that chain stages.

`WORKDIR/checkpoints/<step>/` holds, through an orbax `CheckpointManager` (async, keep-N):
  state   the TrainState (params, optimizer state, step, rng, guard counters, extra)
  data    the data iterator's state (JSON), so a resumed run reads the same next batch
  config  the resolved config (JSON)
  meta    step, wall time, library versions
  checksums  SHA-256 of every state array and of the three JSON items above, taken at save time

Orbax writes each step into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous step as the latest. A checkpoint that fails to restore (corrupt or
truncated files) or whose restored values do not match its checksums is reported on the console
and the next older step is tried. Orbax itself does not notice a flipped byte in the array data
(zarr chunks are zstd-compressed without a content checksum; only the OCDBT index is checked),
so without `checksums` such a step would restore silently wrong values.

`check_resume` compares a resumed run's config with the one its checkpoint was written with, and
`save_export` refuses params that are not finite.

`WORKDIR/export/` holds what the next stage needs: params as a plain nested dict and
`export.json` (model config, tokenizer, stage, extras such as reward normalization).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from alignax.errors import CheckpointError
from alignax.models.config import ModelConfig
from alignax.sections import Section, require


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
  """Attributes:
    every: steps between saves; 0 = only at the end (and on SIGTERM).
    keep: checkpoints kept (the newest).
    async_save: write in the background while training goes on.
  """

  SECTION = "checkpoint"
  every: int = 0
  keep: int = 2
  async_save: bool = True

  def check(self) -> None:
    require(self.every >= 0, "checkpoint.every", "must be >= 0")
    require(self.keep >= 1, "checkpoint.keep", "must be >= 1")


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


# ---------------------------------------------------------------------------------------------
# Integrity: every item of a step carries a checksum taken when it was saved.

CHECKSUM_ITEM = "checksums"
JSON_ITEMS = ("data", "config", "meta")
ITEM_NAMES = ("state",) + JSON_ITEMS + (CHECKSUM_ITEM,)
JSON_FILE = "metadata"  # the file orbax's JsonSave writes inside an item's directory
CHECKSUM_VERSION = 1
_HASH_WORKERS = max(1, min(8, os.cpu_count() or 1))


class DamagedStep(Exception):
  """A step whose files do not hold what was saved; the message is the reason."""


def console(msg: str) -> None:
  """A line on stderr as well as in the log: damaged checkpoints must never pass unseen (absl's
  log goes to WORKDIR/log once the run has started)."""
  print(f"alignax: {msg}", file=sys.stderr, flush=True)


def json_value(value):
  """`value` as it reads back from a JSON item (tuples become lists, odd types strings)."""
  return json.loads(json.dumps(value, default=str))


def json_digest(value) -> str:
  """SHA-256 of the canonical JSON text of `value` (sorted keys), so a value restored from its
  item hashes the same as the one that was saved."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def leaf_name(path) -> str:
  """A pytree path as "params/blocks/mlp/w_in" (the name error messages show)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_digest(leaf) -> str:
  """SHA-256 of one array's dtype, shape and bytes (typed PRNG keys by their key data)."""
  if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  host = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
  digest = hashlib.sha256(f"{host.dtype.name}{host.shape}".encode())
  digest.update(host.reshape(-1).view(np.uint8))  # hashlib releases the GIL on large buffers
  return digest.hexdigest()


def state_digests(state) -> dict[str, str] | None:
  """{leaf name: SHA-256} of every array of `state`, or None with several processes.

  With `jax.process_count() > 1` the arrays are sharded over processes and only process 0
  writes the JSON items, so no process can hash the full values: the state is then not
  checksummed (restores log that they cannot verify it); the JSON items still are. Leaves are
  hashed in a thread pool, one host copy at a time (about 1 GB/s per core).
  """
  if jax.process_count() > 1:
    return None
  named = jax.tree_util.tree_flatten_with_path(state)[0]
  with concurrent.futures.ThreadPoolExecutor(_HASH_WORKERS) as pool:
    digests = list(pool.map(_leaf_digest, [leaf for _, leaf in named]))
  return {leaf_name(path): d for (path, _), d in zip(named, digests)}


def step_checksums(state, json_items: dict) -> dict:
  """The `checksums` item of a step: state arrays (see `state_digests`) and JSON items."""
  digests = state_digests(state)
  out = {"version": CHECKSUM_VERSION, "algorithm": "sha256", "state": digests,
         "json": {name: json_digest(value) for name, value in json_items.items()}}
  if digests is None:
    out["state_skipped"] = f"arrays sharded over {jax.process_count()} processes"
  return out


def check_json_items(items: dict, sums: dict) -> None:
  """Raises DamagedStep when a restored JSON item differs from its checksum."""
  for name, expected in sums["json"].items():
    if name not in items:
      raise DamagedStep(f"the {name} item is missing")
    if json_digest(items[name]) != expected:
      raise DamagedStep(f"the {name} item does not match its checksum (its file changed after "
                        "it was written)")


def check_state(state, sums: dict) -> None:
  """Raises DamagedStep when a restored state's arrays differ from their checksums."""
  expected = sums.get("state")
  if expected is None:
    logging.info("checkpoint state not verified: %s", sums.get("state_skipped", "no checksums"))
    return
  if jax.process_count() > 1:
    logging.info("checkpoint state not verified: this run has %d processes", jax.process_count())
    return
  got = state_digests(state)
  bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
  if bad:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise DamagedStep(f"state array {bad[0]}{more} does not match its checksum (its files changed "
                      "after they were written)")


def saved_steps(directory: str) -> list[int]:
  """Finished steps in a checkpoints directory (orbax renames a step's temporary directory to
  its number only when complete), oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _read_json_file(step_dir: str, item: str):
  with open(os.path.join(step_dir, item, JSON_FILE), encoding="utf-8") as f:
    return json.load(f)


def read_verified_json(step_dir: str, item: str):
  """One JSON item of a step read straight from its file (no manager, no arrays), checked
  against the step's checksums when it has them; DamagedStep, OSError or ValueError if not."""
  value = _read_json_file(step_dir, item)
  if os.path.isdir(os.path.join(step_dir, CHECKSUM_ITEM)):
    expected = _read_json_file(step_dir, CHECKSUM_ITEM).get("json", {}).get(item)
    if expected is None:
      raise DamagedStep(f"the checksums item has no entry for {item}")
    check_json_items({item: value}, {"json": {item: expected}})
  return value


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
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES)
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
      return restored
    raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

  def maybe_save(self, step: int, state, batches=None, force: bool = False) -> bool:
    """Saves `state` at `step` (asynchronously) unless already saved; refuses a halted state.

    The checksums are taken from the host values before orbax starts writing (see
    `state_digests`; blocking, proportional to the state's bytes), so a step whose files later
    change cannot restore silently.
    """
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
    json_items = {"data": json_value(data_state), "config": json_value(self.config.to_dict()),
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


# ---------------------------------------------------------------------------------------------
# Resuming: the config a run resumes with must give the numbers its checkpoint was written with.

# Keys that may change between a checkpoint and the run resuming it; every other key is compared
# (so a key added later is compared unless listed here). A name covers its whole section.
RESUME_FREE_KEYS = (
    "workdir", "preset",  # where the run lives; a preset's effect shows in the values it sets
    "checkpoint", "parallel",  # how often / how many to keep; the mesh (restores reshard)
    "eval", "report",  # what evaluation samples and shows, not what training computes
    # extending a run, logging, evaluation cadence, the failure policy, resume itself
    "train.steps", "train.log_every", "eval.every", "eval.batches", "train.progress",
    "train.nonfinite", "train.max_nonfinite", "train.resume", "train.resume_changed",
    # only consulted when an upstream export is missing (its workdir is compared)
    "init.config", "init.run_if_missing", "reward_model.config", "reward_model.run_if_missing",
    # where built datasets are cached; whether a bad record stops the run (the screening is the
    # same, and "skip" is how a run that stopped on one resumes)
    "data.tfds_dir", "data.bad_records",
    # how the same math is compiled: rematerialization and scan unrolling
    "model.remat", "model.scan_unroll",
)
RESUME_CHANGED = ("refuse", "allow")  # the values of train.resume_changed
_ABSENT = object()


def resume_free(key: str) -> bool:
  """Whether the dotted config `key` may change on resume (see RESUME_FREE_KEYS)."""
  return any(key == k or key.startswith(k + ".") for k in RESUME_FREE_KEYS)


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _same(a, b) -> bool:
  """Equal as JSON values: lists elementwise, numbers by value (1 == 1.0, floats to 1e-12),
  booleans only to booleans."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
      return True
    return a == b or math.isclose(a, b, rel_tol=1e-12)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  return a == b


def _show(value) -> str:
  return "<absent>" if value is _ABSENT else repr(value)


def resume_differences(saved: dict, current: dict) -> list[str]:
  """One line per compared key whose value differs: "key: checkpoint has X, config has Y".

  Both configs are compared as they read back from JSON (tuples as lists); keys in
  RESUME_FREE_KEYS are ignored, a key only one side has counts as a difference.
  """
  old, new = _flatten(json_value(saved)), _flatten(json_value(current))
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
    if resume_free(key) or (a is not _ABSENT and b is not _ABSENT and _same(a, b)):
      continue
    out.append(f"{key}: checkpoint has {_show(a)}, config has {_show(b)}")
  return out


def latest_saved_config(directory: str) -> tuple[int, dict] | None:
  """(step, config) of the newest step whose `config` item reads and matches its checksum, or
  None; reads only that small JSON file, never the arrays."""
  for step in reversed(saved_steps(directory)):
    try:
      return step, read_verified_json(os.path.join(directory, str(step)), "config")
    except (OSError, ValueError, DamagedStep) as e:
      logging.warning("checkpoint step %d in %s: its config cannot be read (%s)", step, directory, e)
  return None


def _note_schedule_change(saved: dict, current: dict, step: int) -> None:
  """train.steps may change on resume, but a decaying schedule spans train.steps: say so."""
  old, new = saved.get("train", {}).get("steps"), current.get("train", {}).get("steps")
  schedule = current.get("optimizer", {}).get("schedule")
  if old is not None and old != new and schedule not in (None, "constant"):
    console(f"train.steps changed from {old} to {new} since checkpoint step {step}: the {schedule} "
            f"learning-rate schedule now spans {new} steps, so from step {step} on it differs from "
            "the original run's")


def check_resume(workdir: str, cfg) -> None:
  """Refuses to resume `WORKDIR/checkpoints` with a config that changes the data order, the model
  or the numbers (CheckpointError listing every such key with its old and new value).

  Does nothing when `train.resume` is False or no step exists. With
  `train.resume_changed="allow"` the changes are accepted and listed as a warning instead. Call
  it before writing `WORKDIR/config.json`, so a refused resume leaves that file as it was.
  """
  if not bool(cfg.train.resume):
    return
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  found = latest_saved_config(directory)
  if found is None:
    return
  step, saved = found
  current = cfg.to_dict()
  _note_schedule_change(saved, current, step)
  diffs = resume_differences(saved, current)
  if not diffs:
    return
  if cfg.train.get("resume_changed", "refuse") == "allow":
    msg = (f"resuming checkpoint step {step} in {directory} with changed keys "
           f"(train.resume_changed=allow): " + "; ".join(diffs))
    logging.warning(msg)
    console(msg)
    return
  raise CheckpointError(
      f"checkpoint step {step} in {directory} was written with a different config: "
      + "; ".join(diffs) + ". To resume with these changes pass "
      "--config.train.resume_changed=allow; to start fresh pass --config.train.resume=False "
      "(deletes the checkpoints) or use another --config.workdir")


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

  `export.json` is written last, so its presence marks a complete export. Params that are not
  all finite raise CheckpointError before anything is touched, so an earlier export survives.
  """
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  check_finite_export(workdir, pure)
  path = export_path(workdir)
  if jax.process_index() == 0 and os.path.exists(path):
    shutil.rmtree(path)
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


def nonfinite_leaves(tree) -> list[str]:
  """Names of the floating-point leaves of `tree` holding a NaN or an inf, in tree order.

  One jitted reduction per leaf to a replicated boolean, so sharded (even multi-process)
  arrays are checked where they live and only booleans come to the host.
  """
  named = [(leaf_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not named:
    return []
  finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in named])
  return [name for (name, _), ok in zip(named, jax.device_get(finite)) if not bool(ok)]


def check_finite_export(workdir: str, params) -> None:
  """CheckpointError naming the first non-finite param: an export of NaNs would poison every
  stage built on it."""
  bad = nonfinite_leaves(params)
  if bad:
    more = f" (and {len(bad) - 1} more param arrays)" if len(bad) > 1 else ""
    raise CheckpointError(
        f"refusing to export the params of {workdir}: param {bad[0]}{more} holds NaN or inf (a "
        "diverged run or a damaged checkpoint); the previous export, if any, is kept. Lower "
        "optimizer.lr, or train with --config.train.nonfinite=halt to keep the last good state")


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
