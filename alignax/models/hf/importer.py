"""Import: a local Hugging Face checkpoint directory -> (ModelConfig, params, info)."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from absl import logging

from alignax.models.config import DTYPES
from alignax.models.hf.config_map import (
  ARCHITECTURES,
  IGNORED_SUFFIXES,
  SKIPPED_PREFIXES,
  HFError,
  _read_json,
  config_from_hf,
)
from alignax.models.hf.safetensors_io import SafetensorsReader, weight_files
from alignax.models.hf.tensors import Rule, params_from_flat, rules_for
from alignax.models.lm import count_params


# Rows import adds for tokens a tokenizer added (chat markers): a few; thousands more means a
# tokenizer that does not belong to the checkpoint (or an id that would allocate gigabytes).
MAX_NEW_VOCAB_ROWS = 4096


# Gemma3ForConditionalGeneration's text-model prefixes: (the "model." names, lm_head.weight) as
# transformers saves them (the original layout) and as its modules name them.
TEXT_PREFIXES = (("language_model.model.", "language_model.lm_head.weight"),
                 ("model.language_model.", "lm_head.weight"))


def _stored_name(reader: SafetensorsReader, family: str, arch: str, src_dir: str) -> Callable[[str], str]:
  """Expected name -> stored name: the original GPT-2 checkpoints omit the "transformer." prefix;
  a Gemma3ForConditionalGeneration keeps its text model under one of TEXT_PREFIXES."""
  prefix = "transformer."
  if family == "gpt2" and prefix + "wte.weight" not in reader and "wte.weight" in reader:
    return lambda name: name[len(prefix):] if name.startswith(prefix) else name
  if arch == "Gemma3ForConditionalGeneration":
    found = [(p, head) for p, head in TEXT_PREFIXES if p + "embed_tokens.weight" in reader]
    if len(found) != 1:
      what = "both" if found else "neither"
      raise HFError(f"{src_dir}: {arch} text weights are ambiguous: {what} of "
                    f"{' / '.join(p + 'embed_tokens.weight' for p, _ in TEXT_PREFIXES)} found")
    (text, head), = found
    return lambda name: (head if name == "lm_head.weight"
                         else text + name[len("model."):] if name.startswith("model.") else name)
  return lambda name: name


def _layer_names(rule: Rule, n_layers: int) -> list[str]:
  return [rule.hf.format(i=i) for i in range(n_layers)] if "{i}" in rule.hf else [rule.hf]


def _check_tensors(reader, rules, stored, cfg, arch, src_dir) -> tuple[list[str], list[str], list[str]]:
  """(stored names used, stored names ignored, stored names skipped: a multimodal checkpoint's
  non-text tensors); HFError for a missing, misshapen or unexpected tensor. Runs on headers only,
  before any tensor is read (large checkpoints read slowly)."""
  wanted = []
  for rule in rules:
    for name in _layer_names(rule, cfg.n_layers):
      if stored(name) not in reader:
        raise HFError(f"{src_dir}: tensor {name!r} is missing (expected shape {rule.hf_shape} for "
                      f"{arch} with this config.json)")
      shape = reader.shape(stored(name))
      if shape != rule.hf_shape:
        raise HFError(f"{src_dir}: tensor {name!r} has shape {shape}, but config.json implies "
                      f"{rule.hf_shape}")
      wanted.append(stored(name))
  leftover = sorted(set(reader.names()) - set(wanted))
  skipped = []
  if arch == "Gemma3ForConditionalGeneration":
    skipped = [n for n in leftover if n.startswith(SKIPPED_PREFIXES)]
    leftover = [n for n in leftover if n not in set(skipped)]
  # A tied checkpoint may still store lm_head.weight; HF ignores it (ties to the embedding) too.
  ignored = [n for n in leftover
             if n.endswith(IGNORED_SUFFIXES) or (cfg.tie_embeddings and n == stored("lm_head.weight"))]
  unexpected = [n for n in leftover if n not in ignored]
  if unexpected:
    raise HFError(f"{src_dir}: tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} have "
                  f"no place in alignax's {arch} mapping (a variant alignax does not implement)")
  return wanted, ignored, skipped


def _read_tensors(reader, rules, stored, n_layers: int, target, adjust=None) -> dict[str, np.ndarray]:
  """{alignax path: array in `target` dtype}, per-layer tensors stacked on a leading axis.

  `adjust(path, layer, x) -> x`, when given, rewrites each per-layer tensor before the cast (a
  merged adapter, added to the checkpoint's own values so the result is rounded once)."""
  flat: dict[str, np.ndarray] = {}
  for rule in rules:
    per_path = [[] for _ in rule.paths]
    for i, name in enumerate(_layer_names(rule, n_layers)):
      for path, acc, x in zip(rule.paths, per_path, rule.to_alignax(reader.get(stored(name)))):
        if adjust is not None and "{i}" in rule.hf:
          x = adjust(path, i, x)
        acc.append(np.ascontiguousarray(x.astype(target)))  # cast per tensor: one copy at a time
    for path, acc in zip(rule.paths, per_path):
      flat[path] = np.stack(acc) if "{i}" in rule.hf else acc[0]
  return flat


def import_hf(src_dir: str, dtype: str = "float32", *, pad_vocab_to: int | None = None,
              mean_init_ids: Sequence[int] = (), max_seq_len: int | None = None,
              adapter: str | None = None):
  """Reads a local Hugging Face checkpoint into alignax params.

  Args:
    src_dir: directory with `config.json` and `model.safetensors` (or shards listed by
      `model.safetensors.index.json`).
    dtype: alignax parameter dtype ("float32", "bfloat16", "float16"), or "auto" for the
      checkpoint's own (`torch_dtype` / `dtype` in config.json).
    pad_vocab_to: grow the vocabulary to at least this many rows (e.g. a tokenizer that added
      chat markers); new embedding rows (and untied lm_head columns) are the mean embedding
      (column), a neutral start that keeps the new tokens' logits at the average.
    mean_init_ids: existing rows to reset to the mean the same way (markers a tokenizer added
      inside a vocabulary the checkpoint already padded, as Qwen2's is).
    max_seq_len: alignax max_seq_len (default: the checkpoint's max positions).
    adapter: a PEFT LoRA adapter directory (`alignax.models.hf.peft`) to merge into the weights:
      W + lora_alpha / r * A @ B, computed in float32 from the checkpoint's values and stored in
      `dtype`.

  Returns:
    (cfg, params, info): the ModelConfig; an `nnx.State` shaped like `abstract_lm(cfg)`; a dict
    with architecture, model_type, num_params, dtype, source_dtypes, files, hf_vocab_size,
    ignored_tensors, skipped_tensors and skipped_params (a multimodal checkpoint's vision tower
    and projector, not imported), hf_config and adapter (None, or {path,
    base_model_name_or_path, rank, alpha, targets}).
  """
  src_dir = os.path.abspath(src_dir)
  hf = _read_json(os.path.join(src_dir, "config.json"))
  if dtype == "auto":
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
  if dtype not in DTYPES:
    raise HFError(f"dtype must be one of {DTYPES} or 'auto', got {dtype!r}")
  where = os.path.join(src_dir, "config.json")
  cfg, arch = config_from_hf(hf, dtype, max_seq_len=max_seq_len, where=where)
  family, model_type = ARCHITECTURES[arch]
  files = weight_files(src_dir)
  hf_positions = int(hf["n_positions"]) if family == "gpt2" else None
  rules = rules_for(cfg, family, hf_positions)
  adjust, adapter_info = None, None
  if adapter is not None:
    # Read and checked before the (possibly large) base, so a bad adapter fails fast.
    adjust, adapter_info = _adapter_merger(adapter, cfg)
  with SafetensorsReader(files) as reader:
    # A config.json with absurd sizes is refused before anything is built from it.
    implied, held = cfg.num_params(), reader.nbytes()
    if implied > held:
      raise HFError(f"{where}: the config implies {implied:,} parameters, but the weight files hold "
                    f"only {held:,} bytes of tensors")
    stored = _stored_name(reader, family, arch, src_dir)
    wanted, ignored, skipped = _check_tensors(reader, rules, stored, cfg, arch, src_dir)
    skipped_params = sum(int(np.prod(reader.shape(n))) for n in skipped)
    if skipped:
      logging.info("%s: skipped %d tensors (%s params) outside the text model (vision tower, "
                   "multimodal projector)", src_dir, len(skipped), f"{skipped_params:,}")
    source_dtypes = sorted({reader.dtype(n) for n in wanted})
    flat = _read_tensors(reader, rules, stored, cfg.n_layers, jnp.dtype(dtype), adjust)

  hf_vocab = cfg.vocab_size
  new_vocab = max(hf_vocab, int(pad_vocab_to or 0))
  if new_vocab - hf_vocab > MAX_NEW_VOCAB_ROWS:
    raise HFError(f"the tokenizer needs a vocabulary of {new_vocab:,}, {new_vocab - hf_vocab:,} rows "
                  f"more than the checkpoint's {hf_vocab:,} (at most {MAX_NEW_VOCAB_ROWS:,} new rows, "
                  "for added chat markers): is it this checkpoint's tokenizer?")
  if new_vocab > hf_vocab or len(mean_init_ids):
    cfg = dataclasses.replace(cfg, vocab_size=new_vocab)
    flat = _grow_vocab(flat, hf_vocab, new_vocab, mean_init_ids)

  params = params_from_flat(cfg, flat)
  info = dict(architecture=arch, model_type=model_type, num_params=count_params(params), dtype=dtype,
              source_dtypes=source_dtypes, files=files, hf_vocab_size=hf_vocab,
              vocab_size=cfg.vocab_size, ignored_tensors=ignored, skipped_tensors=skipped,
              skipped_params=skipped_params, hf_config=hf, adapter=adapter_info)
  return cfg, params, info


def _adapter_merger(adapter_dir: str, cfg) -> tuple[Callable, dict]:
  """(adjust for `_read_tensors`, info) of a PEFT adapter on the model of `cfg`."""
  from alignax.models.hf.peft import CONFIG_FILE, layer_delta, read_peft_adapter
  from alignax.models.lora import TARGETS
  adapter_dir = os.path.abspath(adapter_dir)
  adapters, lora_cfg = read_peft_adapter(adapter_dir, cfg)
  by_path = {f"blocks/{TARGETS[name][0]}/{name}": ab
             for group in adapters["blocks"].values() for name, ab in group.items()}

  def adjust(path: str, layer: int, x: np.ndarray) -> np.ndarray:
    if path not in by_path:
      return x
    return x.astype(np.float32) + layer_delta(by_path[path], lora_cfg.scale, layer, x.shape)

  base = _read_json(os.path.join(adapter_dir, CONFIG_FILE)).get("base_model_name_or_path")
  info = dict(path=adapter_dir, base_model_name_or_path=base, rank=lora_cfg.rank,
              alpha=lora_cfg.alpha, targets=lora_cfg.targets)
  return adjust, info


def _grow_vocab(flat: dict[str, np.ndarray], old: int, new: int, mean_ids: Sequence[int]) -> dict:
  """Embedding rows (and untied lm_head columns) old..new-1 and `mean_ids` set to the mean."""
  out = dict(flat)
  ids = sorted({int(i) for i in mean_ids if 0 <= int(i) < old})
  for path, axis in (("embed", 0), ("lm_head", 1)):
    if path not in flat:
      continue
    w = flat[path]
    mean = w.astype(np.float32).mean(axis=axis, keepdims=True).astype(w.dtype)
    extra = np.repeat(mean, new - old, axis=axis)
    w = np.concatenate([w, extra], axis=axis)
    if ids:
      index = (ids, slice(None)) if axis == 0 else (slice(None), ids)
      w[index] = mean
    out[path] = w
  return out
