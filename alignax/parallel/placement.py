"""Placements: where a run's state and batches live, and its steps compiled to match (jit and
pmap modes; see the package docstring)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignax.parallel.config import MODES, ParallelConfig, ParallelError, _field
from alignax.parallel.mesh import (batch_sharding, check_batch_fits_mesh, check_model_fits_mesh,
                                   check_processes_fit_mesh, describe, make_mesh, place,
                                   replicated_shardings, tree_shardings)
from alignax.sharding import PMAP_AXIS


# ------------------------------------------------------------------------------------ jit mode


@dataclasses.dataclass
class Placement:
  """Puts state and batches on the mesh and jits steps with matching shardings (jit mode)."""

  mesh: Mesh
  mode = "jit"

  def state_sharding(self, state):
    return tree_shardings(state, self.mesh)

  def put_state(self, state):
    return place(state, self.state_sharding(state))

  def put_batch(self, batch):
    """Host batch (this process's rows [B / processes, ...]) -> global arrays [B, ...] split
    over the data axes."""
    sharding = batch_sharding(self.mesh)
    if jax.process_count() == 1:
      return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

  def replicated(self):
    return NamedSharding(self.mesh, P())

  def jit_step(self, step_fn: Callable, state) -> Callable:
    """jit with the state's shardings in and out, the batch split over data, state donated.

    The mesh is active while tracing, so `constrain` inside the model takes effect.
    """
    state_sh = self.state_sharding(state)
    jitted = jax.jit(with_mesh(step_fn, self.mesh), in_shardings=(state_sh, batch_sharding(self.mesh)),
                     out_shardings=(state_sh, self.replicated()), donate_argnums=0)
    return jitted

  def jit_eval(self, fn: Callable, params) -> Callable:
    """jit `fn(params, batch)` with the params' shardings, the batch over the data axes,
    outputs replicated."""
    return jax.jit(with_mesh(fn, self.mesh),
                   in_shardings=(self.state_sharding(params), batch_sharding(self.mesh)),
                   out_shardings=self.replicated())

  def init(self, init_fn: Callable[[], Any]):
    """Runs `init_fn` under jit with its outputs laid out on the mesh, so large params are
    created already sharded instead of on one device first."""
    abstract = jax.eval_shape(init_fn)
    return jax.jit(init_fn, out_shardings=self.state_sharding(abstract))()


def with_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with `mesh` active (so `constrain` sees it); called values are unchanged."""
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


# ------------------------------------------------------------------------------------ pmap mode


@dataclasses.dataclass
class PmapPlacement:
  """The step under `jax.pmap` over the mesh's devices: classic data parallelism (pmap mode).

  Layouts:
    state    a normal TrainState, every leaf replicated on every device (the same form a jit
             placement uses, so checkpoints and evaluation need no conversion). The pmapped
             step takes it un-mapped (in_axes=None, resident, donated) and returns it
             un-mapped (out_axes=None): every device computes the same update from the psum'd
             gradients, so the replicas stay identical.
    batch    [n_devices, B / n_devices, ...]: device i's rows on device i (`put_batch`).
    metrics  scalars, reduced over the axis inside the step.

  Attributes:
    mesh: the ("data", "fsdp", "tensor") mesh with data = number of devices (for code that
      builds shardings from `placement.mesh`, e.g. evaluation).
    axis_name: the pmap axis name the step reduces over.
  """

  mesh: Mesh
  axis_name: str = PMAP_AXIS
  mode = "pmap"

  def __post_init__(self):
    if self.mesh.shape["fsdp"] != 1 or self.mesh.shape["tensor"] != 1:
      raise ParallelError(f"parallel.mode='pmap' is data parallel only: parallel.mesh.fsdp and "
                          f"parallel.mesh.tensor must be 1, got {describe(self.mesh)}")
    # The mesh's devices (grouped by process), handed to jax.pmap explicitly so that its 1-D
    # mesh and the arrays put_state / put_batch build are laid out identically (no resharding).
    self.devices = tuple(self.mesh.devices.flat)
    self.pmap_mesh = Mesh(np.array(self.devices), (self.axis_name,))

  @property
  def size(self) -> int:
    return len(self.devices)

  def state_sharding(self, state):
    return replicated_shardings(state, self.pmap_mesh)

  def put_state(self, state):
    return place(state, self.state_sharding(state))

  def replicated(self):
    return NamedSharding(self.pmap_mesh, P())

  def stacked(self):
    """The sharding of put_batch's arrays: leading axis one entry per device."""
    return NamedSharding(self.pmap_mesh, P(self.axis_name))

  def put_batch(self, batch):
    """Host batch (this process's rows [B / processes, ...]) -> [n_devices, B / n_devices, ...],
    device i holding entry i."""
    local = sum(d.process_index == jax.process_index() for d in self.devices)

    def stack(x):
      x = np.asarray(x)
      if x.shape[0] % local:
        raise ParallelError(f"train.batch_size: this process's {x.shape[0]} rows do not split over "
                            f"its {local} devices (parallel.mode='pmap')")
      return x.reshape(local, x.shape[0] // local, *x.shape[1:])

    sharding = self.stacked()
    if jax.process_count() == 1:
      return jax.device_put(jax.tree.map(stack, batch), sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, stack(x)), batch)

  def jit_step(self, step_fn: Callable, state) -> Callable:
    """`jax.pmap` of `step_fn` bound to this axis: (state, stacked batch) -> (state, metrics).

    `step_fn` must reduce over the axis (loss sums, counts and gradients psum'd before dividing);
    a step from `make_train_step` is rebound with `step_fn.with_axis_name(axis)`. The state is
    donated. The returned function also has `.lower(state, batch)` for inspecting the HLO.
    """
    del state  # the layout does not depend on the state's structure
    step_fn = bind_axis_name(step_fn, self.axis_name)
    pmapped = jax.pmap(step_fn, axis_name=self.axis_name, in_axes=(None, 0), out_axes=(None, None),
                       donate_argnums=0, axis_size=self.size, devices=self.devices)
    multi = jax.process_count() > 1
    specs = (P(), P(self.axis_name))

    def step(state, batch):
      if multi:
        # Multi-process pmap takes process-local arrays and returns them; the loop, orbax and
        # evaluation want global arrays. Both conversions re-wrap the same buffers (no copies).
        from jax.experimental import multihost_utils as mhu
        state, batch = mhu.global_array_to_host_local_array((state, batch), self.pmap_mesh, specs)
        out = pmapped(state, batch)
        return mhu.host_local_array_to_global_array(out, self.pmap_mesh, (P(), P()))
      return pmapped(state, batch)

    def lower(state, batch):
      return pmapped.lower(state, batch)

    step.lower = lower
    return step

  def jit_eval(self, fn: Callable, params) -> Callable:
    """`fn(params, batch)` over the global batch, compiled with jit on the same devices.

    Evaluation functions return arbitrary outputs (sums, per-example scores) whose reduction
    over devices only `fn` knows, so they run as one SPMD program (params replicated, rows split)
    instead of under pmap; the result equals the 1-device one.
    """
    def unstacked(p, batch):
      batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
      return fn(p, batch)
    return jax.jit(unstacked, in_shardings=(self.state_sharding(params), self.stacked()),
                   out_shardings=self.replicated())

  def init(self, init_fn: Callable[[], Any]):
    """Runs `init_fn` under jit with every output replicated on the devices."""
    abstract = jax.eval_shape(init_fn)
    return jax.jit(init_fn, out_shardings=self.state_sharding(abstract))()


def bind_axis_name(step_fn: Callable, axis_name: str) -> Callable:
  """`step_fn` made to reduce over `axis_name` (for pmap), or a ParallelError saying why not.

  Steps from `make_train_step` carry `axis_name` and `with_axis_name(name) -> step`; a stage with
  its own step can provide the same two attributes.
  """
  if getattr(step_fn, "axis_name", None) == axis_name:
    return step_fn
  rebind = getattr(step_fn, "with_axis_name", None)
  if rebind is None:
    raise ParallelError(
        "parallel.mode='pmap': this stage's train step cannot reduce over devices (it has no "
        "`with_axis_name`); build it with alignax.train.step.make_train_step, or use "
        "parallel.mode='jit'")
  return rebind(axis_name)


# ------------------------------------------------------------------------------------ from config


AnyPlacement = Placement | PmapPlacement


def make_placement(parallel_cfg: ParallelConfig, model_cfg=None, global_batch: int | None = None, *,
                   with_members: bool = False) -> AnyPlacement:
  """The placement `parallel.mode` names on the mesh from config, validated against the model,
  the batch and the process layout before anything compiles (`with_members`: the mesh of a
  vectorized sweep, see `make_mesh`)."""
  mode = _field(parallel_cfg, "mode", "jit")
  if mode not in MODES:
    raise ParallelError(f"parallel.mode: must be one of {MODES}, got {mode!r}")
  mesh = make_mesh(_field(parallel_cfg, "mesh"), with_members=with_members)
  if model_cfg is not None:
    check_model_fits_mesh(model_cfg, mesh)
  if global_batch is not None:
    check_batch_fits_mesh(global_batch, mesh)
  check_processes_fit_mesh(mesh)
  if mode == "pmap":
    return PmapPlacement(mesh)
  return Placement(mesh)


def init_sharded(placement: AnyPlacement, init_fn: Callable[[], Any]):
  """Runs `init_fn` with its outputs laid out by the placement (created in place, not copied)."""
  return placement.init(init_fn)


def jit_eval(placement: AnyPlacement, fn: Callable, params) -> Callable:
  """jit `fn(params, batch)` for batches from `placement.put_batch`; outputs replicated."""
  return placement.jit_eval(fn, params)
