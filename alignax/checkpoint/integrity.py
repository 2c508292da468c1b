"""Integrity: every item of a checkpoint step carries a SHA-256 checksum taken when it was
saved, verified when it is restored (orbax does not notice a flipped byte in array data)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging



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
