"""Checkpoints that never lose work, and the params-only exports that chain stages.

`WORKDIR/checkpoints/<step>/` holds, through an orbax `CheckpointManager` (async, keep-N):
  state   the TrainState (params, optimizer state, step, rng, guard counters, extra)
  data    the data iterator's state (JSON), so a resumed run reads the same next batch
  config  the resolved config (JSON)
  meta    step, wall time, library versions
  checksums  SHA-256 of every state array and of the three JSON items above, taken at save time

Orbax writes each step into a temporary directory and renames it when complete, so a kill
mid-save leaves the previous step as the latest. A checkpoint that fails to restore (corrupt or
truncated files) or whose restored values do not match its checksums is reported on the console
and the next older step is tried. Orbax itself does not notice a flipped byte in the array data
(zarr chunks are zstd-compressed without a content checksum; only the OCDBT index is checked),
so without `checksums` such a step would restore silently wrong values.

`check_resume` compares a resumed run's config with the one its checkpoint was written with, and
`save_export` refuses params that are not finite.

`WORKDIR/export/` holds what the next stage needs: params as a plain nested dict and
`export.json` (model config, tokenizer, stage, extras such as reward normalization).

The parts: config.py (`CheckpointConfig`), integrity.py (checksums), checkpointer.py
(`Checkpointer`), resume.py (`check_resume`), exports.py, signals.py (`StopSignal`).
"""

from alignax.errors import CheckpointError  # noqa: F401
from alignax.checkpoint.config import (  # noqa: F401
    CheckpointConfig)
from alignax.checkpoint.integrity import (  # noqa: F401
    CHECKSUM_ITEM, JSON_ITEMS, ITEM_NAMES, JSON_FILE, CHECKSUM_VERSION, DamagedStep, console,
    json_value, json_digest, leaf_name, state_digests, step_checksums, check_json_items,
    check_state, saved_steps, read_verified_json)
from alignax.checkpoint.checkpointer import (  # noqa: F401
    library_versions, model_differences, SHAPE_KEYS, gather_data_states, own_data_state,
    Checkpointer)
from alignax.checkpoint.resume import (  # noqa: F401
    RESUME_FREE_KEYS, RESUME_CHANGED, resume_free, resume_differences, latest_saved_config,
    check_resume)
from alignax.checkpoint.exports import (  # noqa: F401
    EXPORT_DIR, export_path, has_export, save_export, nonfinite_leaves, check_finite_export,
    read_export_meta, load_export, export_model_config)
from alignax.checkpoint.signals import (  # noqa: F401
    StopSignal)
