"""Resuming: the config a run resumes with must give the numbers its checkpoint was written
with (`check_resume`)."""

from __future__ import annotations

import dataclasses
import math
import os

from absl import logging

from alignax.errors import CheckpointError
from alignax.models.config import ModelConfig
from alignax.models.lora import LoraConfig
from alignax.checkpoint.integrity import (DamagedStep, console, json_value, read_verified_json,
                                          saved_steps)


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
# What an alignax older than a model field built: the field's default ("model.<field>": value).
MODEL_DEFAULTS = {f"model.{f.name}": json_value(f.default) for f in dataclasses.fields(ModelConfig)}
MODEL_DEFAULTS.update({f"model.lora.{f.name}": json_value(f.default) for f in dataclasses.fields(LoraConfig)})
# Stage-section keys added after runs were checkpointed, with the value an older run trained
# with (what its code did before the key existed), so such a run resumes.
SECTION_DEFAULTS = {
    "reward.soft_labels": False,
    "dpo.soft_labels": False,
    "world.feedback_demos": 0,
    "world.constitution": "world",
    "data.pair_len": 0,
}


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


def _section(key: str) -> str:
  return key.split(".", 1)[0]


def _show(value) -> str:
  return "<absent>" if value is _ABSENT else repr(value)


def resume_differences(saved: dict, current: dict) -> list[str]:
  """One line per compared key whose value differs: "key: checkpoint has X, config has Y".

  Both configs are compared as they read back from JSON (tuples as lists); keys in
  RESUME_FREE_KEYS are ignored, a key only one side has counts as a difference (except a model
  field or a SECTION_DEFAULTS key the checkpoint predates, which is compared with its default).
  """
  old, new = _flatten(json_value(saved)), _flatten(json_value(current))
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
    if a is _ABSENT and key in MODEL_DEFAULTS:  # a model field newer than the checkpoint
      a = MODEL_DEFAULTS[key]
    elif a is _ABSENT and key in SECTION_DEFAULTS and _section(key) in saved:
      a = SECTION_DEFAULTS[key]  # a section key newer than the checkpoint
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


def check_resume(workdir: str, current: dict, train) -> None:
  """Refuses to resume `WORKDIR/checkpoints` with a config that changes the data order, the model
  or the numbers (CheckpointError listing every such key with its old and new value).

  Args:
    workdir: the run directory.
    current: the resolved config as a plain dict (`cfg.to_dict()`), compared key by key with the
      one the newest readable checkpoint saved.
    train: the `TrainConfig` (`resume`, `resume_changed`).

  Does nothing when `train.resume` is False or no step exists. With
  `train.resume_changed="allow"` the changes are accepted and listed as a warning instead. Call
  it before writing `WORKDIR/config.json`, so a refused resume leaves that file as it was.
  """
  if not train.resume:
    return
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  found = latest_saved_config(directory)
  if found is None:
    return
  step, saved = found
  _note_schedule_change(saved, current, step)
  diffs = resume_differences(saved, current)
  if not diffs:
    return
  if train.resume_changed == "allow":
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
