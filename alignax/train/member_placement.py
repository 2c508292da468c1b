"""A group's layout: member-stacked trees, their placement on a mesh with a leading "members"
axis, and whether the group fits in memory (see `alignax.train.members`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from alignax import parallel
from alignax.errors import ConfigError


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
