"""The params of a run's latest checkpoint, for commands that read a run before it has exported.

`alignax sample` and `alignax eval` prefer `WORKDIR/export`. A run still training, or stopped
before its last step, has only `WORKDIR/checkpoints/<step>/`, whose `state` item holds the whole
TrainState (params, optimizer moments, step, rng, ...). Only its `params` subtree is read: a
partial orbax restore onto host numpy arrays, so neither the optimizer state nor the mesh the
run was saved on (8 devices, FSDP, ...) has to be rebuilt here.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from alignax.checkpoint import CheckpointError, saved_steps

STATE_ITEM = "state"
PARAMS_KEY = "params"


def checkpoints_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps of `workdir`, oldest first ([] without a checkpoints directory)."""
  return saved_steps(checkpoints_dir(workdir))


def pure_params(tree):
  """A restored TrainState params subtree as a plain nested dict of arrays.

  Checkpoints save `nnx.State`s, whose variables flatten to {"value": array}; exports (and
  `nnx.replace_by_pure_dict`) have the array itself in that place.
  """
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return tree["value"]
    return {k: pure_params(v) for k, v in tree.items()}
  return tree


def _restore_params(state_dir: str):
  """The `params` subtree of a step's state item as host numpy arrays (shapes from its
  metadata; the rest of the TrainState is not read)."""
  path = epath.Path(state_dir)
  handler = ocp.PyTreeCheckpointHandler()  # the item's own handler: no step-level metadata needed
  try:
    metadata = handler.metadata(path)
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict) or PARAMS_KEY not in tree:
      raise CheckpointError(f"the checkpoint in {state_dir} has no params in its state item")
    shapes = tree[PARAMS_KEY]  # nested dicts of orbax ArrayMetadata (jax treats them as leaves)
    target = {PARAMS_KEY: jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), shapes)}
    restore_args = {PARAMS_KEY: jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), shapes)}
    restored = handler.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  finally:
    handler.close()
  return restored[PARAMS_KEY]


def load_latest_params(workdir: str) -> tuple[dict, int]:
  """(params, step) of the newest readable checkpoint of `workdir`.

  params is the TrainState's params as a plain nested dict of host numpy arrays, laid out as
  that stage trains them (an LM's params; {"policy", "value"} for PPO; {"backbone", "head_w",
  "head_b"} for a reward model). A step that cannot be read is reported on stderr and the next
  older one is tried. CheckpointError when there is no checkpoint, or none can be read.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    raise CheckpointError(f"{workdir} has no checkpoint ({checkpoints_dir(workdir)} holds no "
                          "finished step)")
  errors = []
  for step in reversed(steps):
    state_dir = os.path.join(checkpoints_dir(workdir), str(step), STATE_ITEM)
    try:
      params = _restore_params(state_dir)
    except CheckpointError:
      raise
    except Exception as e:  # orbax raises many types for damaged files; fall back to an older step
      msg = (f"checkpoint step {step} in {checkpoints_dir(workdir)} cannot be restored: "
             f"{type(e).__name__}: {e}").splitlines()[0]
      logging.error(msg)
      print(f"alignax: {msg}; trying an older step", file=sys.stderr, flush=True)
      errors.append(msg)
      continue
    return pure_params(params), step
  raise CheckpointError(f"no checkpoint of {workdir} could be restored:\n  " + "\n  ".join(errors))
