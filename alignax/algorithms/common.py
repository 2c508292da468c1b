"""Pieces several stages share: per-process batching options and datasets, LM state init,
loading an LM export."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from alignax import parallel
from alignax.data.batching import BatchOptions
from alignax.data.datasets import Datasets, get_datasets
from alignax.models import LanguageModel, abstract_lm, build_lm
from alignax.models import lora
from alignax.models.config import ModelConfig
from alignax.train.state import TrainState


def process_batch_size(global_batch: int) -> int:
  """This process's share of the global batch (each process feeds its local devices)."""
  n = jax.process_count()
  if global_batch % n:
    raise parallel.ParallelError(f"train.batch_size={global_batch} is not divisible by the "
                                 f"{n} processes")
  return global_batch // n


def batch_options(config, tokenizer=None) -> BatchOptions:
  """This process's `BatchOptions` for a stage's training data (a `RunConfig`): its share of
  `train.batch_size`, its slice of the records, the run's seed, policy and chat template
  (resolved for `tokenizer` when given: "auto" becomes "model" or "markers", and "model" with a
  tokenizer without a template is a ConfigError before any record is read)."""
  from alignax.data import chat
  template = config.data.chat_template
  if tokenizer is not None:
    template = chat.resolve_template(tokenizer, template)
  return BatchOptions(batch_size=process_batch_size(config.train.batch_size),
                      bad_records=config.data.bad_records, seed=config.seed, num_epochs=None,
                      shard_index=jax.process_index(), shard_count=jax.process_count(),
                      chat_template=template)


def stage_datasets(ctx, fmt: str, splits=None) -> Datasets:
  """`get_datasets` for a stage: its train iterator and `eval.batches` fixed eval batches."""
  config = ctx.config
  return get_datasets(fmt, config.data, ctx.tokenizer, batch_options(config, ctx.tokenizer),
                      eval_batches=config.eval.batches, world=config.world, splits=splits)


def load_lm_export(workdir: str, model: ModelConfig | None = None, placement=None):
  """(lm, params) of a stage's LM export (`model`: the export's own config by default), laid out
  on `placement`'s mesh when given (else on the default device)."""
  from alignax import checkpoint as ckpt_lib
  lm, abstract = abstract_lm(model if model is not None else ckpt_lib.export_model_config(workdir))
  sharding = placement.state_sharding(abstract) if placement is not None else None
  params, _ = ckpt_lib.load_export(workdir, abstract, sharding)
  return lm, params


def with_lora(config, params):
  """(params, reference) of a run that starts from `params`: with `model.lora.rank` > 0 the LM
  states inside `params` gain fresh adapters (`alignax.models.lora.attach`, sharing `params`'
  arrays) and the reference is None (the frozen base serves as the reference); otherwise a copy
  of `params` to train and `params` itself as the reference."""
  if config.lora.enabled:
    return attach_lora(config, params), None
  return jax.tree.map(jnp.copy, params), params


def attach_lora(config, params):
  """`params` with fresh adapters on its LM states when `model.lora.rank` > 0, else `params`."""
  if not config.lora.enabled:
    return params
  return lora.attach(params, config.lora, jax.random.fold_in(jax.random.key(config.seed), 0x10a))


def init_lm_state(placement: parallel.Placement, model: ModelConfig, optimizer, seed: int,
                  params=None, extra_fn: Callable | None = None,
                  config=None) -> tuple[LanguageModel, TrainState]:
  """The model and a TrainState on the mesh: fresh params from `seed`, or `params` (already loaded).

  `extra_fn(params) -> pytree` builds algorithm-specific state (e.g. reference params). With
  loaded `params` and a `config` (a RunConfig) asking for LoRA, the params gain adapters.
  """
  lm, _ = abstract_lm(model)
  key = jax.random.key(seed)
  if params is None:
    def init():
      _, p = build_lm(model, jax.random.fold_in(key, 0))
      return TrainState.create(p, optimizer, jax.random.fold_in(key, 1),
                               extra=extra_fn(p) if extra_fn else None)
    return lm, parallel.init_sharded(placement, init)
  params = jax.device_put(params, placement.state_sharding(params))
  if config is not None:
    params = attach_lora(config, params)
  state = TrainState.create(params, optimizer, jax.random.fold_in(key, 1),
                            extra=extra_fn(params) if extra_fn else None)
  return lm, placement.put_state(state)


# --------------------------------------------------------------------------------------------
# Chaining stages: start from the export of the stage this one builds on.


def init_section(workdir: str, config: str) -> "ConfigDict":  # noqa: F821
  """`init.*`: the run this stage starts from (its WORKDIR), and the config that makes it
  (`path:preset`) when it has to be run first."""
  from alignax.config import ConfigDict
  return ConfigDict(dict(workdir=workdir, config=config, run_if_missing=True))


def upstream_config(init_cfg) -> "ConfigDict":  # noqa: F821
  """The config `init.config` names (`path:preset`), writing into `init.workdir`."""
  from alignax.config import load_config_file
  path, _, preset = init_cfg.config.partition(":")
  prev = load_config_file(path, preset or None)
  prev.workdir = init_cfg.workdir
  return prev


def adopt_export(cfg, workdir: str, chat_stages=()) -> "ConfigDict":  # noqa: F821
  """A copy of `cfg` with the model and tokenizer of the export this stage starts from (see
  `adopt_model`); `cfg` itself is not changed.

  The tokenizer must be the one the model was trained with, so the export's wins; a config that
  named another one is told so in the log. An export of one of `chat_stages` (the registry's)
  also gives its chat template. Then `data.chat_template` is resolved for that tokenizer
  (`resolve_chat_template`), so this stage's config.json and export name the template it
  trains with.
  """
  import copy

  from absl import logging

  from alignax import checkpoint as ckpt_lib
  cfg = copy.deepcopy(cfg)
  meta = ckpt_lib.read_export_meta(workdir)
  if meta["tokenizer"] != cfg.tokenizer:
    logging.warning("using the tokenizer of %s (%s) instead of config.tokenizer=%s", workdir,
                    meta["tokenizer"], cfg.tokenizer)
    with cfg.unlocked():
      cfg.tokenizer = meta["tokenizer"]
  # Chat-trained models keep the template they learned; pretrained and imported ones have none
  # yet, so this stage's config chooses it.
  template = meta.get("chat_template")
  if meta["stage"] in chat_stages and template and template != cfg.data.chat_template:
    if cfg.data.chat_template != "auto":  # "auto" asked for nothing in particular
      logging.warning("using the chat template of %s (%s) instead of config.data.chat_template=%s",
                      workdir, template, cfg.data.chat_template)
    with cfg.unlocked():
      cfg.data.chat_template = template
  resolve_chat_template(cfg)
  adopt_model(cfg, ckpt_lib.export_model_config(workdir))
  return cfg


def resolve_chat_template(cfg) -> str:
  """`cfg.data.chat_template` for `cfg.tokenizer`, written back (in place): see
  `alignax.data.tokenizers.resolve_chat_template_name`."""
  from alignax.data.tokenizers import resolve_chat_template_name
  name = resolve_chat_template_name(cfg.tokenizer, cfg.data.get("chat_template", "auto"))
  with cfg.unlocked():
    cfg.data.chat_template = name
  return name


def adopt_model(cfg, exported: "ModelConfig") -> "ModelConfig":  # noqa: F821
  """The exported model's shapes with this config's compute choices (dtype, remat, scan_unroll),
  written into `cfg.model` (in place: `adopt_export` calls it on its own copy) so the resolved
  config shows the model actually trained."""
  import dataclasses
  compute = {k: cfg.model[k] for k in ("dtype", "remat", "scan_unroll") if k in cfg.model}
  model = dataclasses.replace(exported, **compute)
  with cfg.unlocked():
    for k, v in dataclasses.asdict(model).items():
      cfg.model[k] = v
  return model
