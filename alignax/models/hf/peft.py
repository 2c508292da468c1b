"""PEFT LoRA adapters <-> alignax's adapter layout (`alignax.models.lora`).

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, whose
tensors for layer i of a Llama-family (or Gemma 2/3) model are

  base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
  base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

with lora_A [r, in_features], lora_B [out_features, r] and the update W_hf += (lora_alpha / r)
* lora_B @ lora_A. alignax's weights are the transposes of HF's ([in, out] against torch's
[out, in], see `tensors`; no head permutation), and its update is W += (alpha / rank) * A @ B
with A [n_in, r], B [r, n_out]. Transposing the HF update gives (B_hf @ A_hf).T = A_hf.T @ B_hf.T,
so

  lora_A.weight = A[i].T    [r, n_in]       lora_B.weight = B[i].T    [n_out, r]

and the scale is the same number. Only plain LoRA maps: rsLoRA (alpha / sqrt(r)), DoRA, per-module
ranks or alphas, LoRA biases, extra trained modules (`modules_to_save`) and GPT-2's fused
`c_attn` are refused with the field that asks for them. An alignax run's own adapters
(`load_adapters`) live in `WORKDIR/export/lora/`: adapters.safetensors (flat keys
"blocks/attn/wq/a", ...) and lora.json (the LoraConfig fields and `scale`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from alignax.models.config import ModelConfig
from alignax.models.hf.config_map import ARCHITECTURES, HFError, _read_json, config_to_hf
from alignax.models.hf.safetensors_io import SafetensorsReader, _safetensors
from alignax.models.hf.tensors import _flat_abstract
from alignax.models.lora import HF_NAMES, TARGETS, LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers."
LORA_DIR = "lora"  # under a run's export directory
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_HF_GROUP = {"attn": "self_attn", "mlp": "mlp"}
# adapter_config.json fields that only say how the adapter was initialised: the saved tensors
# are what they are, so these never change the function.
_INIT_ONLY = ("loftq_config", "eva_config", "corda_config", "lora_ga_config")
# init_lora_weights values that rewrite the base weights too (the adapter alone is then not an
# update of the original base, unless PEFT converted it back on save).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
# Fields that must be empty / null / false: each changes the math or the modules PEFT builds.
_MUST_BE_UNSET = ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
                  "layers_pattern", "exclude_modules", "layer_replication", "target_parameters",
                  "trainable_token_indices", "alora_invocation_tokens", "lora_bias", "megatron_config",
                  "arrow_config", "fan_in_fan_out")


def _check_family(cfg: ModelConfig, what: str) -> None:
  """HFError unless `cfg` exports as an architecture with separate q/k/v projections named as
  Llama's (Llama, Mistral, Qwen2/3, Gemma 2/3: the same `_linear` rules in `tensors`)."""
  family, _ = ARCHITECTURES[config_to_hf(cfg)["architectures"][0]]
  if family not in ("llama", "gemma"):
    raise HFError(f"{what}: PEFT adapters map to Llama-family and Gemma models only (Llama, "
                  "Mistral, Qwen2, Qwen3, Gemma 2/3); GPT-2's fused c_attn has no per-projection "
                  "adapter in alignax")


def _weight_widths(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """{alignax name: (n_in, n_out)} of the targets this model has, from its param shapes."""
  _, flat = _flat_abstract(cfg)
  out = {}
  for name, (group, n_axes, _) in TARGETS.items():
    spec = flat.get(f"blocks/{group}/{name}")
    if spec is not None:
      shape = tuple(spec.shape)[1:]  # drop the layer axis
      out[name] = (int(np.prod(shape[:n_axes])), int(np.prod(shape[n_axes:])))
  return out


def _flat_adapters(adapters) -> dict[str, dict]:
  """{"wq": {"a", "b"}} from that form or from {"blocks": {group: {name: {"a", "b"}}}}."""
  if "blocks" in adapters:
    return {name: ab for group in adapters["blocks"].values() for name, ab in group.items()}
  return dict(adapters)


def _nested(flat: dict[str, dict]) -> dict:
  """{"blocks": {group: {name: {"a", "b"}}}} (TARGETS order) from {"wq": {"a", "b"}}."""
  out: dict = {}
  for name, (group, _, _) in TARGETS.items():
    if name in flat:
      out.setdefault(group, {})[name] = flat[name]
  return {"blocks": out}


def _number(x: float):
  """An int when the value is one (PEFT writes r and lora_alpha as ints)."""
  return int(x) if float(x).is_integer() else float(x)


def write_peft_adapter(out_dir: str, adapters_by_name, lora_cfg: LoraConfig, model_cfg: ModelConfig,
                       base_model: str | None = None) -> str:
  """Writes a PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained(hf_model, out_dir)`
  loads onto the HF export of the base model.

  Args:
    out_dir: directory to write (created): adapter_config.json + adapter_model.safetensors.
    adapters_by_name: {"wq": {"a": [L, n_in, r], "b": [L, r, n_out]}, ...} (arrays; the second
      element of `lora.adapter_arrays`), or the nested {"blocks": {group: {...}}} form.
    lora_cfg: the run's LoraConfig (rank, alpha, dropout).
    model_cfg: the base model's config (shapes are checked against it).
    base_model: `base_model_name_or_path` (a hub id or the base's directory), or None.

  Returns:
    out_dir.
  """
  _check_family(model_cfg, "write_peft_adapter")
  adapters = _flat_adapters(adapters_by_name)
  widths = _weight_widths(model_cfg)
  unknown = sorted(set(adapters) - set(widths))
  if unknown:
    raise HFError(f"adapters for {unknown}: this model has no such projection (it has {sorted(widths)})")
  if not adapters:
    raise HFError("write_peft_adapter: no adapters to write")
  r, layers = lora_cfg.rank, model_cfg.n_layers
  tensors: dict[str, np.ndarray] = {}
  for name in (n for n in TARGETS if n in adapters):
    group, _, hf_name = TARGETS[name]
    a, b = (np.asarray(adapters[name][k]) for k in ("a", "b"))
    n_in, n_out = widths[name]
    if a.shape != (layers, n_in, r) or b.shape != (layers, r, n_out):
      raise HFError(f"adapter {name}: a {a.shape}, b {b.shape}; rank {r} on this model needs "
                    f"a {(layers, n_in, r)}, b {(layers, r, n_out)}")
    for i in range(layers):
      module = f"{PREFIX}{i}.{_HF_GROUP[group]}.{hf_name}"
      tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, n_in]
      tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [n_out, r]
  targets = [TARGETS[n][2] for n in TARGETS if n in adapters]
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": r, "lora_alpha": _number(lora_cfg.alpha), "lora_dropout": float(lora_cfg.dropout),
      "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "use_dora": False, "lora_bias": False, "modules_to_save": None, "rank_pattern": {},
      "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
      "init_lora_weights": True, "inference_mode": True, "revision": None,
  }
  os.makedirs(out_dir, exist_ok=True)
  _safetensors().numpy.save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return out_dir


def _check_config(config: dict, where: str) -> None:
  """HFError naming the field of an adapter_config.json alignax cannot reproduce exactly."""
  if config.get("peft_type") != "LORA":
    raise HFError(f"{where}: peft_type {config.get('peft_type')!r} is unsupported (only 'LORA')")
  task = config.get("task_type")
  if task not in (None, "CAUSAL_LM"):
    raise HFError(f"{where}: task_type {task!r} is unsupported (only CAUSAL_LM)")
  if config.get("bias", "none") != "none":
    raise HFError(f"{where}: bias={config['bias']!r} is unsupported (only 'none': alignax's "
                  "adapters train no biases)")
  for key, value in config.items():
    # use_rslora, use_dora, use_qalora, ...: each a variant with a different update.
    if key.startswith("use_") and value:
      raise HFError(f"{where}: {key}={value} is unsupported (alignax implements plain LoRA, "
                    "update = lora_alpha / r * B @ A)")
    if key.endswith("_config") and key not in _INIT_ONLY and key not in _MUST_BE_UNSET and value:
      raise HFError(f"{where}: {key} is set ({value!r}); alignax implements plain LoRA only")
  for key in _MUST_BE_UNSET:
    if config.get(key):
      raise HFError(f"{where}: {key}={config[key]!r} is unsupported (alignax's adapters are plain "
                    "LoRA on every layer, one rank and alpha, nothing else trained)")
  init = config.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
    raise HFError(f"{where}: init_lora_weights={init!r} rewrote the base weights too: convert the "
                  "adapter to plain LoRA first (PEFT's path_initial_model_for_weight_conversion)")
  for key in ("r", "lora_alpha"):
    if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
      raise HFError(f"{where}: {key} must be a positive number, got {config.get(key)!r}")


def _listed_targets(config: dict, model_names: tuple[str, ...], where: str) -> set[str] | None:
  """alignax names `target_modules` lists, or None for a pattern (the tensors decide)."""
  targets = config.get("target_modules")
  if targets == "all-linear":
    return set(model_names)
  if isinstance(targets, str):
    return None  # a regular expression over module paths: read from the tensors
  if not isinstance(targets, list) or not targets:
    raise HFError(f"{where}: target_modules must name modules, got {targets!r}")
  # PEFT matches a name, or a module path by its end ("all-linear" is saved expanded to paths,
  # "model.layers.0.self_attn.q_proj"); which layers carry one is checked on the tensors.
  last = {t: str(t).rsplit(".", 1)[-1] for t in targets}
  unknown = [t for t, hf in last.items() if hf not in HF_NAMES or HF_NAMES[hf] not in model_names]
  if unknown:
    known = ", ".join(TARGETS[n][2] for n in model_names)
    raise HFError(f"{where}: target_modules {unknown} have no alignax adapter (alignax maps {known})")
  return {HF_NAMES[hf] for hf in last.values()}


def read_peft_adapter(src_dir: str, model_cfg: ModelConfig) -> tuple[dict, LoraConfig]:
  """Reads a PEFT LoRA adapter directory into alignax's adapter layout.

  Args:
    src_dir: directory with adapter_config.json and adapter_model.safetensors.
    model_cfg: the base model's ModelConfig (a Llama-family or Gemma import).

  Returns:
    (adapters, lora_cfg): {"blocks": {group: {name: {"a": float32 [L, n_in, r], "b": float32
    [L, r, n_out]}}}} (numpy), and the LoraConfig (rank, alpha, dropout, targets as alignax names).
    HFError for anything alignax cannot reproduce exactly, naming the file and field or tensor.
  """
  src_dir = os.path.abspath(src_dir)
  where = os.path.join(src_dir, CONFIG_FILE)
  if not os.path.isfile(where):
    raise HFError(f"{src_dir}: not a PEFT adapter directory ({CONFIG_FILE} not found)")
  config = _read_json(where)
  _check_config(config, where)
  _check_family(model_cfg, where)
  widths = _weight_widths(model_cfg)
  listed = _listed_targets(config, tuple(widths), where)
  r, layers = int(config["r"]), model_cfg.n_layers
  weights = os.path.join(src_dir, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    pickled = os.path.isfile(os.path.join(src_dir, "adapter_model.bin"))
    raise HFError(f"{src_dir}: {WEIGHTS_FILE} not found" + (
        " (only the pickle adapter_model.bin, which alignax does not read: save with "
        "safe_serialization=True)" if pickled else ""))
  by_module: dict[tuple[str, int], dict[str, np.ndarray]] = {}
  hf_to_name = {(_HF_GROUP[g], hf): n for n, (g, _, hf) in TARGETS.items() if n in widths}
  with SafetensorsReader([weights]) as reader:
    for key in reader.names():
      m = _KEY.match(key)
      if not m or (m.group(2), m.group(3)) not in hf_to_name:
        raise HFError(f"{weights}: tensor {key!r} has no place in alignax's adapters (it maps "
                      f"{PREFIX}{{i}}.{{self_attn,mlp}}.<proj>.lora_{{A,B}}.weight)")
      i, name = int(m.group(1)), hf_to_name[(m.group(2), m.group(3))]
      if i >= layers:
        raise HFError(f"{weights}: tensor {key!r} is for layer {i}, but the model has {layers} layers")
      n_in, n_out = widths[name]
      want = (r, n_in) if m.group(4) == "A" else (n_out, r)
      if reader.shape(key) != want:
        raise HFError(f"{weights}: tensor {key!r} has shape {reader.shape(key)}, but r={r} on this "
                      f"model needs {want}")
      by_module.setdefault((name, i), {})[m.group(4)] = reader.get(key).astype(np.float32)
  found = {name for name, _ in by_module}
  if listed is not None and found - listed:
    raise HFError(f"{weights}: adapters for {sorted(TARGETS[n][2] for n in found - listed)}, which "
                  f"target_modules ({config['target_modules']}) does not list")
  expected = listed if listed is not None else found
  if not expected:
    raise HFError(f"{weights}: holds no LoRA tensors")
  flat = {}
  for name in (n for n in TARGETS if n in expected):
    hf_name = f"{_HF_GROUP[TARGETS[name][0]]}.{TARGETS[name][2]}"
    for i in range(layers):
      for part in ("A", "B"):
        if part not in by_module.get((name, i), {}):
          raise HFError(f"{weights}: tensor {PREFIX}{i}.{hf_name}.lora_{part}.weight is missing "
                        f"(alignax's adapters cover every layer of each target)")
    a = np.stack([by_module[(name, i)]["A"].T for i in range(layers)])  # [L, n_in, r]
    b = np.stack([by_module[(name, i)]["B"].T for i in range(layers)])  # [L, r, n_out]
    flat[name] = {"a": np.ascontiguousarray(a), "b": np.ascontiguousarray(b)}
  dropout = float(config.get("lora_dropout") or 0.0)
  lora_cfg = LoraConfig(rank=r, alpha=float(config["lora_alpha"]), dropout=dropout,
                        targets=",".join(flat))
  lora_cfg.validate()
  return _nested(flat), lora_cfg


def layer_delta(ab: dict, scale: float, layer: int, shape: tuple[int, ...]) -> np.ndarray:
  """scale * A[layer] @ B[layer] in float32, reshaped to one layer's weight `shape`."""
  a = np.asarray(ab["a"][layer], np.float32)
  b = np.asarray(ab["b"][layer], np.float32)
  return (scale * (a @ b)).reshape(shape)


def merge_peft_into(params: dict, adapters, lora_cfg: LoraConfig) -> dict:
  """A pure params dict with the adapters folded in: W + (alpha / rank) A @ B, computed in
  float32 and stored in W's dtype. `params` is not changed (untouched leaves are shared).

  Args:
    params: {"blocks": {"attn": {"wq": [L, d, H, Dh], ...}, ...}, ...} (numpy or jax arrays).
    adapters: as `read_peft_adapter` returns (either form `write_peft_adapter` takes).
    lora_cfg: gives the scale.
  """
  out = {**params, "blocks": {g: dict(v) for g, v in params["blocks"].items()}}
  for name, ab in _flat_adapters(adapters).items():
    group = TARGETS[name][0]
    w = np.asarray(params["blocks"][group][name])
    merged = [(w[i].astype(np.float32) + layer_delta(ab, lora_cfg.scale, i, w.shape[1:])).astype(w.dtype)
              for i in range(w.shape[0])]
    out["blocks"][group][name] = np.stack(merged)
  return out


def load_adapters(export_dir: str) -> tuple[dict, LoraConfig]:
  """(adapters, LoraConfig) of a LoRA run's export directory (`WORKDIR/export`):
  `lora/adapters.safetensors`
  (flat keys "blocks/attn/wq/a", ...) and `lora.json` ({"rank", "alpha", "dropout", "targets"},
  plus `scale`, checked against alpha / rank). HFError when the run has no adapters."""
  root = os.path.join(export_dir, LORA_DIR)
  weights, meta = os.path.join(root, "adapters.safetensors"), os.path.join(root, "lora.json")
  if not os.path.isfile(weights) or not os.path.isfile(meta):
    raise HFError(f"{export_dir}: the export has no LoRA adapters ({root}/adapters.safetensors and "
                  "lora.json): it was not trained with model.lora.rank > 0")
  values = _read_json(meta)
  fields = {f.name for f in dataclasses.fields(LoraConfig)}
  try:
    lora_cfg = LoraConfig.from_mapping({k: v for k, v in values.items() if k in fields})
  except (TypeError, ValueError) as e:
    raise HFError(f"{meta}: {e}") from None
  if not lora_cfg.enabled:
    raise HFError(f"{meta}: rank {lora_cfg.rank}: no adapters")
  if "scale" in values and not np.isclose(float(values["scale"]), lora_cfg.scale, rtol=1e-6):
    raise HFError(f"{meta}: scale {values['scale']} is not alpha / rank = {lora_cfg.scale}")
  flat: dict[str, dict] = {}
  with SafetensorsReader([weights]) as reader:
    for key in reader.names():
      parts = key.split("/")
      if (len(parts) != 4 or parts[0] != "blocks" or parts[2] not in TARGETS
          or TARGETS[parts[2]][0] != parts[1] or parts[3] not in ("a", "b")):
        raise HFError(f"{weights}: unexpected tensor {key!r} (expected blocks/<group>/<name>/<a|b>)")
      flat.setdefault(parts[2], {})[parts[3]] = reader.get(key)
  incomplete = sorted(n for n, ab in flat.items() if set(ab) != {"a", "b"})
  if incomplete:
    raise HFError(f"{weights}: {incomplete} lack their a or b factor")
  return _nested(flat), lora_cfg
