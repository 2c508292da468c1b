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


def export_hf(params, cfg: ModelConfig, dst_dir: str, architecture: str | None = None,
              tokenizer=None) -> str:
  """Writes `config.json` + `model.safetensors` that `AutoModelForCausalLM.from_pretrained` loads.

  Args:
    params: the model's params (`nnx.State` or its pure dict), fully addressable on this host.
    cfg: their ModelConfig.
    dst_dir: directory to write (created).
    architecture: see `config_to_hf` (default: from the config's style).
    tokenizer: optional alignax tokenizer: its bos/eos/pad ids go into config.json, and an
      `HFTokenizer` is saved beside the weights (tokenizer.json with the added role markers).

  Returns:
    dst_dir.
  """
  save_file = _safetensors().numpy.save_file
  hf = config_to_hf(cfg, architecture, tokenizer)
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
  dt = np.asarray(flat["embed"]).dtype
  if hf["model_type"] == "qwen2" and not cfg.qkv_bias:
    # Qwen2 always has q/k/v biases: zeros give the same function.
    for name, n in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
      for i in range(cfg.n_layers):
        tensors[f"model.layers.{i}.self_attn.{name}_proj.bias"] = np.zeros(n * cfg.dim_per_head, dt)
  # The dtype the weights are stored in (params may have been cast since cfg was written).
  hf.update(torch_dtype=str(dt), dtype=str(dt))
  os.makedirs(dst_dir, exist_ok=True)
  save_file(tensors, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(dst_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None and hasattr(tokenizer, "save"):
    tokenizer.save(dst_dir)
  return dst_dir
