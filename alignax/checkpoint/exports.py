"""Params-only exports, the hand-off between stages: WORKDIR/export holds params as a plain
nested dict and export.json (model config, tokenizer, stage, extras); never non-finite."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from alignax.errors import CheckpointError
from alignax.checkpoint.checkpointer import library_versions
from alignax.checkpoint.integrity import leaf_name
from alignax.models import lora
from alignax.models.config import ModelConfig


EXPORT_DIR = "export"
LORA_DIR = "lora"  # inside the export: a LoRA run's adapters on their own


def export_path(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, EXPORT_DIR))


def has_export(workdir: str) -> bool:
  return os.path.exists(os.path.join(export_path(workdir), "export.json"))


def save_export(workdir: str, params, *, model: ModelConfig, stage: str, tokenizer: str,
                extra: dict | None = None, chat_template: str = "markers") -> str:
  """Writes params (as a plain nested dict) and `export.json`; all processes call this.

  `export.json` is written last, so its presence marks a complete export. Params that are not
  all finite raise CheckpointError before anything is touched, so an earlier export survives.

  LoRA params are exported merged (W + (alpha / rank) A @ B: an ordinary export every later
  stage and command reads), and an LM's adapters are also written on their own to
  export/lora/ (`adapters.safetensors` with keys like "blocks/attn/wq/a", and `lora.json`), for
  `alignax export-hf --lora=peft`.
  """
  adapters = [a for path, a in lora.adapter_arrays(params) if path == ()]
  lora_meta = lora.describe(params) if adapters else None
  if lora.has_lora(params):
    params = lora.merged(params)
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  check_finite_export(workdir, pure)
  path = export_path(workdir)
  if jax.process_index() == 0 and os.path.exists(path):
    shutil.rmtree(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), pure)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    if adapters:
      write_adapters(os.path.join(path, LORA_DIR), adapters[0], lora_meta)
    meta = {"stage": stage, "tokenizer": tokenizer, "chat_template": chat_template,
            "model": _model_dict(model), "extra": extra or {}, "lora": lora_meta,
            "versions": library_versions(), "time": time.time()}
    tmp = os.path.join(path, "export.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2, default=str)
    os.replace(tmp, os.path.join(path, "export.json"))
  return path


def write_adapters(directory: str, adapters: dict, lora_meta: dict) -> None:
  """`adapters.safetensors` ({"blocks/<group>/<name>/a": [L, n_in, r], ".../b": [L, r, n_out]})
  and `lora.json` (rank, alpha, dropout, targets) in `directory`."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  groups = {name: lora.TARGETS[name][0] for name in adapters}
  flat = {f"blocks/{groups[name]}/{name}/{part}": np.asarray(jax.device_get(x))
          for name, ab in adapters.items() for part, x in ab.items()}
  save_file(flat, os.path.join(directory, "adapters.safetensors"))
  with open(os.path.join(directory, "lora.json"), "w", encoding="utf-8") as f:
    json.dump(lora_meta, f, indent=2)


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
