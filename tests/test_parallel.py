"""Scale is a config change: every mesh and pmap mode train to the same losses as 1 device, params
are sharded as configured, the compiled steps hold the expected collectives, bad layouts fail
before compiling, and a pmap run is an ordinary run (checkpoints, eval, stages)."""

import collections
import itertools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignax import checkpoint as ckpt_lib
from alignax import parallel
from alignax.config import base_config
from alignax.train.state import TrainState
from alignax.train.step import make_train_step
from multihost_worker import B, LAYOUTS, problem, train_losses
from checkpoint_helpers import ckpt_args

ONE_DEVICE = ("jit", dict(data=1, fsdp=1, tensor=1))


def _parallel_cfg(mode="jit", **mesh):
  full = dict(data=1, fsdp=1, tensor=1)
  full.update(mesh)
  return ml_collections.ConfigDict(dict(mode=mode, mesh=full))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b) / np.abs(b)


@pytest.fixture(scope="module")
def reference_losses():
  losses, _, _ = train_losses(*ONE_DEVICE)
  return losses


# ---------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_trains_to_the_one_device_losses(name, reference_losses):
  losses, placement, state = train_losses(*LAYOUTS[name])
  print(f"\n{name:<28} " + " ".join(f"{x:.7f}" for x in losses)
        + f"  max rel {np.max(_rel(losses, reference_losses)):.1e}")
  assert losses[-1] < losses[0] - 0.1  # it trains (lr 1e-2, no warmup): rounding gets amplified
  assert np.all(_rel(losses, reference_losses) <= 1e-5), (losses, reference_losses)
  # Every mode keeps an ordinary TrainState (pmap too: no leading device axis to strip).
  assert state.step.shape == () and int(state.step) == len(losses)
  assert jax.tree.map(np.shape, state.params) == jax.tree.map(np.shape, problem()[1])


def test_pmap_loss_is_not_a_mean_of_device_means():
  """The uneven masks make the mean of per-device means differ from the global mean, so the
  match above really needs the psum of sums and counts."""
  _, _, _, _, batches = problem()
  mask = batches[0]["loss_mask"].reshape(8, B // 8, -1)
  per_device = mask.sum(axis=(1, 2))
  assert per_device.max() > 1.5 * per_device.min()


# ---------------------------------------------------------------------------------------- layout


def _spec(x):
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def _state_on(mode, **mesh):
  model, params, optimizer, _, _ = problem()
  placement = parallel.make_placement(_parallel_cfg(mode, **mesh), model, B)
  return placement, placement.put_state(TrainState.create(params, optimizer, jax.random.key(0)))


def test_params_and_optimizer_state_are_sharded_as_configured():
  _, state = _state_on("jit", fsdp=8)
  p = state.params
  # [layers, embed=64, heads=4, head_dim=16]: embed over fsdp.
  assert _spec(p["blocks"]["attn"]["wq"][...]) == (None, "fsdp", None, None)
  assert p["blocks"]["attn"]["wq"][...].addressable_shards[0].data.shape == (2, 8, 4, 16)
  assert _spec(p["embed"][...]) == (None, "fsdp")  # (vocab, embed); tensor=1 is dropped
  assert _spec(p["blocks"]["mlp"]["w_out"][...]) == (None, None, "fsdp")  # (layers, mlp, embed)
  # Adam's moments follow their params (the point of FSDP: optimizer memory / 8).
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", ()) == (2, 64, 4, 16)]
  assert len(moments) >= 2 and all(_spec(x) == (None, "fsdp", None, None) for x in moments)

  _, state = _state_on("jit", data=2, fsdp=2, tensor=2)
  p = state.params
  assert _spec(p["blocks"]["attn"]["wq"][...]) == (None, "fsdp", "tensor", None)
  assert _spec(p["blocks"]["attn"]["wk"][...]) == (None, "fsdp", "tensor", None)  # 2 kv heads
  assert _spec(p["blocks"]["attn"]["wo"][...]) == (None, "tensor", None, "fsdp")
  assert _spec(p["blocks"]["mlp"]["w_in"][...]) == (None, "fsdp", "tensor")
  assert _spec(p["blocks"]["mlp"]["w_out"][...]) == (None, "tensor", "fsdp")
  assert _spec(p["embed"][...]) == ("tensor", "fsdp")
  assert p["blocks"]["mlp"]["w_in"][...].addressable_shards[0].data.shape == (2, 32, 64)
  # Scalars are replicated.
  assert state.step.sharding.is_fully_replicated

  placement, state = _state_on("pmap", data=8)
  assert isinstance(placement, parallel.PmapPlacement)
  for x in jax.tree.leaves(state.params):
    assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8


# ---------------------------------------------------------------------------------------- HLO

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")


def _replica_groups(line: str) -> list[frozenset] | None:
  """The device groups of one HLO collective, from any of XLA's three spellings:
  {{0,1},{2,3}}, iota "[4,2]<=[2,2,2]T(0,2,1)", and "mesh['axis_0'=2,...] {'axis_1'}"."""
  m = re.search(r"replica_groups=(\{\{[\d,{}]*\}\})", line)
  if m:
    return [frozenset(int(i) for i in g.split(",")) for g in re.findall(r"\{([\d,]+)\}", m.group(1))]
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    ids = np.arange(8).reshape([int(d) for d in m.group(3).split(",")])
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(",")])
    return [frozenset(r.tolist()) for r in ids.reshape(int(m.group(1)), int(m.group(2)))]
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? "
                r"\{([^}]*)\}", line)
  if m:
    names, sizes = zip(*[(a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))])
    ids = np.arange(8)
    if m.group(2):
      ids = ids.reshape([int(d) for d in m.group(2).split(",")])
      if m.group(3):
        ids = ids.transpose([int(p) for p in m.group(3).split(",")])
    ids = ids.reshape(sizes)
    over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
    rest = [i for i in range(len(sizes)) if i not in over]
    return [frozenset(r.tolist()) for r in ids.transpose(rest + over).reshape(-1, math.prod(sizes[i] for i in over))]
  return None


def _mesh_axes_of(groups, mesh) -> tuple[str, ...] | None:
  """The mesh axes (of size > 1) whose devices a collective's groups run over."""
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  axes = [i for i, a in enumerate(mesh.axis_names) if mesh.shape[a] > 1]
  for k in range(1, len(axes) + 1):
    for sub in itertools.combinations(axes, k):
      rest = [i for i in range(ids.ndim) if i not in sub]
      size = math.prod(ids.shape[i] for i in sub)
      want = {frozenset(r.tolist()) for r in ids.transpose(rest + list(sub)).reshape(-1, size)}
      if groups is not None and set(groups) == want:
        return tuple(mesh.axis_names[i] for i in sub)
  return None


def _compiled_collectives(mode, **mesh):
  """{kind: {mesh axes: [result shape, ...]}} of the compiled train step's collectives."""
  model, params, optimizer, loss_fn, batches = problem()
  placement = parallel.make_placement(_parallel_cfg(mode, **mesh), model, B)
  state = placement.put_state(TrainState.create(params, optimizer, jax.random.key(0)))
  step = placement.jit_step(make_train_step(loss_fn, optimizer), state)
  hlo = step.lower(state, placement.put_batch(batches[0])).compile().as_text()
  found = collections.defaultdict(lambda: collections.defaultdict(list))
  pattern = re.compile(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
  for line in hlo.splitlines():
    m = pattern.search(line)
    if m:
      found[m.group(2)][_mesh_axes_of(_replica_groups(line), placement.mesh)].append(m.group(1))
  summary = {k: {axes: len(v) for axes, v in by_axes.items()} for k, by_axes in found.items()}
  print(f"\n{mode} {mesh}: {summary}")
  return found


def test_data_parallel_step_only_all_reduces_gradients_over_data():
  found = _compiled_collectives("jit", data=8)
  assert set(found) == {"all-reduce"} and set(found["all-reduce"]) == {("data",)}, dict(found)
  # One layer's matrix gradients (inside the scan) are summed, e.g. w_in's [64, 128].
  assert any("f32[64,128]" in s for s in found["all-reduce"][("data",)])


def test_fsdp_step_gathers_params_and_reduces_gradients_over_fsdp():
  found = _compiled_collectives("jit", fsdp=8)
  gathered = found["all-gather"][("fsdp",)]
  # Sharded params come back whole before use: the final norm's scale [64] and the output
  # projection [64, 300] (embed-sharded).
  assert any(s.startswith("f32[64]") for s in gathered) and any("f32[64,300]" in s for s in gathered)
  # Gradients are summed over the batch shards: a reduce-scatter on GPU/TPU; XLA:CPU keeps
  # all-reduce (+ slice).
  assert found["all-reduce"][("fsdp",)] or found["reduce-scatter"][("fsdp",)]
  rows = [s for k in ("all-gather", "all-reduce") for s in found[k][("fsdp",)]
          if s.startswith(f"f32[{B * 32},")]
  print(f"collectives over all {B * 32} tokens of the batch (activations, not weights): {len(rows)}")


def test_three_axis_step_has_collectives_on_each_axis():
  found = _compiled_collectives("jit", data=2, fsdp=2, tensor=2)
  # tensor: partial sums of row-parallel matmuls (attention out, MLP down) are all-reduced.
  assert found["all-reduce"][("tensor",)]
  # data: gradients are all-reduced over the data replicas (alone or with fsdp).
  assert found["all-reduce"][("data",)] or found["all-reduce"][("data", "fsdp")]
  # fsdp: sharded params are all-gathered.
  assert found["all-gather"][("fsdp",)]


def test_pmap_step_reduces_once_over_the_axis():
  found = _compiled_collectives("pmap", data=8)
  assert set(found) == {"all-reduce"} and set(found["all-reduce"]) == {("data",)}, dict(found)
  # The psum of (loss sum, count, gradient sums) is one combined all-reduce, all layers at once.
  (shapes,) = found["all-reduce"].values()
  assert len(shapes) <= 2 and any("f32[2,64,128]" in s for s in shapes)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cfg, batch, message", [
    (_parallel_cfg(data=8), 12, "train.batch_size=12 is not divisible by the data axes (data x fsdp = 8)"),
    (_parallel_cfg(data=2, fsdp=4), 4, "train.batch_size=4 is not divisible"),
    (_parallel_cfg("pmap", data=8), 12, "train.batch_size=12 is not divisible"),
    (_parallel_cfg(data=16), 16, "parallel.mesh: {'data': 16, 'fsdp': 1, 'tensor': 1} needs 16 devices, "
                                 "but only 8 are available"),
    (_parallel_cfg(data=-1, fsdp=3), 16, "parallel.mesh: 8 devices are not divisible"),
    (_parallel_cfg(data=-1, fsdp=-1), 16, "parallel.mesh: at most one axis may be -1"),
    (_parallel_cfg(data=2, tensor=4), 16, "parallel.mesh.tensor=4 does not divide model.n_kv_heads=2"),
    (_parallel_cfg(data=1, tensor=8), 16, "parallel.mesh.tensor=8 does not divide model.n_heads=4"),
    (_parallel_cfg("pmap", data=4, fsdp=2), 16, "parallel.mode='pmap' is data parallel only"),
    (ml_collections.ConfigDict(dict(mode="pjit", mesh=dict(data=1, fsdp=1, tensor=1))), 16,
     "parallel.mode: must be one of"),
])
def test_bad_layouts_fail_before_compiling_naming_the_key(cfg, batch, message):
  model = problem()[0]
  with pytest.raises(parallel.ParallelError) as e:
    parallel.make_placement(cfg, model, batch)
  assert message in str(e.value)


def test_cli_reports_a_bad_mesh_in_one_line(tmp_path):
  from cli_helpers import SMALL_PRETRAIN, run_cli
  proc = run_cli(*SMALL_PRETRAIN, f"--config.workdir={tmp_path}", "--config.parallel.mesh.data=16",
                 devices=8, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "alignax: error: parallel.mesh: {'data': 16, 'fsdp': 1, 'tensor': 1} needs 16 devices, but only "
      "8 are available")


def test_pmap_accumulation_must_divide_each_devices_rows():
  from alignax.config import ConfigError
  model, params, optimizer, loss_fn, batches = problem()
  placement, state = _state_on("pmap", data=8)
  step = placement.jit_step(make_train_step(loss_fn, optimizer, accum_steps=4), state)
  with pytest.raises(ConfigError, match=r"config.train.accum_steps: 4 does not divide the 2 rows"):
    step(state, placement.put_batch(batches[0]))


def test_pmap_needs_a_step_that_reduces_over_the_axis():
  placement, state = _state_on("pmap", data=8)
  with pytest.raises(parallel.ParallelError, match="parallel.mode='pmap'.*make_train_step"):
    placement.jit_step(lambda s, b: (s, {}), state)


# ---------------------------------------------------------------------------------------- constrain


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((8, 4, 16))
  assert parallel.constrain(x, ("batch", "length", "act_embed")) is x
  jaxpr = jax.make_jaxpr(lambda x: parallel.constrain(x, ("batch", None, "act_embed")))(x)
  assert "sharding_constraint" not in str(jaxpr)


def test_constrain_applies_the_rules_inside_a_placements_step():
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
  placement = parallel.Placement(mesh)
  fn = placement.jit_eval(lambda p, b: parallel.constrain(b["x"] * p, ("batch", None, "act_embed")).sum(),
                          jnp.ones(()))
  text = fn.lower(jnp.ones(()), placement.put_batch({"x": np.ones((8, 4, 16), np.float32)})).as_text()
  constraints = [l for l in text.splitlines() if "sharding_constraint" in l]
  assert len(constraints) == 1 and '[{"data", "fsdp"}, {}, {}]' in constraints[0], constraints


def test_block_boundary_constraints_make_fsdp_gather_weights_not_activations(monkeypatch,
                                                                            reference_losses):
  """What `constrain` at the blocks' residual stream buys (a proposed change to the model, made
  here by patching; harmless once the model does it): without it XLA's fsdp=8 step all-gathers
  [B*T, d] activations over the batch shards and multiplies by weight shards (see
  test_fsdp_step_...'s printout); with it the step gathers each weight and keeps activations
  split, and the losses stay exact."""
  from alignax.models import transformer
  original = transformer.Block.__call__
  axes = ("batch", "length", "act_embed")

  def block(self, x, rotary, mask, kv_cache=None, cache_end=None):
    x, kv_cache = original(self, parallel.constrain(x, axes), rotary, mask, kv_cache, cache_end)
    return parallel.constrain(x, axes), kv_cache

  def shapes(found):
    return [s for kind in ("all-gather", "all-reduce") for v in found[kind].values() for s in v]

  monkeypatch.setattr(transformer.Block, "__call__", block)
  after = _compiled_collectives("jit", fsdp=8)
  tokens = f"f32[{B * 32},"  # all rows of the batch: an activation gathered over fsdp
  assert not any(s.startswith(tokens) for s in shapes(after))
  assert any("f32[64,128]" in s for s in after["all-gather"][("fsdp",)])  # one layer's w_in
  losses, _, _ = train_losses("jit", dict(data=1, fsdp=8, tensor=1))
  assert np.all(_rel(losses, reference_losses) <= 1e-5)


# ---------------------------------------------------------------------------------------- pmap runs


def _checkpoint_config(workdir):
  cfg = base_config("pretrain")
  model = problem()[0]
  import dataclasses
  for k, v in dataclasses.asdict(model).items():
    cfg.model[k] = v
  cfg.workdir = str(workdir)
  cfg.checkpoint.async_save = False
  return cfg


@pytest.mark.parametrize("first, second", [("pmap", "jit"), ("jit", "pmap")])
def test_checkpoints_move_between_pmap_and_jit(tmp_path, first, second, reference_losses):
  """A pmap run's checkpoint is a normal TrainState: it restores onto a jit mesh and back, and
  training continues with the uninterrupted losses."""
  model, params, optimizer, loss_fn, batches = problem()
  cfg = _checkpoint_config(tmp_path)
  layouts = {"pmap": _parallel_cfg("pmap", data=8), "jit": _parallel_cfg("jit", data=2, fsdp=2, tensor=2)}
  losses = []

  placement = parallel.make_placement(layouts[first], model, B)
  state = placement.put_state(TrainState.create(params, optimizer, jax.random.key(0)))
  step = placement.jit_step(make_train_step(loss_fn, optimizer), state)
  for batch in batches[:3]:
    state, m = step(state, placement.put_batch(batch))
    losses.append(float(m["loss"]))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(cfg), state_sharding=placement.state_sharding)
  ckpt.maybe_save(3, state, force=True)
  ckpt.close()

  placement = parallel.make_placement(layouts[second], model, B)
  fresh = placement.put_state(TrainState.create(problem()[1], optimizer, jax.random.key(1)))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), *ckpt_args(cfg), state_sharding=placement.state_sharding)
  state = ckpt.restore(fresh)
  ckpt.close()
  assert int(state.step) == 3
  expected = placement.state_sharding(state)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  step = placement.jit_step(make_train_step(loss_fn, optimizer), state)
  for batch in batches[3:]:
    state, m = step(state, placement.put_batch(batch))
    losses.append(float(m["loss"]))
  assert np.all(_rel(losses, reference_losses) <= 1e-5), (losses, reference_losses)


def _run_pretrain(workdir, mode, **overrides):
  from alignax.algorithms import run_stage
  from alignax.config import load_config_file
  cfg = load_config_file("configs/pretrain.py", "tiny")
  values = {"model.d_model": 64, "model.n_layers": 2, "model.d_ff": 128, "train.batch_size": 8,
            "data.seq_len": 64, "data.loader": "memory", "train.progress": False,
            "world.pretrain_bytes": 200000, "optimizer.warmup_steps": 2, "train.steps": 4,
            "train.log_every": 1, "eval.every": 2, "eval.batches": 2,
            "parallel.mode": mode, "workdir": str(workdir)}
  values.update(overrides)
  for key, value in values.items():
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  result = run_stage(cfg)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return result, rows


def test_a_stage_runs_unchanged_in_pmap_mode(tmp_path):
  """The pretrain stage (loop, runner, evaluation, checkpoint, export) in pmap mode logs the
  same metrics as in jit mode on the same 8 devices."""
  rows = {}
  for mode in ("jit", "pmap"):
    result, rows[mode] = _run_pretrain(tmp_path / mode, mode)
    assert result.finished and ckpt_lib.has_export(str(tmp_path / mode))
  assert [r["step"] for r in rows["jit"]] == [r["step"] for r in rows["pmap"]]
  for a, b in zip(rows["jit"], rows["pmap"]):
    for key in ("train/loss", "train/grad_norm", "train/count", "eval/loss"):
      if key in a:
        assert _rel(b[key], a[key]) <= 1e-5, (key, a, b)


# ---------------------------------------------------------------------------------------- processes


@pytest.mark.parametrize("dist, env, expected", [
    (dict(coordinator="10.0.0.1:1234", num_processes=4, process_id=2), {},
     ("10.0.0.1:1234", dict(num_processes=4, process_id=2))),
    (dict(coordinator="auto", num_processes=1, process_id=0), {}, (None, {})),  # cluster detection
    (dict(coordinator="", num_processes=1, process_id=0),
     {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     ("h:9", dict(num_processes=2, process_id=1))),
    (dict(coordinator="", num_processes=1, process_id=0), {"JAX_COORDINATOR_ADDRESS": "h:9"}, ("h:9", {})),
    (dict(coordinator="", num_processes=1, process_id=0), {}, "single process"),
])
def test_distributed_initialize_from_config_or_environment(monkeypatch, dist, env, expected):
  calls = []

  def initialize(coordinator_address=None, **kwargs):
    calls.append((coordinator_address, kwargs))

  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert parallel.maybe_initialize_distributed(ml_collections.ConfigDict(dist)) is False
  assert calls == ([] if expected == "single process" else [expected])


def test_a_bad_process_id_names_the_key(monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  with pytest.raises(parallel.ParallelError, match=r"parallel.distributed.process_id: must be in \[0, 2\)"):
    parallel.maybe_initialize_distributed(ml_collections.ConfigDict(
        dict(coordinator="localhost:1", num_processes=2, process_id=2)))
