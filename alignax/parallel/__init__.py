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

The parts: config.py (the `parallel.*` section), mesh.py (mesh, shardings, fit checks),
placement.py (`Placement`, `PmapPlacement`, `make_placement`), distributed.py (processes).
"""

from alignax.sharding import (AXIS_RULES, BATCH_AXES, MEMBER_AXIS, MESH_AXES, PMAP_AXIS,  # noqa: F401
                              constrain, logical_to_spec)
from alignax.parallel.config import (  # noqa: F401
    MODES, MEMBERS_STEPS, MeshConfig, DistributedConfig, ParallelConfig, ParallelError)
from alignax.parallel.mesh import (  # noqa: F401
    mesh_shape, make_mesh, tree_shardings, replicated_shardings, place, batch_sharding,
    check_model_fits_mesh, check_batch_fits_mesh, check_processes_fit_mesh, describe)
from alignax.parallel.placement import (  # noqa: F401
    Placement, with_mesh, PmapPlacement, bind_axis_name, AnyPlacement, make_placement,
    init_sharded, jit_eval)
from alignax.parallel.distributed import (  # noqa: F401
    maybe_initialize_distributed, is_main_process)
