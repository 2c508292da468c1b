"""The key of DPO's precomputed reference logprobs (`dpo.precompute_ref`): everything the cached
values depend on, so a different reference export, model, tokenizer, pipeline setting or record
recomputes them instead of reusing stale numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
from absl import logging

from alignax import checkpoint as ckpt_lib


def _digest(*chunks: bytes) -> str:
  h = hashlib.sha256()
  for c in chunks:
    h.update(c)
  return h.hexdigest()[:16]


def _json_value(o):
  """Record values json cannot write (TFDS sources hand back numpy scalars and bytes)."""
  if isinstance(o, bytes):
    return o.decode("utf-8", "surrogateescape")
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, np.generic):
    return o.item()
  raise TypeError(f"cannot hash a record value of type {type(o).__name__}")


def export_fingerprint(workdir: str) -> str:
  """Identity of the export in `workdir`: the bytes of its export.json (whose `time` changes
  with every save) and the name, size and mtime of every file of its params.

  Cheap whatever the model's size (no params are read); a copied or rewritten export recomputes.
  """
  path = ckpt_lib.export_path(workdir)
  with open(os.path.join(path, "export.json"), "rb") as f:
    chunks = [f.read()]
  for root, dirs, files in os.walk(os.path.join(path, "params")):
    dirs.sort()
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      rel = os.path.relpath(os.path.join(root, name), path)
      chunks.append(f"\n{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
  return _digest(*chunks)


def tokenizer_fingerprint(spec: str, tok) -> str:
  """The tokenizer spec, its special ids and the bytes of its model file (SentencePiece's
  `model_file`, Hugging Face's `path`), so a retrained file under the same name counts."""
  meta = {"spec": spec, "class": type(tok).__name__, "vocab_size": int(tok.vocab_size),
          "specials": [int(tok.pad_id), int(tok.bos_id), int(tok.eos_id)],
          "roles": {k: int(v) for k, v in sorted(tok.role_ids.items())}}
  chunks = [json.dumps(meta, sort_keys=True).encode()]
  model_file = getattr(tok, "model_file", None) or getattr(tok, "path", None)
  if isinstance(model_file, str) and os.path.isfile(model_file):
    with open(model_file, "rb") as f:
      chunks.append(f.read())
  return _digest(*chunks)


def records_fingerprint(source) -> str:
  """Hash of every record of `source` in index order (whatever the source: world, files, TFDS
  or memory; about 60 us a record)."""
  h = hashlib.sha256()
  for i in range(len(source)):
    h.update(json.dumps(source[i], sort_keys=True, default=_json_value).encode())
    h.update(b"\n")
  return h.hexdigest()[:16]


def reference_cache_key(ctx, source, pipeline_args: dict) -> dict[str, str]:
  """What determines the reference logprob sums of `source`, part by part ({part: value}).

  reference: the export `init.workdir` holds; model: its config with this run's compute
  choices (dtype); tokenizer; pipeline: the pipeline arguments that change a row
  (`pipeline_args`: seq_len, chat template, bad-record policy; not the batch size, rows are
  independent); data: the records themselves; num_records.
  """
  pipeline_args = {k: v for k, v in pipeline_args.items() if k != "batch_size"}
  model = dataclasses.asdict(ctx.model)
  return {
      "reference": export_fingerprint(ctx.cfg.init.workdir),
      "model": _digest(json.dumps(model, sort_keys=True, default=str).encode()),
      "tokenizer": tokenizer_fingerprint(str(ctx.cfg.tokenizer), ctx.tokenizer),
      "pipeline": _digest(json.dumps(pipeline_args, sort_keys=True, default=str).encode()),
      "data": records_fingerprint(source),
      "num_records": str(len(source)),
  }


def load_cached_reference(path: str, key: dict[str, str]):
  """(chosen [N], rejected [N]) float32 from the cache at `path` when it was computed for `key`,
  else None, logging why it is not used."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as cached:
      saved = json.loads(str(cached["key"])) if "key" in cached.files else None
      if saved == key:
        logging.info("using cached reference logprobs from %s (same reference, model, tokenizer, "
                     "pipeline and data)", path)
        return cached["chosen"], cached["rejected"]
  except (OSError, ValueError, KeyError) as e:  # a damaged or foreign file: recompute over it
    logging.info("recomputing reference logprobs: %s cannot be read (%s)", path, e)
    return None
  if saved is None:
    logging.info("recomputing reference logprobs: %s has no cache key (written by an older "
                 "alignax)", path)
  else:
    changed = sorted(k for k in set(key) | set(saved) if key.get(k) != saved.get(k))
    logging.info("recomputing reference logprobs: %s was computed for a different %s", path,
                 ", ".join(changed))
  return None
