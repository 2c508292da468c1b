"""Export: alignax params -> `config.json` + `model.safetensors` that transformers loads."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from alignax.models.config import ModelConfig
from alignax.models.hf.config_map import ARCHITECTURES, HFError, config_to_hf
from alignax.models.hf.safetensors_io import _safetensors
from alignax.models.hf.tensors import _flat_abstract, _flatten, rules_for


DTYPES = ("float32", "bfloat16", "float16")


def _shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
  """Tensors in name order, cut into files of at most `max_bytes` (a larger tensor alone)."""
  if not max_bytes:
    return [tensors]
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    n = tensors[name].nbytes
    if current and size + n > max_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += n
  return shards + ([current] if current else [])


def _write_weights(tensors: dict[str, np.ndarray], dst_dir: str, max_bytes: int | None) -> list[str]:
  """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
  save_file = _safetensors().numpy.save_file
  shards = _shards(tensors, max_bytes)
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(dst_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2)
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(dst_dir, name), metadata={"format": "pt"})
  return names


def export_hf(params, cfg: ModelConfig, dst_dir: str, architecture: str | None = None,
              tokenizer=None, *, dtype: str | None = None, max_shard_bytes: int | None = None,
              chat_template: str | None = None) -> str:
  """Writes `config.json` + safetensors weights that `AutoModelForCausalLM.from_pretrained` loads.

  Args:
    params: the model's params (`nnx.State` or its pure dict), fully addressable on this host.
    cfg: their ModelConfig.
    dst_dir: directory to write (created).
    architecture: see `config_to_hf` (default: from the config's style).
    tokenizer: optional alignax tokenizer: its bos/eos/pad ids go into config.json and
      generation_config.json, and an `HFTokenizer` is saved beside the weights (tokenizer.json
      with the added role markers, its chat template kept).
    dtype: "float32", "bfloat16" or "float16" to store (default: the params' own).
    max_shard_bytes: cut the weights into files of at most this size, with an index.
    chat_template: a Jinja chat template for tokenizer_config.json (default: the source
      tokenizer's own, if it has one).

  Returns:
    dst_dir.
  """
  hf = config_to_hf(cfg, architecture, tokenizer)
  if dtype is not None and dtype not in DTYPES:
    raise HFError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise HFError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the model's "
                  f"vocab_size ({cfg.vocab_size})")
  family, _ = ARCHITECTURES[hf["architectures"][0]]
  pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  _, expected = _flat_abstract(cfg)
  flat = _flatten(pure)
  for path, spec in expected.items():
    if path not in flat:
      raise HFError(f"params have no {path} (expected shape {tuple(spec.shape)} for this config)")
    if tuple(flat[path].shape) != tuple(spec.shape):
      raise HFError(f"param {path}: shape {tuple(flat[path].shape)}, the config implies {tuple(spec.shape)}")
  tensors: dict[str, np.ndarray] = {}
  for rule in rules_for(cfg, family):
    arrays = [np.asarray(jax.device_get(flat[p])) for p in rule.paths]
    if "{i}" in rule.hf:
      for i in range(cfg.n_layers):
        tensors[rule.hf.format(i=i)] = np.ascontiguousarray(rule.to_hf(*(a[i] for a in arrays)))
    else:
      tensors[rule.hf] = np.ascontiguousarray(rule.to_hf(*arrays))
  if dtype is not None:
    tensors = {k: v.astype(jax.numpy.dtype(dtype)) for k, v in tensors.items()}
  dt = next(iter(tensors.values())).dtype
  if hf["model_type"] == "qwen2" and not cfg.qkv_bias:
    # Qwen2 always has q/k/v biases: zeros give the same function.
    for name, n in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
      for i in range(cfg.n_layers):
        tensors[f"model.layers.{i}.self_attn.{name}_proj.bias"] = np.zeros(n * cfg.dim_per_head, dt)
  # The dtype the weights are stored in (params may have been cast since cfg was written).
  hf.update(torch_dtype=str(dt), dtype=str(dt))
  os.makedirs(dst_dir, exist_ok=True)
  _write_weights(tensors, dst_dir, max_shard_bytes)
  with open(os.path.join(dst_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None:
    stops = [int(i) for i in getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,)]
    generation = dict(bos_token_id=int(tokenizer.bos_id),
                      eos_token_id=stops[0] if len(stops) == 1 else stops,
                      pad_token_id=int(tokenizer.pad_id))
    with open(os.path.join(dst_dir, "generation_config.json"), "w", encoding="utf-8") as f:
      json.dump(generation, f, indent=2)
    if hasattr(tokenizer, "save"):
      tokenizer.save(dst_dir, chat_template=chat_template)
  return dst_dir
