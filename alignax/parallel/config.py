"""The `parallel.*` config section: mode, mesh axis sizes, vectorized-sweep members, processes."""

from __future__ import annotations

import dataclasses

from alignax.sections import Section, one_of, require
from alignax.sharding import MESH_AXES

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


def _field(section, key: str, default=None):
  """A field of a typed section (`MeshConfig`, ...), or of a plain mapping of it (tests and
  scripts that build a mesh directly)."""
  if dataclasses.is_dataclass(section):
    return getattr(section, key)
  return section.get(key, default)
