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
from jax.sharding import NamedSharding, PartitionSpec as P

from alignax import checkpoint as ckpt_lib
from alignax import metrics as metrics_lib
from alignax import parallel
from alignax.config import ConfigDict, ConfigError, resolve, save_config
from alignax.train.loop import Run, run_loop, tokens_of
from alignax.train.runner import StageContext, StageResult, log_to_file, stage_tokenizer
from alignax.train.state import TrainState
from alignax.train.workdir_lock import WorkdirLock

MEMBERS_FILE = "members.json"
GROUP_DIR = "_group"  # a stage's own members (a reward ensemble) keep their stacked checkpoint here


# ------------------------------------------------------------------------------------ stacking


def stack(trees: Sequence):
  """Trees of equal structure -> one tree whose leaves gain a leading member axis [M, ...]."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member_slice(tree, i: int):
  """Member `i`'s tree out of a stacked one (host numpy arrays or device arrays)."""
  return jax.tree.map(lambda x: x[i], tree)


def tree_bytes(tree) -> int:
  """Bytes held by a tree's arrays (typed PRNG keys count their key data)."""
  def nbytes(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return sum(nbytes(x) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------ placement


@dataclasses.dataclass
class MemberPlacement:
  """Places stacked states and batches on a mesh with a leading "members" axis and jits the
  vmapped step (jit mode only).

  Per-member arrays keep their normal layout (the logical axis rules) on the other axes; the
  member axis is split over the mesh's "members" axis. Per-member scalars (step, counters,
  hyperparameters, keys) and metrics stay replicated, so every process can read them.

  Attributes:
    inner: the placement each member's own pieces (evaluation, loading) use: the same mesh,
      replicated over members.
    count: the number of members.
  """

  inner: parallel.Placement
  count: int
  batching: str = "vmap"  # or "map": lax.map over members (see config `parallel.members_step`)
  mode = "jit"

  @property
  def mesh(self):
    return self.inner.mesh

  @property
  def split(self) -> bool:
    size = self.mesh.shape[parallel.MEMBER_AXIS]
    if self.count % size:
      raise parallel.ParallelError(f"parallel.mesh.members={size} does not divide the group's "
                                   f"{self.count} members")
    return size > 1

  def state_sharding(self, stacked):
    """Shardings for a stacked tree: the member axis, then each leaf's per-member layout."""
    per_member = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)
    inner = parallel.tree_shardings(per_member, self.mesh)
    axis = parallel.MEMBER_AXIS if self.split else None

    def add_axis(sharding, x):
      lead = axis if len(x.shape) > 0 else None
      return NamedSharding(self.mesh, P(lead, *sharding.spec))
    return jax.tree.map(add_axis, inner, per_member)

  def put_state(self, stacked):
    return parallel.place(stacked, self.state_sharding(stacked))

  def batch_sharding(self):
    return NamedSharding(self.mesh, P(parallel.MEMBER_AXIS if self.split else None, parallel.BATCH_AXES))

  def put_batch(self, batch):
    """Stacked host batch [M, B / processes, ...] -> global [M, B, ...]."""
    sharding = self.batch_sharding()
    if jax.process_count() == 1:
      return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

  def replicated(self):
    return self.inner.replicated()

  def jit_step(self, step_fn: Callable, state) -> Callable:
    """`jax.vmap(step_fn)` (or `lax.map`) over the member axis, jitted with the stacked shardings,
    state donated.

    `spmd_axis_name` makes the model's sharding constraints keep the member axis split."""
    if getattr(step_fn, "axis_name", None) is not None:
      raise parallel.ParallelError("members need parallel.mode='jit' (a pmap step cannot be vmapped)")
    if self.batching == "map":
      if self.split:
        raise parallel.ParallelError("parallel.members_step='map' runs members one after another: "
                                     "use it with parallel.mesh.members=1")
      vmapped = lambda s, b: jax.lax.map(lambda sb: step_fn(*sb), (s, b))
    else:
      vmapped = jax.vmap(step_fn, spmd_axis_name=parallel.MEMBER_AXIS)
    state_sh = self.state_sharding(state)
    return jax.jit(parallel.with_mesh(vmapped, self.mesh), in_shardings=(state_sh, self.batch_sharding()),
                   out_shardings=(state_sh, self.replicated()), donate_argnums=0)


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


# ------------------------------------------------------------------------------------ memory


def available_bytes(placement) -> tuple[int, str]:
  """(bytes one device can hold, where the figure comes from)."""
  device = placement.mesh.devices.flat[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.platform} memory"
  try:
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
    return 0, "unknown"
  return int(free), "free host memory"


def check_memory(placement: MemberPlacement, state_bytes: int, params_bytes: int) -> str:
  """One line on the group's size; a ConfigError when it would not fit.

  Args:
    state_bytes, params_bytes: one member's TrainState and params.
  The estimate is the stacked state plus one gradient per member (activations come on top), over
  the devices the member axis spreads it across.
  """
  m = placement.count
  per_member = state_bytes + params_bytes
  spread = placement.mesh.shape[parallel.MEMBER_AXIS]
  need = per_member * m / spread
  free, where = available_bytes(placement)
  line = (f"members: {m} x {per_member / 2**20:.1f} MiB (state + gradients) = {need / 2**20:.1f} MiB "
          f"per device")
  if free:
    fits = int(free * spread // per_member)
    line += f"; {free / 2**30:.1f} GiB {where} holds about {fits}"
    if need > free:
      raise ConfigError(f"a group of {m} members needs about {need / 2**30:.2f} GiB per device for "
                        f"its state and gradients alone, but {where} is {free / 2**30:.2f} GiB: "
                        f"at most {fits} members fit (use fewer grid values, or "
                        f"parallel.mesh.members to spread them over more devices)")
  return line


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


