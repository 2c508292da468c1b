"""The keys every stage shares, their validation, and config I/O.

A config file under `configs/` builds on `base_config()` and adds its stage's section. Every
default lives here or in that file, so the resolved config written to WORKDIR shows the whole
experiment. Validation runs before anything compiles and names the offending key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any, Iterable

import ml_collections

from alignax.models.config import ModelConfig

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def model_section(**overrides) -> ConfigDict:
  """`model.*`: the fields of `ModelConfig` (its defaults: the 4.46M Llama-style CPU model)."""
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  fields.update(overrides)
  return ConfigDict(fields)


def base_config(stage: str, preset: str = "tiny") -> ConfigDict:
  """Keys shared by every stage, with their defaults."""
  c = ConfigDict()
  c.stage = stage
  c.preset = preset
  c.workdir = os.path.join("runs", f"{stage}_{preset}")
  c.seed = 0
  # "bytes", "world_bpe:<pieces>" (a BPE trained on the world), a SentencePiece "*.model", or a
  # Hugging Face "tokenizer.json". Stages that start from an export use the export's tokenizer.
  c.tokenizer = "bytes"

  c.model = model_section()

  c.data = ConfigDict()
  c.data.source = "world"  # "world" (the built-in task) or "files"
  c.data.train_files = ""  # comma-separated paths or globs
  c.data.eval_files = ""
  c.data.seq_len = 128
  c.data.bad_records = "error"  # "error" or "skip" (skipped records are counted in the logs)
  c.data.loader = "tfds"  # "tfds" (array_record datasets read by grain) or "memory"
  c.data.tfds_dir = ""  # where TFDS datasets are built; "" = $ALIGNAX_DATA_DIR or ~/.cache/alignax/tfds
  c.data.eval_records = 256  # with data.source="files" and no eval_files: hold out this many records
  c.data.chat_template = "markers"  # "markers" (role tokens) or "plain" ("User: ...\nAssistant: ...")

  c.optimizer = ConfigDict()
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = 1.0
  c.optimizer.warmup_steps = 50
  c.optimizer.schedule = "cosine"
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.decay_embeddings_and_norms = False

  c.train = ConfigDict()
  c.train.steps = 300
  c.train.batch_size = 16  # global, in sequences (or pairs)
  c.train.accum_steps = 1  # micro-batches per step; batch_size must be divisible by it
  c.train.log_every = 10
  c.train.eval_every = 100  # 0 = only at the end
  c.train.eval_batches = 8
  c.train.nonfinite = "skip"  # "skip" (count and go on) or "halt" (stop, keep the last good state)
  # under "skip": stop once more steps than this were non-finite (a count >= 1, or a fraction < 1
  # of train.steps), so a run that keeps failing ends with a message instead of a useless export
  c.train.max_nonfinite = 0.1
  c.train.resume = True
  # a resumed run whose config changed in a key that alters the data order, the model or the
  # numbers: "refuse" (listing the keys) or "allow" (logged)
  c.train.resume_changed = "refuse"
  c.train.progress = True

  c.parallel = ConfigDict()
  c.parallel.mode = "jit"  # "jit" (named shardings on a mesh) or "pmap"
  # -1 fills the remaining devices; `members` splits a vectorized sweep's members (alignax sweep --vectorize)
  c.parallel.mesh = ConfigDict(dict(members=1, data=-1, fsdp=1, tensor=1))
  # how a vectorized sweep's step runs its members: "vmap" (one batched program, for accelerators)
  # or "map" (lax.map: one member after another inside the one program; on CPU, where a member's
  # step already fills the cores, this keeps the single run's speed and still shares start-up,
  # data set-up and compilation)
  c.parallel.members_step = "vmap"
  c.parallel.distributed = ConfigDict(dict(coordinator="", num_processes=1, process_id=0))

  c.checkpoint = ConfigDict()
  c.checkpoint.every = 0  # steps between saves; 0 = only at the end (and on SIGTERM)
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  return c


def _check(ok: bool, key: str, msg: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {msg}")


def _one_of(cfg: ConfigDict, key: str, choices: Iterable[str]) -> None:
  value = _get(cfg, key)
  choices = tuple(choices)
  _check(value in choices, key, f"must be one of {choices}, got {value!r}")


def _finite_number(cfg: ConfigDict, key: str) -> float:
  value = _get(cfg, key)
  _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
         f"must be a number, got {value!r}")
  _check(math.isfinite(value), key, f"must be finite, got {value}")
  return float(value)


def _get(cfg: ConfigDict, key: str) -> Any:
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def validate_common(cfg: ConfigDict) -> ModelConfig:
  """Checks the shared keys; returns the model config. Raises ConfigError naming the key."""
  _check(bool(cfg.workdir), "workdir", "must be set (--config.workdir=DIR)")
  try:
    model = ModelConfig.from_mapping(cfg.model.to_dict())
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.{e}") from None
  _check(cfg.data.seq_len > 1, "data.seq_len", f"must be > 1, got {cfg.data.seq_len}")
  _check(cfg.data.seq_len <= model.max_seq_len, "data.seq_len",
         f"{cfg.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
  _one_of(cfg, "data.source", ("world", "files"))
  _check(cfg.data.source != "files" or bool(cfg.data.train_files), "data.train_files",
         "must name at least one file when data.source='files'")
  _one_of(cfg, "data.bad_records", ("error", "skip"))
  _one_of(cfg, "data.loader", ("tfds", "memory"))
  _one_of(cfg, "data.chat_template", ("markers", "plain"))
  _one_of(cfg, "optimizer.schedule", ("cosine", "linear", "constant"))
  validate_optimizer(cfg)
  _check(cfg.train.steps > 0, "train.steps", f"must be positive, got {cfg.train.steps}")
  _check(cfg.train.batch_size > 0, "train.batch_size", "must be positive")
  _check(cfg.train.accum_steps > 0, "train.accum_steps", "must be positive")
  _check(cfg.train.batch_size % cfg.train.accum_steps == 0, "train.accum_steps",
         f"batch_size={cfg.train.batch_size} is not divisible by accum_steps={cfg.train.accum_steps}")
  _check(cfg.train.log_every > 0, "train.log_every", "must be positive")
  _check(cfg.train.eval_every >= 0, "train.eval_every", "must be >= 0")
  _one_of(cfg, "train.nonfinite", ("skip", "halt"))
  if "max_nonfinite" in cfg.train:
    limit = _finite_number(cfg, "train.max_nonfinite")
    _check(limit > 0 and (limit < 1 or limit == int(limit)), "train.max_nonfinite",
           f"must be a fraction in (0, 1) of train.steps or a whole count >= 1, got {limit}")
  if "resume_changed" in cfg.train:
    _one_of(cfg, "train.resume_changed", ("refuse", "allow"))
  if "eval" in cfg:
    for key in ("num_prompts", "max_new_tokens", "batch_size", "samples_per_prompt"):
      if key in cfg.eval:
        _check(int(cfg.eval[key]) >= (0 if key == "num_prompts" else 1), f"eval.{key}",
               f"must be >= {0 if key == 'num_prompts' else 1}, got {cfg.eval[key]}")
  _one_of(cfg, "parallel.mode", ("jit", "pmap"))
  for axis in ("data", "fsdp", "tensor"):
    size = cfg.parallel.mesh[axis]
    _check(size == -1 or size >= 1, f"parallel.mesh.{axis}", f"must be -1 or >= 1, got {size}")
  _check(cfg.parallel.mesh.get("members", 1) >= 1, "parallel.mesh.members", "must be >= 1")
  if "members_step" in cfg.parallel:
    _one_of(cfg, "parallel.members_step", ("vmap", "map"))
  _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
  _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  return model


def validate_optimizer(cfg: ConfigDict) -> None:
  """`optimizer.*` values AdamW can use: finite, and in range (an infinite lr or eps=0 gives
  non-finite updates from finite gradients)."""
  lr = _finite_number(cfg, "optimizer.lr")
  _check(lr > 0, "optimizer.lr", f"must be positive, got {lr}")
  for key in ("b1", "b2"):
    value = _finite_number(cfg, f"optimizer.{key}")
    _check(0 <= value < 1, f"optimizer.{key}", f"must be in [0, 1), got {value}")
  eps = _finite_number(cfg, "optimizer.eps")
  _check(eps > 0, "optimizer.eps", f"must be positive (it keeps Adam's division finite), got {eps}")
  wd = _finite_number(cfg, "optimizer.weight_decay")
  _check(wd >= 0, "optimizer.weight_decay", f"must be >= 0, got {wd}")
  clip = _finite_number(cfg, "optimizer.clip_norm")
  _check(clip >= 0, "optimizer.clip_norm", f"must be >= 0 (0 = off), got {clip}")
  _check(0 <= _finite_number(cfg, "optimizer.min_lr_ratio") <= 1, "optimizer.min_lr_ratio",
         "must be in [0, 1]")
  _check(cfg.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")


def load_config_file(path: str, preset: str | None = None) -> ConfigDict:
  """Loads `get_config(preset)` from a config file path (what `--config=path:preset` does)."""
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_alignax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset) if preset is not None else module.get_config()


def config_key_exists(cfg: ConfigDict, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, (ConfigDict, dict)) or part not in node:
      return False
    node = node[part]
  return True


def suggest_keys(cfg: ConfigDict, dotted: str, limit: int = 3) -> list[str]:
  """Existing keys closest to a mistyped one, for the error message."""
  import difflib
  flat = list(flatten(cfg))
  return difflib.get_close_matches(dotted, flat, n=limit, cutoff=0.5)


def flatten(cfg, prefix: str = "") -> Iterable[str]:
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ConfigDict, dict)):
      yield from flatten(value, name + ".")
    else:
      yield name


def save_config(cfg: ConfigDict, workdir: str) -> str:
  """Writes the resolved config as `WORKDIR/config.json` (machine-readable, reloadable)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
  return path


def read_config(workdir: str) -> ConfigDict:
  """The resolved config a run wrote to `WORKDIR/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"no config.json in {workdir}: is it an alignax run directory?")
  with open(path, encoding="utf-8") as f:
    return ConfigDict(json.load(f))


def world_section(**overrides) -> ConfigDict:
  """`world.*`: the fields of `WorldConfig` (size and seed of the built-in alignment world)."""
  from alignax.tasks.world import WorldConfig
  fields = dataclasses.asdict(WorldConfig())
  fields.update(overrides)
  return ConfigDict(fields)


def world_config(section) -> "WorldConfig":  # noqa: F821 (imported lazily: tasks sit below config)
  """`WorldConfig` from a `world.*` section (also one read back from JSON, where tuples are lists)."""
  from alignax.tasks.world import WorldConfig
  values = dict(section.to_dict() if isinstance(section, ConfigDict) else section)
  if "pretrain_mix" in values:
    values["pretrain_mix"] = tuple((str(k), float(v)) for k, v in values["pretrain_mix"])
  try:
    return WorldConfig(**values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.world: {e}") from None
