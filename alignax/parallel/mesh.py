"""The device mesh from `parallel.mesh`, shardings of pytrees on it, and the checks that a model,
a batch and the processes fit it (each a ParallelError before anything compiles)."""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from alignax.parallel.config import MeshConfig, ParallelError, _field
from alignax.sharding import BATCH_AXES, MEMBER_AXIS, MESH_AXES, logical_to_spec


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


def describe(mesh_or_placement) -> str:
  """"data=2 x fsdp=2 x tensor=2" (with " (pmap)" for a pmap placement)."""
  mesh = getattr(mesh_or_placement, "mesh", mesh_or_placement)
  axes = ((MEMBER_AXIS,) if MEMBER_AXIS in mesh.shape else ()) + MESH_AXES
  text = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
  return text + (" (pmap)" if getattr(mesh_or_placement, "mode", "jit") == "pmap" else "")
