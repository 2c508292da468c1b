"""The keys every stage shares, their validation, and config I/O.

A config file under `configs/` builds on `base_config()` and adds its stage's section. Every
default lives here or in that file, so the resolved config written to WORKDIR shows the whole
experiment. Validation runs before anything compiles and names the offending key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Iterable

import ml_collections

from alignax.checkpoint import CheckpointConfig
from alignax.data.config import DataConfig
from alignax.errors import ConfigError
from alignax.sections import require
from alignax.models.config import ModelConfig
from alignax.models.lora import LoraConfig
from alignax.parallel import ParallelConfig
from alignax.tasks.world import WorldConfig
from alignax.train.config import EvalConfig, OptimizerConfig, TrainConfig

ConfigDict = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The shared sections of a stage's config, typed and validated (`resolve`).

  Code below the runner (the loop, the data pipelines, the checkpointer, the placements, the
  evaluators) receives these, never the ConfigDict. An algorithm's own section (`dpo.*`,
  `ppo.*`, ...) is read by its module, which validates it.
  """

  stage: str
  preset: str
  workdir: str
  seed: int
  tokenizer: str
  model: ModelConfig
  train: TrainConfig
  data: DataConfig
  optimizer: OptimizerConfig
  checkpoint: CheckpointConfig
  parallel: ParallelConfig
  eval: EvalConfig
  world: WorldConfig | None = None  # the built-in world's `world.*`, when the config has one
  lora: LoraConfig = LoraConfig()  # `model.lora.*`: adapters instead of full fine-tuning


def section(cls, **overrides) -> ConfigDict:
  """The ConfigDict section of a typed config class, from its defaults (nested ones included)."""
  values = {}
  for f in dataclasses.fields(cls):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(default):
      default = section(type(default), **dataclasses.asdict(default))
    elif isinstance(default, tuple) and f.name.endswith("_files"):
      default = ",".join(default)  # comma-separated on the command line
    values[f.name] = default
  values.update(overrides)
  return ConfigDict(values)


def model_section(**overrides) -> ConfigDict:
  """`model.*`: the fields of `ModelConfig` (its defaults: the 4.46M Llama-style CPU model),
  and `model.lora.*` (`LoraConfig`: off by default)."""
  lora = section(LoraConfig, **overrides.pop("lora", {}))
  c = section(ModelConfig, **overrides)
  c.lora = lora
  return c


def split_model_section(model) -> tuple[ModelConfig, LoraConfig]:
  """(ModelConfig, LoraConfig) of a `model.*` section (a ConfigDict or dict)."""
  values = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  return ModelConfig.from_mapping({k: v for k, v in values.items() if k != "lora"}), \
      LoraConfig.from_mapping(values.get("lora"))


def eval_section(**overrides) -> ConfigDict:
  """`eval.*`: every evaluation a run does (`EvalConfig`)."""
  return section(EvalConfig, **overrides)


def base_config(stage: str, preset: str = "tiny") -> ConfigDict:
  """Keys shared by every stage, with their defaults (documented on their typed classes:
  `TrainConfig`, `DataConfig`, `OptimizerConfig`, `CheckpointConfig`, `ParallelConfig`,
  `EvalConfig`, `ModelConfig`)."""
  c = ConfigDict()
  c.stage = stage
  c.preset = preset
  c.workdir = os.path.join("runs", f"{stage}_{preset}")
  c.seed = 0
  # "bytes", "world_bpe:<pieces>" (a BPE trained on the world), a SentencePiece "*.model", or a
  # Hugging Face "tokenizer.json". Stages that start from an export use the export's tokenizer.
  c.tokenizer = "bytes"
  c.model = model_section()
  c.data = section(DataConfig)
  c.optimizer = section(OptimizerConfig)
  c.train = section(TrainConfig)
  c.eval = eval_section()
  c.parallel = section(ParallelConfig)
  c.checkpoint = section(CheckpointConfig)
  return c


# Keys that moved; a config file or saved config.json that still sets them is read with a warning.
RENAMED = {"train.eval_every": "eval.every", "train.eval_batches": "eval.batches"}


def get_key(cfg, dotted: str, default: Any = None) -> Any:
  """The value at a dotted key, or `default` when any part of it is missing."""
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, (ConfigDict, dict)) or part not in node:
      return default
    node = node[part]
  return node


def migrate(cfg: ConfigDict) -> ConfigDict:
  """Moves renamed keys (`RENAMED`) to their new place, in place, with a warning each (also in a
  pipeline config's stage sections)."""
  from absl import logging
  for value in cfg.values():
    if isinstance(value, ConfigDict) and "stage" in value:
      migrate(value)
  for old, new in RENAMED.items():
    value = get_key(cfg, old, dataclasses.MISSING)
    if value is dataclasses.MISSING:
      continue
    logging.warning("config.%s is deprecated: use config.%s", old, new)
    parent_old, _, leaf_old = old.rpartition(".")
    parent_new, _, leaf_new = new.rpartition(".")
    with cfg.unlocked():
      if parent_new not in cfg:
        cfg[parent_new] = eval_section() if parent_new == "eval" else ConfigDict()
      del cfg[parent_old][leaf_old]
      cfg[parent_new][leaf_new] = value
  return cfg


def resolve(cfg: ConfigDict) -> RunConfig:
  """The typed, validated shared sections of a stage's config. Raises ConfigError naming the key."""
  require(bool(cfg.get("workdir")), "workdir", "must be set (--config.workdir=DIR)")
  try:
    model, lora = split_model_section(cfg.model)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.{e}") from None
  data = DataConfig.from_mapping(cfg.data)
  require(data.seq_len <= model.max_seq_len, "data.seq_len",
          f"{data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
  require(data.pair_len <= model.max_seq_len, "data.pair_len",
          f"{data.pair_len} exceeds model.max_seq_len={model.max_seq_len}")
  return RunConfig(
      stage=str(cfg.stage), preset=str(cfg.get("preset", "")), workdir=str(cfg.workdir),
      seed=int(cfg.seed), tokenizer=str(cfg.get("tokenizer", "bytes")), model=model,
      train=TrainConfig.from_mapping(cfg.train), data=data,
      optimizer=OptimizerConfig.from_mapping(cfg.optimizer),
      checkpoint=CheckpointConfig.from_mapping(cfg.checkpoint),
      parallel=ParallelConfig.from_mapping(cfg.parallel),
      eval=EvalConfig.from_mapping(cfg.get("eval") or {}),
      world=WorldConfig.from_mapping(cfg.world) if "world" in cfg else None, lora=lora)


def load_config_file(path: str, preset: str | None = None) -> ConfigDict:
  """Loads `get_config(preset)` from a config file path (what `--config=path:preset` does)."""
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_alignax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(preset) if preset is not None else module.get_config()
  return migrate(cfg)


def config_key_exists(cfg: ConfigDict, dotted: str) -> bool:
  return get_key(cfg, dotted, dataclasses.MISSING) is not dataclasses.MISSING


def canonical_key(cfg: ConfigDict, dotted: str) -> str | None:
  """The key a `--config.<dotted>` override means, or None when there is none: the key itself; a
  renamed key's new name (`RENAMED`, also under a pipeline's stage: `sft.train.eval_every`); in
  a pipeline config, a stage's own hyperparameter without its section (`dpo.beta` for
  `dpo.dpo.beta`: each stage's section is named like the stage)."""
  if config_key_exists(cfg, dotted):
    return dotted
  for old, new in RENAMED.items():
    if dotted == old or dotted.endswith("." + old):
      candidate = dotted[: len(dotted) - len(old)] + new
      if config_key_exists(cfg, candidate):
        return candidate
  head, _, rest = dotted.partition(".")
  if cfg.get("stage") == "pipeline" and rest and isinstance(cfg.get(head), ConfigDict):
    candidate = f"{head}.{head}.{rest}"
    if config_key_exists(cfg, candidate):
      return candidate
  return None


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
    return migrate(ConfigDict(json.load(f)))


def world_section(**overrides) -> ConfigDict:
  """`world.*`: the fields of `WorldConfig` (size and seed of the built-in alignment world)."""
  fields = dataclasses.asdict(WorldConfig())
  fields.update(overrides)
  return ConfigDict(fields)


def world_config(section) -> WorldConfig:
  """`WorldConfig` from a `world.*` section (`WorldConfig.from_mapping`)."""
  return WorldConfig.from_mapping(section)
