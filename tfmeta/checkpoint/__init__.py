"""Checkpoints of meta-training that survive being killed at any moment.

A checkpoint holds everything a `MetaModel` run depends on: phi and the
wrapped model's non-trainable state, every task's in-flight inner state
(parameters, inner optimizer slots, learner accumulators, BatchNorm state
and seeds), the position in the trajectory (CTS's place in its K steps, the
trajectory length), the number of meta-updates, the shift seed, the outer
optimizer's variables, and the number of train steps done, i.e. the
position in the task stream. Task streams are deterministic functions of
(seed, chunk index) (`TaskDistribution.as_dataset(..., start=n)`), so a run
killed at any moment and resumed from its last checkpoint replays exactly
the train steps the uninterrupted run would have taken from there and ends
with the same phi.

The package has four parts:

- `tfmeta.checkpoint.state`: which variables a checkpoint holds and how
  per-replica values are read and assigned;
- `tfmeta.checkpoint.store`: the on-disk format and its I/O
  (`save_checkpoint`, `latest_checkpoint`, `restore_checkpoint`, ...);
- `tfmeta.checkpoint.callback`: `MetaCheckpoint`, the Keras callback;
- `tfmeta.checkpoint.resume`: `resumable_fit`, the epoch bookkeeping of a
  run resumed in the middle of an epoch, in whole executions of any
  `steps_per_execution` (`execution_size`, from `tfmeta.replicas`, next to
  the whole-executions check of `fit`).

Everything is importable from `tfmeta.checkpoint` itself.

Example::

    from tfmeta.checkpoint import MetaCheckpoint

    checkpoint = MetaCheckpoint("runs/leap/checkpoints", every_steps=100)
    start = checkpoint.restore(meta, x_shape)          # 0 on a fresh run
    meta.fit(tasks.as_dataset(..., start=start),
             steps_per_epoch=total - start, callbacks=[checkpoint])
"""

from tfmeta.checkpoint.callback import MetaCheckpoint
from tfmeta.checkpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from tfmeta.checkpoint.resume import execution_size, resumable_fit
from tfmeta.checkpoint.state import metric_variables, training_variables
from tfmeta.checkpoint.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
    read_manifest,
    read_metrics,
    restore_checkpoint,
    restore_metrics,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IncompatibleCheckpointError",
    "MANIFEST_FILE",
    "MetaCheckpoint",
    "STATE_FILE",
    "execution_size",
    "latest_checkpoint",
    "list_checkpoints",
    "metric_variables",
    "read_manifest",
    "read_metrics",
    "restore_checkpoint",
    "restore_metrics",
    "resumable_fit",
    "save_checkpoint",
    "training_variables",
]
