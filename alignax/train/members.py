"""Runs as a batch dimension: N runs of one stage trained as one compiled program.

A *member* is one run: its own config, workdir, params init, data order, sampling keys, metrics
and export. The members of a group share every structural key (shapes, loss type, schedule
kind, mesh) and differ only in keys that reach the step as data (`Algorithm.vectorized_keys`):
continuous hyperparameters (`TrainState.hparams`), the optimizer's numeric hyperparameters
(optax's injected state), state the algorithm keeps in `extra` (PPO's KL coefficient), and the
seed. So each member's `Run` is built exactly as a separate `alignax train` builds it, the
states are stacked on a leading member axis, and the first member's pure step is `jax.vmap`'d
over that axis: member i of the stacked step computes what run i's own step would.

  group dir  OUT/_groups/<group>/   one orbax checkpoint of the stacked state (every member's
                                    data-iterator state with it) and members.json
  member dir OUT/<point>/           config.json, metrics.jsonl, TensorBoard, export, as a
                                    normal run's, so downstream stages and `alignax eval` /
                                    `alignax sample` use it unchanged

The learning rate is vectorized through `lr_scale`: the compiled schedule is the first member's,
and member i scales its updates by lr_i / lr_0 (AdamW's update is proportional to the learning
rate, weight decay included, and every schedule is proportional to its peak).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from alignax import checkpoint as ckpt_lib
from alignax import metrics as metrics_lib
from alignax import parallel
from alignax.config import ConfigDict, ConfigError, resolve, save_config
from alignax.train.loop import Run, run_loop, tokens_of
from alignax.train.member_placement import (MemberPlacement, check_memory, member_slice,
                                            stack, tree_bytes)
from alignax.train.runner import StageContext, StageResult, log_to_file, stage_tokenizer
from alignax.train.state import TrainState
from alignax.train.workdir_lock import WorkdirLock

MEMBERS_FILE = "members.json"
GROUP_DIR = "_group"  # a stage's own members (a reward ensemble) keep their stacked checkpoint here


# ------------------------------------------------------------------------------------ loop pieces


class MemberBatches:
  """Every member's batch iterator, read in lockstep; batches stacked [M, ...]."""

  def __init__(self, iterators: Sequence):
    self.iterators = list(iterators)

  def __iter__(self):
    return self

  def __next__(self):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[next(it) for it in self.iterators])

  def get_state(self) -> dict:
    return {"members": [it.get_state() for it in self.iterators]}

  def set_state(self, state: dict) -> None:
    saved = state.get("members")
    if saved is None or len(saved) != len(self.iterators):
      raise ckpt_lib.CheckpointError(f"the checkpoint holds data states for "
                                     f"{len(saved or [])} members, this group has {len(self.iterators)}")
    for it, s in zip(self.iterators, saved):
      it.set_state(s)

  def stats(self) -> dict:
    """{name: [M]} counters of each member's data pipeline."""
    per = [it.stats() if hasattr(it, "stats") else {} for it in self.iterators]
    names = sorted({n for s in per for n in s})
    return {n: np.array([s.get(n, np.nan) for s in per], np.float64) for n in names}


class MemberWriter:
  """Splits rows of member-stacked metrics ([M] arrays) into each member's MetricsWriter.

  A scalar goes to every member. `write` returns the row the progress bar shows: the mean over
  members, and the sum of tokens/s (the group's throughput).
  """

  def __init__(self, writers: Sequence[metrics_lib.MetricsWriter]):
    self.writers = list(writers)

  def write(self, step: int, metrics) -> dict:
    m = len(self.writers)
    rows = [{} for _ in range(m)]
    for name, value in metrics.items():
      value = np.asarray(value)
      for i in range(m):
        rows[i][name] = value[i] if value.ndim and value.shape[0] == m else value
    written = [w.write(step, r) for w, r in zip(self.writers, rows)]
    out = {"step": int(step)}
    for name in written[0]:
      vals = [w.get(name) for w in written]
      if all(isinstance(v, float) for v in vals):
        out[name] = sum(vals) if name.endswith("tokens_per_sec") else sum(vals) / m
    return out

  def write_text(self, step, name, text):
    for w in self.writers:
      w.write_text(step, name, text)

  def truncate_after(self, step: int) -> int:
    return sum(w.truncate_after(step) for w in self.writers)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def _member_evaluate(runs: Sequence[Run]):
  if all(r.evaluate is None for r in runs):
    return None

  def evaluate(stacked: TrainState) -> dict:
    per = [r.evaluate(member_slice(stacked, i)) if r.evaluate is not None else {}
           for i, r in enumerate(runs)]
    names = sorted({n for p in per for n in p})
    return {n: np.array([float(p.get(n, np.nan)) for p in per]) for n in names}
  return evaluate


def _member_tokens(runs: Sequence[Run]):
  def tokens(stacked_batch) -> np.ndarray:
    out = []
    for i, r in enumerate(runs):
      out.append(tokens_of(r, member_slice(stacked_batch, i)))
    return np.asarray(out, np.float64)
  return tokens


def _lr_scales(cfgs: Sequence[ConfigDict]) -> list[float]:
  base = float(cfgs[0].optimizer.lr)
  return [float(c.optimizer.lr) / base for c in cfgs]


def check_structure(states: Sequence[TrainState], names: Sequence[str]) -> None:
  """Members must have the same tree structure, shapes and dtypes, or they cannot be stacked."""
  ref = jax.tree.map(lambda x: (x.shape, x.dtype), states[0])
  ref_def = jax.tree.structure(states[0])
  for s, name in zip(states[1:], names[1:]):
    if jax.tree.structure(s) != ref_def or jax.tree.map(lambda x: (x.shape, x.dtype), s) != ref:
      raise ConfigError(f"member {name}: its state's shapes differ from member {names[0]}'s, so they "
                        "cannot train as one program (a key that changes shapes must be grouped)")


# ------------------------------------------------------------------------------------ the runner


@dataclasses.dataclass
class Member:
  name: str
  cfg: ConfigDict


def _check_members_file(group_dir: str, names: list[str], resume: bool) -> None:
  path = os.path.join(group_dir, MEMBERS_FILE)
  if resume and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)["members"]
    if saved != names and os.path.isdir(os.path.join(group_dir, "checkpoints")):
      raise ckpt_lib.CheckpointError(
          f"{group_dir} holds a checkpoint of members {saved}, but this sweep's group is {names}; "
          "use another --out, or remove that directory to start the group fresh")
  os.makedirs(group_dir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"members": names}, f, indent=2)


def check_differences(cfgs: Sequence[ConfigDict], names: Sequence[str], vectorized: Sequence[str]) -> None:
  """Members may differ only in `vectorized` keys (and their workdirs): the compiled step is the
  first member's, so any other difference would silently train every member like the first."""
  from alignax.config import flatten
  allowed = set(vectorized) | {"workdir"}

  def values(cfg):
    out = {}
    for key in flatten(cfg):
      node = cfg
      for part in key.split("."):
        node = node[part]
      out[key] = node
    return out
  first = values(cfgs[0])
  for cfg, name in zip(cfgs[1:], names[1:]):
    other = values(cfg)
    bad = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k) and k not in allowed)
    if bad:
      raise ConfigError(f"member {name} differs from member {names[0]} in {', '.join(bad)}, which "
                        f"change the compiled step; members may differ only in {', '.join(sorted(allowed))}")


def run_members(members: Sequence[Member], group_dir: str, build_run: Callable[[StageContext], Run],
                export: Callable | None = None, validate: Callable | None = None,
                vectorized: Sequence[str] = ()) -> list[StageResult]:
  """Trains `members` (configs of one stage differing only in the `vectorized` keys, see
  `Algorithm.vectorized_keys`) as one program.

  Returns one StageResult per member (its own state slice and workdir).
  """
  if not members:
    return []
  cfgs = [m.cfg for m in members]
  names = [m.name for m in members]
  check_differences(cfgs, names, vectorized)
  template = cfgs[0]
  configs = [resolve(m.cfg) for m in members]
  parallel.maybe_initialize_distributed(configs[0].parallel.distributed)
  models = [c.model for c in configs]
  first = configs[0]
  if validate is not None:
    for m in members:
      validate(m.cfg)
  if first.parallel.mode != "jit":
    raise ConfigError("config.parallel.mode: a vectorized sweep runs its members under 'jit' (a pmap "
                      "step cannot be vmapped over members)")
  tokenizers = [stage_tokenizer(c) for c in configs]
  for m, model, tok in zip(members, models, tokenizers):
    if tok.vocab_size > model.vocab_size:
      raise ConfigError(f"member {m.name}: config.model.vocab_size {model.vocab_size} is smaller than "
                        f"the tokenizer's vocabulary")
  inner = parallel.make_placement(first.parallel, models[0], first.train.batch_size, with_members=True)
  placement = MemberPlacement(inner, len(members), first.parallel.members_step)
  placement.split  # noqa: B018 - raises when the members axis does not divide the group
  is_main = parallel.is_main_process()
  group_cfg = ConfigDict(template.to_dict())
  with group_cfg.unlocked():
    group_cfg.workdir = group_dir
  with contextlib.ExitStack() as held:
    stop = held.enter_context(ckpt_lib.StopSignal())
    for d in [group_dir] + [m.cfg.workdir for m in members]:
      held.enter_context(WorkdirLock(d, enabled=is_main))
    ckpt_lib.check_resume(group_dir, group_cfg.to_dict(), first.train)
    if is_main:
      _check_members_file(group_dir, names, first.train.resume)
      log_to_file(group_dir)
    logging.info("group %s: %d members of %s, mesh %s", group_dir, len(members), template.stage,
                 parallel.describe(inner.mesh))

    ctxs, runs = [], []
    for i, (m, config, model, tok) in enumerate(zip(members, configs, models, tokenizers)):
      if is_main:
        save_config(m.cfg, m.cfg.workdir)
      writer = metrics_lib.MetricsWriter(m.cfg.workdir, enabled=is_main)
      ctx = StageContext(cfg=m.cfg, config=config, model=model, placement=inner, tokenizer=tok,
                         writer=writer, is_main=is_main)
      runs.append(build_run(ctx))
      ctxs.append(ctx)
      if i == 0:  # the first member's size tells whether the group fits, before building the rest
        line = check_memory(placement, tree_bytes(runs[0].state), tree_bytes(runs[0].state.params))
        logging.info(line)
        if is_main:
          print(f"alignax: {line}", flush=True)
    check_structure([r.state for r in runs], names)
    states = []
    for r, scale in zip(runs, _lr_scales(cfgs)):
      hp = dict(r.state.hparams)
      hp["lr_scale"] = hp["lr_scale"] * jnp.float32(scale)
      states.append(r.state.replace(hparams=hp))
    stacked = placement.put_state(jax.jit(lambda *s: stack(s))(*states))
    for r in runs:
      r.state = None  # the stacked copy is the only one kept
    del states

    writer = MemberWriter([c.writer for c in ctxs])
    group_run = Run(name=f"{runs[0].name} x{len(runs)}", state=stacked, train_step=runs[0].train_step,
                    batches=MemberBatches([r.batches for r in runs]), evaluate=_member_evaluate(runs),
                    tokens_per_batch=_member_tokens(runs), total_steps=runs[0].total_steps,
                    after_step=runs[0].after_step)
    checkpointer = ckpt_lib.Checkpointer(group_dir, first.checkpoint, group_cfg.to_dict(),
                                         state_sharding=placement.state_sharding,
                                         resume=first.train.resume)
    try:
      state = run_loop(group_run, first.train, placement=placement, eval_every=first.eval.every,
                       checkpoint_every=first.checkpoint.every, checkpointer=checkpointer,
                       writer=writer, is_main=is_main, stop_requested=stop.requested)
      step = int(np.asarray(jax.device_get(state.step)).max())
      finished = step >= group_run.total_steps
      results = []
      for i, ctx in enumerate(ctxs):
        member_state = member_slice(state, i)
        if finished and export is not None:
          export(ctx, member_state)
        results.append(StageResult(state=member_state, finished=finished, workdir=ctx.cfg.workdir))
    finally:
      checkpointer.close()
      writer.close()
  if not finished:
    print(f"alignax: stopped at step {step} by a signal; the group's checkpoint is saved in "
          f"{group_dir}. Run the same command to resume.", file=sys.stderr)
  return results


