"""Scale is a config change: the device mesh, logical axis rules, shardings and jitted steps.

Mesh axes are ("data", "fsdp", "tensor"). Parameters carry logical axis names (see
`alignax.models.transformer`); `AXIS_RULES`, the one table in alignax that says where they go,
maps each logical name to a mesh axis (or None: replicated). The batch is split over
("data", "fsdp"). Everything else (step counters, keys, scalars) is replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis. Stacked block params have a leading "layers" axis.
AXIS_RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "positions": None,
    "batch": BATCH_AXES,
}


class ParallelError(ValueError):
  """A mesh or batch layout that cannot work; raised before anything compiles."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 entries of `parallel.mesh` so that the product is `num_devices`."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
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


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh that `parallel.mesh` describes, in Auto sharding mode."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  used = devices[: math.prod(shape)]
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=used)


def logical_to_spec(axes, shape, mesh: Mesh) -> P:
  """PartitionSpec for an array with logical `axes` (a leading stacked axis is replicated).

  A mesh axis that does not divide its dimension, or is already used by an earlier dimension,
  is dropped (that dimension is replicated) rather than failing to compile.
  """
  axes = tuple(axes)
  if len(shape) == len(axes) + 1:
    axes = ("layers",) + axes
  if len(shape) != len(axes):
    return P()
  spec, used = [], set()
  for dim, name in zip(shape, axes):
    target = AXIS_RULES.get(name)
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    if not names or dim % size:
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"); other dimensions replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_model_fits_mesh(model_cfg, mesh: Mesh) -> None:
  """Tensor parallelism splits heads, kv heads and the MLP: each must divide by the tensor axis."""
  t = mesh.shape["tensor"]
  for name, value in (("n_heads", model_cfg.n_heads), ("n_kv_heads", model_cfg.kv_heads),
                      ("d_ff", model_cfg.d_ff)):
    if value % t:
      raise ParallelError(f"parallel.mesh.tensor={t} does not divide model.{name}={value}")


def check_batch_fits_mesh(global_batch: int, mesh: Mesh, key: str = "train.batch_size") -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n:
    raise ParallelError(f"{key}={global_batch} is not divisible by the data axes "
                        f"(data x fsdp = {n})")


@dataclasses.dataclass
class Placement:
  """Puts state and batches on the mesh and jits steps with matching shardings (jit mode)."""

  mesh: Mesh

  def state_sharding(self, state):
    return tree_shardings(state, self.mesh)

  def put_state(self, state):
    return jax.device_put(state, self.state_sharding(state))

  def put_batch(self, batch):
    """Host batch (this process's rows) -> global arrays split over the data axes."""
    sharding = batch_sharding(self.mesh)
    if jax.process_count() == 1:
      return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

  def replicated(self):
    return NamedSharding(self.mesh, P())

  def jit_step(self, step_fn: Callable, state) -> Callable:
    """jit with the state's shardings in and out, the batch split over data, state donated."""
    state_sh = self.state_sharding(state)
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sharding(self.mesh)),
                   out_shardings=(state_sh, self.replicated()), donate_argnums=0)


def make_placement(parallel_cfg, model_cfg=None, global_batch: int | None = None) -> Placement:
  """The mesh from config, validated against the model and batch before anything compiles."""
  mesh = make_mesh(parallel_cfg.mesh)
  if model_cfg is not None:
    check_model_fits_mesh(model_cfg, mesh)
  if global_batch is not None:
    check_batch_fits_mesh(global_batch, mesh)
  return Placement(mesh)


def maybe_initialize_distributed(dist_cfg) -> bool:
  """`jax.distributed.initialize` from `parallel.distributed` or the environment, once.

  With `coordinator` set (e.g. "10.0.0.1:1234") the config gives the process layout; otherwise
  JAX's own environment detection runs when `JAX_COORDINATOR_ADDRESS` is set (or on managed
  clusters such as Cloud TPU / SLURM, which set their own variables). Single-process runs skip it.

  Returns True when this process is part of a multi-process job.
  """
  import os
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if dist_cfg.coordinator:
    jax.distributed.initialize(coordinator_address=dist_cfg.coordinator,
                               num_processes=int(dist_cfg.num_processes),
                               process_id=int(dist_cfg.process_id))
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def is_main_process() -> bool:
  return jax.process_index() == 0


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)



def init_sharded(placement: Placement, init_fn: Callable[[], Any]):
  """Runs `init_fn` under jit with its outputs laid out on the mesh, so large params are created
  already sharded instead of on one device first."""
  abstract = jax.eval_shape(init_fn)
  return jax.jit(init_fn, out_shardings=placement.state_sharding(abstract))()


def jit_eval(placement: Placement, fn: Callable, params) -> Callable:
  """jit `fn(params, batch)` with the params' shardings, the batch over the data axes, outputs replicated."""
  return jax.jit(fn, in_shardings=(placement.state_sharding(params), batch_sharding(placement.mesh)),
                 out_shardings=placement.replicated())
