"""Pieces several stages share: per-process data slicing, fixed eval batches, LM state init."""

from __future__ import annotations

import itertools
from typing import Callable

import jax
import numpy as np

from alignax import parallel
from alignax.models import LanguageModel, abstract_lm, build_lm
from alignax.models.config import ModelConfig
from alignax.train.state import TrainState


def process_batch_size(global_batch: int) -> int:
  """This process's share of the global batch (each process feeds its local devices)."""
  n = jax.process_count()
  if global_batch % n:
    raise parallel.ParallelError(f"train.batch_size={global_batch} is not divisible by the "
                                 f"{n} processes")
  return global_batch // n


def shard_args() -> dict:
  """Each process reads a disjoint slice of the records."""
  return dict(shard_index=jax.process_index(), shard_count=jax.process_count())


def take_batches(iterator, n: int) -> list:
  """The first `n` batches of an iterator as a list (fixed eval sets are read once and reused)."""
  return list(itertools.islice(iterator, n))


def tokens_in(batch) -> int:
  """Non-padding tokens in a host LM batch, over all processes."""
  return int(np.count_nonzero(batch["segment_ids"])) * jax.process_count()


def init_lm_state(placement: parallel.Placement, model: ModelConfig, optimizer, seed: int,
                  params=None, extra_fn: Callable | None = None) -> tuple[LanguageModel, TrainState]:
  """The model and a TrainState on the mesh: fresh params from `seed`, or `params` (already loaded).

  `extra_fn(params) -> pytree` builds algorithm-specific state (e.g. reference params).
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
  state = TrainState.create(params, optimizer, jax.random.fold_in(key, 1),
                            extra=extra_fn(params) if extra_fn else None)
  return lm, placement.put_state(state)


# --------------------------------------------------------------------------------------------
# Chaining stages: start from the export of the stage this one builds on.


def init_section(workdir: str, config: str) -> "ConfigDict":
  """`init.*`: the run this stage starts from (its WORKDIR), and the config that makes it
  (`path:preset`) when it has to be run first."""
  from alignax.config import ConfigDict
  return ConfigDict(dict(workdir=workdir, config=config, run_if_missing=True))


def ensure_export(init_cfg) -> str:
  """The workdir of a finished previous stage, running it first when it is missing.

  Raises CheckpointError when it is missing and `init.run_if_missing` is False.
  """
  from absl import logging

  from alignax import checkpoint as ckpt_lib
  workdir = init_cfg.workdir
  if ckpt_lib.has_export(workdir):
    return workdir
  if not init_cfg.run_if_missing or not init_cfg.config:
    raise ckpt_lib.CheckpointError(f"config.init.workdir: {workdir} has no finished export; run "
                                   f"that stage first or set config.init.run_if_missing=True")
  from alignax.algorithms import run_stage
  prev = upstream_config(init_cfg)
  logging.warning("%s has no export: running %s into it first", workdir, init_cfg.config)
  print(f"alignax: {workdir} is missing; running {init_cfg.config} first", flush=True)
  result = run_stage(prev)
  if not result.finished:
    raise ckpt_lib.CheckpointError(f"the previous stage in {workdir} stopped before finishing")
  return workdir


def upstream_config(init_cfg) -> "ConfigDict":  # noqa: F821
  """The config `init.config` names (`path:preset`), writing into `init.workdir`."""
  from alignax.config import load_config_file
  path, _, preset = init_cfg.config.partition(":")
  prev = load_config_file(path, preset or None)
  prev.workdir = init_cfg.workdir
  return prev


def adopt_export(cfg, workdir: str, chat_stages=()) -> "ModelConfig":  # noqa: F821
  """Takes the model and tokenizer of the export this stage starts from (see `adopt_model`).

  The tokenizer must be the one the model was trained with, so the export's wins; a config that
  named another one is told so in the log. An export of one of `chat_stages` (the registry's)
  also gives its chat template.
  """
  from absl import logging

  from alignax import checkpoint as ckpt_lib
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
    logging.warning("using the chat template of %s (%s) instead of config.data.chat_template=%s",
                    workdir, template, cfg.data.chat_template)
    with cfg.unlocked():
      cfg.data.chat_template = template
  return adopt_model(cfg, ckpt_lib.export_model_config(workdir))


def adopt_model(cfg, exported: "ModelConfig") -> "ModelConfig":  # noqa: F821
  """The exported model's shapes with this config's compute choices (dtype, remat, scan_unroll);
  `cfg.model` is updated so the resolved config shows the model actually trained."""
  import dataclasses
  compute = {k: cfg.model[k] for k in ("dtype", "remat", "scan_unroll") if k in cfg.model}
  model = dataclasses.replace(exported, **compute)
  with cfg.unlocked():
    for k, v in dataclasses.asdict(model).items():
      cfg.model[k] = v
  return model


def eval_section(**overrides) -> "ConfigDict":
  """`eval.*`: sampling-based evaluation on the world's prompts."""
  from alignax.config import ConfigDict
  values = dict(num_prompts=64, temperature=1.0, max_new_tokens=64, batch_size=32, showcase=True,
                samples_per_prompt=1,  # responses sampled per eval prompt
                save_samples=False)  # every sample to WORKDIR/eval_samples/step_<step>.jsonl
  values.update(overrides)
  return ConfigDict(values)
