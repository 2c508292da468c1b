"""Sharding primitives: the mesh axes, the logical-axis rules and `constrain`.

At the bottom of the package so the model can place its activations without knowing about
placements; `alignax.parallel` builds meshes and placements on top of these.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
MEMBER_AXIS = "members"  # the leading axis of a vectorized sweep's mesh (alignax.train.members)
BATCH_AXES = ("data", "fsdp")
PMAP_AXIS = "data"  # pmap's axis name: the data axis of the mesh it replaces

# Logical axis name -> mesh axis (or a tuple of axes; None: replicated). One table for params
# and activations. Stacked block params have a leading "layers" axis.
AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "positions": None,
    # activations (see `constrain`): rows split like the batch; the residual stream's features
    # are whole on every device (not over fsdp, whose weights are gathered instead, and not
    # over tensor, whose row-parallel matmuls all-reduce into it: the Megatron layout)
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
}


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
    target = AXIS_RULES.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n in mesh.shape and n not in used and mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    if not names or dim % size:
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """`x` with a sharding constraint from logical axis names, when a jit placement traces.

  `Placement.jit_step` / `jit_eval` make their mesh the abstract mesh while tracing; anywhere
  else (no mesh, a mesh without the alignax axes, or under pmap's manual axes) this returns `x`
  unchanged, so model code may call it without knowing about meshes.

  Args:
    x: an activation, e.g. [B, T, d].
    logical_axes: one name (a key of `AXIS_RULES`) or None per dimension of `x`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  if any(t != AxisType.Auto for t in mesh.axis_types):
    return x  # under shard_map (pmap mode) axes are manual: nothing to constrain
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))
