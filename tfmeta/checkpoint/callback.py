"""`MetaCheckpoint`: the Keras callback that checkpoints a `MetaModel` run and restores it.

Example::

    from tfmeta.checkpoint import MetaCheckpoint

    checkpoint = MetaCheckpoint("runs/x/checkpoints", every_steps=100)
    start = checkpoint.restore(meta, x_shape)
    meta.fit(tasks.as_dataset(..., start=start), steps_per_epoch=total - start,
             callbacks=[checkpoint])
"""

from __future__ import annotations

import pathlib
import time

import keras

from tfmeta.checkpoint.errors import CheckpointError, IncompatibleCheckpointError
from tfmeta.checkpoint.store import (
    MANIFEST_FILE,
    latest_checkpoint,
    log,
    read_metrics,
    restore_checkpoint,
    restore_metrics,
    save_checkpoint,
)
from tfmeta.failpoints import failpoint
from tfmeta.validation import check_positive_int

__all__ = ["MetaCheckpoint"]


class MetaCheckpoint(keras.callbacks.Callback):
    """Keras callback: checkpoint a `MetaModel` run, and restore it.

    Saves every `every_steps` train steps (rounded up to the end of a
    `steps_per_execution` group), every `every_seconds` seconds, at the end
    of every epoch and of training. Only the `keep` newest checkpoints stay.

    Args:
        directory: folder of this run's checkpoints (nothing else in it).
        every_steps: save period in train steps (None: no step period).
        every_seconds: save period in wall-clock seconds (None: none).
        keep: complete checkpoints kept (>= 1; the previous one is only
            removed once the new one is complete).
        metadata: JSON-serializable dict stored in every manifest (e.g. the
            run's seed and task-batch shape, checked on resume).
        unchecked_metadata: keys of `metadata` stored but not compared on
            restore, because the caller checks them itself with its own
            rules (`tools/train.py`'s gin bindings, some of which a resume
            may change: `tfmeta.cli.settings.check_same_bindings`).

    Example::

        checkpoint = MetaCheckpoint("runs/x/checkpoints", every_steps=100)
        start = checkpoint.restore(meta, x_shape)
        meta.fit(tasks.as_dataset(..., start=start), steps_per_epoch=total - start,
                 callbacks=[checkpoint])
    """

    def __init__(self, directory, every_steps=None, every_seconds=None, keep=2, metadata=None,
                 unchecked_metadata=()):
        super().__init__()
        # Not int(): every_steps=2.5 would save every 2 steps, keep=1.9 keep 1.
        if every_steps is not None:
            every_steps = check_positive_int("every_steps", every_steps, fix="pass a whole "
                                             "number of train steps, or None for no step period")
        if every_seconds is not None and not float(every_seconds) > 0:
            raise ValueError(f"every_seconds={every_seconds} must be > 0 (or None).")
        self.directory = pathlib.Path(directory)
        if self.directory.is_file():
            raise CheckpointError(f"the checkpoint folder {self.directory} is a file: pass a folder "
                                  "(created if missing), e.g. runs/x/checkpoints")
        if (self.directory / MANIFEST_FILE).is_file():
            raise CheckpointError(
                f"{self.directory} is one checkpoint, not a checkpoint folder: pass the folder "
                f"holding it, {self.directory.parent}")
        self.every_steps = every_steps
        self.every_seconds = None if every_seconds is None else float(every_seconds)
        self.keep = check_positive_int("keep", keep, fix="keep at least the newest checkpoint")
        self.metadata = dict(metadata or {})
        self.unchecked_metadata = frozenset(unchecked_metadata)
        self.step = 0
        self._saved_step = 0
        self._begin = 0
        self._last_time = time.monotonic()
        self._pending_metrics = None

    def restore(self, meta, x_shape=None):
        """Restore the newest checkpoint into `meta`; return the steps done (0 if none).

        Args:
            meta: a compiled `MetaModel`.
            x_shape: the per-replica task-batch shape `[T, S, B, ...]` to
                build `meta` with, if it is not built yet.
        """
        if not meta.built:
            if x_shape is None:
                raise CheckpointError(
                    "restore needs the task-batch shape to build the MetaModel: pass "
                    "x_shape=dataset.element_spec[0].shape (per replica)."
                )
            with meta.distribute_strategy.scope():
                meta.build(tuple(x_shape))
        found = latest_checkpoint(self.directory)
        if found is None:
            self.step = self._saved_step = 0
            return 0
        path, manifest = found
        self.check_metadata(manifest, path)
        restore_checkpoint(meta, path, manifest)
        self.step = self._saved_step = int(manifest["step"])
        if not manifest.get("epoch_complete", True):
            # Keras resets metrics when the epoch begins: continue the
            # interrupted epoch's running metrics from there.
            self._pending_metrics = read_metrics(path, manifest)
        log.info("Restored %s (%d train steps done).", path, self.step)
        return self.step

    def check_metadata(self, manifest, path):
        """Refuse a checkpoint whose run metadata differs from this run's (but `unchecked_metadata`)."""
        saved = manifest.get("metadata", {})
        for key, value in self.metadata.items():
            if key in saved and key not in self.unchecked_metadata and saved[key] != value:
                raise IncompatibleCheckpointError(
                    f"checkpoint {path} was written with {key}={saved[key]!r} but this run "
                    f"has {key}={value!r}: resume with the original setting (the task "
                    "stream would differ), or start a new run in another output directory."
                )

    def save(self, epoch_complete=True):
        if self._saved_step == self.step:
            return None
        path = save_checkpoint(
            self.model, self.directory, self.step, metadata=self.metadata, keep=self.keep,
            epoch_complete=epoch_complete,
        )
        self._saved_step = self.step
        self._last_time = time.monotonic()
        return path

    def on_epoch_begin(self, epoch, logs=None):
        if self._pending_metrics is not None:
            restore_metrics(self.model, *self._pending_metrics)
            self._pending_metrics = None

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = batch

    def on_train_batch_end(self, batch, logs=None):
        self.step += batch - self._begin + 1
        failpoint("train.step")
        due = self.every_steps is not None and self.step - self._saved_step >= self.every_steps
        if self.every_seconds is not None and time.monotonic() - self._last_time >= self.every_seconds:
            due = True
        steps = (self.params or {}).get("steps")
        if due and not (steps and batch + 1 >= steps):
            # An epoch's last step is saved by `on_epoch_end` instead, after the
            # callbacks listed before this one (CSVLogger) have logged the
            # epoch: a kill in between must not leave a checkpoint past a
            # history row that was never written.
            self.save(epoch_complete=False)

    def on_epoch_end(self, epoch, logs=None):
        self.save()

    def on_train_end(self, logs=None):
        self.save()
