"""Scale is a config change: the device mesh, logical axis rules, shardings and compiled steps.

Two modes (`parallel.mode`), one interface (a *placement*), so the loop, runner and stages never
ask which one runs:

  "jit"   `Placement`: a ("data", "fsdp", "tensor") mesh; parameters carry logical axis names
          (see `alignax.models.transformer`) that `AXIS_RULES`, the one table in alignax that
          says where arrays go, maps to mesh axes; the batch is split over ("data", "fsdp");
          XLA's SPMD partitioner inserts the collectives.
  "pmap"  `PmapPlacement`: the same step function under `jax.pmap` over all devices of the
          mesh (pure data parallelism): params replicated, each device takes its rows of the
          batch, and the step sums loss, token count and gradients with `lax.psum` over the
          axis before dividing, so the loss is the global-batch loss, exactly as on 1 device.

A placement provides
  state_sharding(tree)      shardings for a TrainState (or params) in its canonical form
  put_state(state)          places a TrainState
  put_batch(host_batch)     this process's rows -> the global batch the compiled functions take
  jit_step(step_fn, state)  `(state, batch) -> (state, metrics)`, compiled, state donated
  jit_eval(fn, params)      `fn(params, batch)` over the global batch, outputs replicated
  init(init_fn)             runs `init_fn() -> state` with its outputs placed
  replicated()              the sharding of scalars and metrics

The state is the same normal (un-stacked) TrainState in both modes: with JAX >= 0.8 `jax.pmap`
is built on `jit` + `shard_map`, so an un-mapped argument (in_axes=None) stays resident on the
devices (no per-step transfer) and a replicated output (out_axes=None) comes back as one array.
Checkpoints, evaluation, exports and resuming onto another mode or mesh therefore need no
conversion (no `replicate` / `unreplicate` of the classic pmap layout, nothing for the loop to
call).

Multi-host: `maybe_initialize_distributed` runs `jax.distributed.initialize` from config or the
environment; every process reads its own shard of the data, `put_batch` assembles the global
batch with `jax.make_array_from_process_local_data`, and all processes write checkpoints
together (orbax); only process 0 writes logs (see `is_main_process`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from alignax.sections import Section, one_of, require
from alignax.sharding import (AXIS_RULES, BATCH_AXES, MEMBER_AXIS, MESH_AXES, PMAP_AXIS,  # noqa: F401
                              constrain, logical_to_spec)

MODES = ("jit", "pmap")
MEMBERS_STEPS = ("vmap", "map")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
  """Mesh axis sizes; -1 fills the remaining devices. `members` splits a vectorized sweep's
  members (alignax sweep --vectorize)."""

  SECTION = "parallel.mesh"
  members: int = 1
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def check(self) -> None:
    for axis in MESH_AXES:
      size = getattr(self, axis)
      require(size == -1 or size >= 1, f"parallel.mesh.{axis}", f"must be -1 or >= 1, got {size}")
    require(self.members >= 1, "parallel.mesh.members", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Section):
  """`jax.distributed.initialize` settings: coordinator "HOST:PORT" (with num_processes and
  process_id), "auto" (JAX's cluster detection), or "" (from the environment, or one process)."""

  SECTION = "parallel.distributed"
  coordinator: str = ""
  num_processes: int = 1
  process_id: int = 0


@dataclasses.dataclass(frozen=True)
class ParallelConfig(Section):
  """Attributes:
    mode: "jit" (named shardings on a mesh) or "pmap".
    mesh: the mesh's axis sizes.
    members_step: how a vectorized sweep's step runs its members: "vmap" (one batched program,
      for accelerators) or "map" (lax.map, one member after another inside the one program; on
      CPU, where a member's step already fills the cores, this keeps the single run's speed and
      still shares start-up, data set-up and compilation).
    distributed: multi-process initialization.
  """

  SECTION = "parallel"
  mode: str = "jit"
  mesh: MeshConfig = MeshConfig()
  members_step: str = "vmap"
  distributed: DistributedConfig = DistributedConfig()

  def check(self) -> None:
    one_of(self.mode, "parallel.mode", MODES)
    one_of(self.members_step, "parallel.members_step", MEMBERS_STEPS)
class ParallelError(ValueError):
  """A mesh, batch or process layout that cannot work; raised before anything compiles."""


# ------------------------------------------------------------------------------------ the mesh


def _field(section, key: str, default=None):
  """A field of a typed section (`MeshConfig`, ...), or of a plain mapping of it (tests and
  scripts that build a mesh directly)."""
  if dataclasses.is_dataclass(section):
    return getattr(section, key)
  return section.get(key, default)


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 entries of `parallel.mesh` so that the product is `num_devices`."""
  sizes = [int(_field(mesh_cfg, a)) for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ParallelError(f"parallel.mesh.{axis}: must be -1 or >= 1, got {size}")
  fixed = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1:
    raise ParallelError("parallel.mesh: at most one axis may be -1")
  if fixed > num_devices:
    raise ParallelError(f"parallel.mesh: {dict(zip(MESH_AXES, sizes))} needs {fixed} devices, "
                        f"but only {num_devices} are available")
  if -1 in sizes:
    if num_devices % fixed:
      raise ParallelError(f"parallel.mesh: {num_devices} devices are not divisible by the fixed axes' "
                          f"product {fixed}")
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    logging.warning("parallel.mesh uses %d of %d devices", fixed, num_devices)
  return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices=None, *, with_members: bool = False) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh that `parallel.mesh` describes, in Auto sharding mode.

  With `with_members` (a vectorized sweep) the mesh has a leading "members" axis of size
  `parallel.mesh.members`, and the other axes share the remaining devices. Members vary fastest
  in device order, so each process holds every member of its block of batch rows (each process
  reads its own rows for every member).
  """
  devices = list(devices if devices is not None else jax.devices())
  members = int(_field(mesh_cfg, "members", 1))
  if members < 1:
    raise ParallelError(f"parallel.mesh.members: must be >= 1, got {members}")
  if not with_members:
    if members > 1:
      raise ParallelError(f"parallel.mesh.members={members} splits the members of a vectorized sweep "
                          "(alignax sweep --vectorize); a single run has one member")
    shape = mesh_shape(mesh_cfg, len(devices))
    used = devices[: math.prod(shape)]
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=used)
  if len(devices) % members:
    raise ParallelError(f"parallel.mesh.members={members} does not divide the {len(devices)} devices")
  shape = mesh_shape(mesh_cfg, len(devices) // members)
  used = devices[: math.prod(shape) * members]
  grid = np.moveaxis(np.array(used, dtype=object).reshape(*shape, members), -1, 0)
  return Mesh(grid, (MEMBER_AXIS,) + MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for any pytree: Variables with `logical_axes` by the rules, others replicated."""
  def leaf_sharding(x):
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get("logical_axes")
      value = x.get_value()
      spec = logical_to_spec(axes, value.shape, mesh) if axes else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_shardings(tree, mesh: Mesh):
  """A replicated NamedSharding for every leaf of `tree` (Variables keep their wrapper)."""
  def leaf_sharding(x):
    if isinstance(x, nnx.Variable):
      return x.replace(NamedSharding(mesh, P()))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(tree, shardings):
  """`jax.device_put(tree, shardings)` that also works with several processes.

  With one process this is `device_put`. With several, `device_put` cannot turn a host value
  into an array spanning other processes' devices, so each leaf is built from its full host
  value (every process holds the same one, e.g. after a seeded init) with
  `make_array_from_callback`; arrays that are already global are resharded if needed.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, sharding):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = one(jax.random.key_data(x), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x if x.sharding == sharding else jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"); other dimensions replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


# ------------------------------------------------------------------------------------ checks


def check_model_fits_mesh(model_cfg, mesh: Mesh) -> None:
  """Tensor parallelism splits heads, kv heads and the MLP: each must divide by the tensor axis."""
  t = mesh.shape["tensor"]
  for name, value in (("n_heads", model_cfg.n_heads), ("n_kv_heads", model_cfg.kv_heads),
                      ("d_ff", model_cfg.d_ff)):
    if value % t:
      raise ParallelError(f"parallel.mesh.tensor={t} does not divide model.{name}={value}")


def check_batch_fits_mesh(global_batch: int, mesh: Mesh, key: str = "train.batch_size") -> None:
  """The global batch splits evenly over the data axes (data x fsdp)."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n:
    raise ParallelError(f"{key}={global_batch} is not divisible by the data axes "
                        f"(data x fsdp = {n})")


def check_processes_fit_mesh(mesh: Mesh) -> None:
  """Each process must feed its own contiguous block of the batch's rows.

  Processes read disjoint data shards, so two processes whose devices hold the same batch rows
  (e.g. a "tensor" axis spanning hosts) would each supply different rows for one global slice.
  """
  nproc = jax.process_count()
  if nproc == 1:
    return
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  rows: dict[int, set] = {}
  for device, index in batch_sharding(mesh).devices_indices_map((n,)).items():
    rows.setdefault(device.process_index, set()).add(index[0].start or 0)
  owners: dict[int, int] = {}
  for proc, starts in rows.items():
    for s in starts:
      if owners.setdefault(s, proc) != proc:
        raise ParallelError(
            f"parallel.mesh: {describe(mesh)} puts the same batch rows on processes {owners[s]} and "
            f"{proc}, but each process reads its own data; keep parallel.mesh.tensor within a host "
            f"and make data x fsdp a multiple of the {nproc} processes")
    if sorted(starts) != list(range(min(starts), max(starts) + 1)):
      raise ParallelError(f"parallel.mesh: {describe(mesh)}: process {proc}'s devices do not hold a "
                          f"contiguous block of the batch")


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


# ------------------------------------------------------------------------------------ processes


def maybe_initialize_distributed(dist_cfg: DistributedConfig) -> bool:
  """`jax.distributed.initialize` from `parallel.distributed` or the environment, once.

  In order of precedence:
    parallel.distributed.coordinator="HOST:PORT"  with .num_processes and .process_id;
    parallel.distributed.coordinator="auto"       JAX's cluster detection (SLURM, Open MPI,
                                                   Cloud TPU, Kubernetes);
    $JAX_COORDINATOR_ADDRESS                       with $JAX_NUM_PROCESSES and $JAX_PROCESS_ID
                                                   when set, otherwise cluster detection.
  Otherwise (the default) the run is single-process. Must run before anything touches devices.

  Returns True when this process is part of a multi-process job.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator = str(dist_cfg.coordinator or "")
  if coordinator == "auto":
    jax.distributed.initialize()
  elif coordinator:
    num, pid = int(dist_cfg.num_processes), int(dist_cfg.process_id)
    if num < 1:
      raise ParallelError(f"parallel.distributed.num_processes: must be >= 1, got {num}")
    if not 0 <= pid < num:
      raise ParallelError(f"parallel.distributed.process_id: must be in [0, {num}), got {pid}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                               ("process_id", "JAX_PROCESS_ID")) if os.environ.get(v)}
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], **env)
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0 writes logs, metrics, progress and the resolved config."""
  return jax.process_index() == 0


def describe(mesh_or_placement) -> str:
  """"data=2 x fsdp=2 x tensor=2" (with " (pmap)" for a pmap placement)."""
  mesh = getattr(mesh_or_placement, "mesh", mesh_or_placement)
  axes = ((MEMBER_AXIS,) if MEMBER_AXIS in mesh.shape else ()) + MESH_AXES
  text = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
  return text + (" (pmap)" if getattr(mesh_or_placement, "mode", "jit") == "pmap" else "")
