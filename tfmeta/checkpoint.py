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

On disk, `directory/` holds complete checkpoints only::

    ckpt-000000120/
      state.npz       every variable's value (per replica for per-replica state)
      manifest.json   format, step, variables (names, shapes, dtypes), the
                      sha256 of state.npz, and run metadata

A checkpoint is written into a hidden `.ckpt-*.partial` folder, flushed to
disk (fsync), and renamed to `ckpt-<step>` only when complete; older
checkpoints are deleted only after that, so a kill at any moment leaves the
previous good checkpoint. On restore the newest checkpoint's sha256 is
checked: a damaged or edited checkpoint raises `CorruptCheckpointError` and is
never silently loaded; leftover partial folders are reported and removed.

Example::

    from tfmeta.checkpoint import MetaCheckpoint

    checkpoint = MetaCheckpoint("runs/leap/checkpoints", every_steps=100)
    start = checkpoint.restore(meta, x_shape)          # 0 on a fresh run
    meta.fit(tasks.as_dataset(..., start=start),
             steps_per_epoch=total - start, callbacks=[checkpoint])

`resumable_fit` does the bookkeeping of epochs when a run resumes in the
middle of one; `tools/train.py --resume` uses it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import shutil
import signal
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

from tfmeta.checksums import sha256_file

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "MetaCheckpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "restore_checkpoint",
    "resumable_fit",
    "save_checkpoint",
]

FORMAT_NAME = "tfmeta.checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "state.npz"
MANIFEST_FILE = "manifest.json"
PREFIX = "ckpt-"
PARTIAL_SUFFIX = ".partial"

#: Test hook: ``TFMETA_FAULT=<point>@<n>`` SIGKILLs the process the n-th time
#: it reaches ``<point>`` (see `fault_point`). Points: ``checkpoint.started``,
#: ``checkpoint.state_written`` (state.npz on disk, no manifest yet),
#: ``checkpoint.manifest_written`` (complete but not renamed),
#: ``checkpoint.renamed`` (renamed, older checkpoints not yet pruned),
#: ``train.step`` (after every train execution).
FAULT_ENV = "TFMETA_FAULT"

log = logging.getLogger("tfmeta.checkpoint")
_fault_counts: dict = {}


class CheckpointError(RuntimeError):
    """Base class of checkpoint problems."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are missing, unreadable or differ from their sha256."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint was written by a different model or run configuration."""


def fault_point(name):
    """SIGKILL this process when ``TFMETA_FAULT`` asks for it (tests only).

    ``TFMETA_FAULT="checkpoint.state_written@2"`` kills the process the
    second time a checkpoint write reaches that point: a real, uncatchable
    kill in the middle of the write. Several points may be given, separated
    by commas.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    for item in spec.split(","):
        point, _, count = item.strip().partition("@")
        if point == name and _fault_counts[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------- variables
def training_variables(meta):
    """The variables a checkpoint holds, in a fixed order.

    The MetaModel's variables (the wrapped model's phi and non-trainable
    state, the task state, position, trajectory length, meta-update count,
    shift seed) and the outer optimizer's (iterations, learning rate, slots).
    Metric accumulators are saved apart (`metric_variables`): they only
    matter within an epoch, for the logs.
    """
    if not meta.built:
        raise CheckpointError(
            "The MetaModel is not built yet, so its task state does not exist: call "
            "meta.build(x_shape) (the per-replica task-batch shape) before saving or "
            "restoring a checkpoint."
        )
    optimizer = meta.optimizer
    if optimizer is None:
        raise CheckpointError("Compile the MetaModel before saving or restoring a checkpoint.")
    if not optimizer.built:
        with meta.distribute_strategy.scope():
            optimizer.build(meta.model.trainable_variables)
    seen, out = set(), []
    for variable in list(meta.variables) + list(optimizer.variables):
        if id(variable) not in seen:
            seen.add(id(variable))
            out.append(variable)
    return out


def metric_variables(meta):
    """The metric accumulators (e.g. the epoch's running mean loss), deduplicated."""
    seen, out = set(), []
    for variable in meta.metrics_variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            out.append(variable)
    return out


def _components(variable):
    """Per-replica copies of a per-replica (`on_read`) variable, else None."""
    value = getattr(variable, "value", variable)
    if isinstance(value, tf.distribute.DistributedValues):
        if getattr(value, "synchronization", None) == tf.VariableSynchronization.ON_READ:
            return list(value.values)
    return None


def _read(variable):
    parts = _components(variable)
    if parts is not None and len(parts) > 1:
        return np.stack([np.asarray(p.numpy()) for p in parts]), len(parts)
    return np.array(variable.numpy()), 1


def _write(variable, array, replicas):
    parts = _components(variable)
    if replicas > 1:
        if parts is None or len(parts) != replicas:
            raise IncompatibleCheckpointError(
                f"{variable.path} was saved from {replicas} replicas but this run has "
                f"{1 if parts is None else len(parts)}: resume with the same number of "
                "replicas (devices) as the run that wrote the checkpoint."
            )
        for part, value in zip(parts, array):
            part.assign(value)
    elif parts is not None and len(parts) > 1:
        for part in parts:  # per-replica state saved from one replica
            part.assign(array)
    else:
        variable.assign(array)


# ----------------------------------------------------------------- files


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _step_of(path):
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return None


def list_checkpoints(directory):
    """The complete checkpoints in `directory`, oldest first (`[(step, path)]`)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX):
            step = _step_of(path)
            if step is not None:
                found.append((step, path))
    return sorted(found)


def _partials(directory):
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir()
        if p.name.startswith("." + PREFIX) and p.name.endswith(PARTIAL_SUFFIX)
    )


def save_checkpoint(meta, directory, step, *, metadata=None, keep=2, epoch_complete=True):
    """Write the state of `meta` after `step` train steps; return its folder.

    Atomic: the checkpoint appears under its final name only when complete
    and on disk; the `keep` newest complete checkpoints are kept (older ones
    are removed after the new one is in place). The metric accumulators are
    saved too; `epoch_complete=False` marks a checkpoint taken in the middle
    of an epoch, whose running metrics a resumed run continues
    (`MetaCheckpoint` restores them), so its logs match an uninterrupted run.

    Example::

        save_checkpoint(meta, "runs/x/checkpoints", step=200, metadata={"seed": 0})
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = int(step)
    fault_point("checkpoint.started")
    variables = training_variables(meta)
    arrays, entries = {}, []
    for i, variable in enumerate(variables):
        array, replicas = _read(variable)
        arrays[f"v{i}"] = array
        entries.append({
            "name": variable.path,
            "shape": list(variable.shape),
            "dtype": keras.backend.standardize_dtype(variable.dtype),
            "replicas": replicas,
        })
    metrics = metric_variables(meta)
    metric_entries = []
    for i, variable in enumerate(metrics):
        arrays[f"m{i}"], replicas = _read(variable)
        metric_entries.append(
            {"name": variable.path, "shape": list(variable.shape), "replicas": replicas}
        )
    staging = directory / f".{PREFIX}{step:09d}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"
    staging.mkdir()
    try:
        with open(staging / STATE_FILE, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        fault_point("checkpoint.state_written")
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "variables": entries,
            "metrics": metric_entries,
            "epoch_complete": bool(epoch_complete),
            "files": {STATE_FILE: sha256_file(staging / STATE_FILE)},
            "metadata": metadata or {},
        }
        with open(staging / MANIFEST_FILE, "w") as handle:
            handle.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(staging)
        fault_point("checkpoint.manifest_written")
        target = directory / f"{PREFIX}{step:09d}"
        if target.exists():
            # The same step written again (a resumed run passing a step it had
            # already saved): the state is the same; replace the old copy.
            old = directory / f".{PREFIX}{step:09d}.{uuid.uuid4().hex[:8]}.old{PARTIAL_SUFFIX}"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fault_point("checkpoint.renamed")
    complete = list_checkpoints(directory)
    for _, path in complete[: max(0, len(complete) - max(1, int(keep)))]:
        shutil.rmtree(path, ignore_errors=True)
    return target


def read_manifest(path):
    """Validate the checkpoint folder `path` and return its manifest.

    Raises `CorruptCheckpointError` when a file is missing, unreadable or
    differs from the sha256 its manifest records.
    """
    path = pathlib.Path(path)
    fix = (
        f"delete {path} to resume from the previous checkpoint (or start afresh "
        "without --resume in a new output directory)"
    )
    manifest_file = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: {MANIFEST_FILE} is missing or unreadable "
            f"({error}); {fix}."
        ) from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(
            f"{path} is not a tfmeta checkpoint (its {MANIFEST_FILE} has no format "
            f"{FORMAT_NAME!r}); {fix}."
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"checkpoint {path} has format version {manifest.get('format_version')}; this "
            f"tfmeta reads up to {FORMAT_VERSION}: upgrade tfmeta to resume it."
        )
    for name, expected in sorted(manifest.get("files", {}).items()):
        file = path / name
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {name} is missing; {fix}.")
        if sha256_file(file) != expected:
            raise CorruptCheckpointError(
                f"checkpoint {path} is corrupt: the sha256 of {name} does not match its "
                f"manifest (damaged or edited after it was written); {fix}."
            )
    if STATE_FILE not in manifest.get("files", {}):
        raise CorruptCheckpointError(f"checkpoint {path} lists no {STATE_FILE}; {fix}.")
    return manifest


def latest_checkpoint(directory):
    """`(path, manifest)` of the newest checkpoint in `directory`, or None.

    Leftover partial writes (the writer was killed) are reported and removed;
    the newest complete checkpoint is verified (sha256) and a corrupt one
    raises `CorruptCheckpointError`: it is never skipped silently.
    """
    for partial in _partials(directory):
        log.warning("Removing the incomplete checkpoint %s (its writer was interrupted).", partial)
        shutil.rmtree(partial, ignore_errors=True)
    found = list_checkpoints(directory)
    if not found:
        return None
    path = found[-1][1]
    return path, read_manifest(path)


def restore_checkpoint(meta, path, manifest=None):
    """Load the checkpoint folder `path` into the built, compiled `meta`.

    Returns the manifest (its `"step"` is the number of train steps done).
    Raises `IncompatibleCheckpointError` when the variables differ from the
    ones saved (another model, learner, inner optimizer or task batch shape).
    """
    path = pathlib.Path(path)
    manifest = manifest or read_manifest(path)
    variables = training_variables(meta)
    entries = manifest["variables"]
    current = [
        (list(v.shape), keras.backend.standardize_dtype(v.dtype)) for v in variables
    ]
    saved = [(e["shape"], e["dtype"]) for e in entries]
    if current != saved:
        detail = f"{len(saved)} variables saved, {len(current)} now"
        for i, (a, b) in enumerate(zip(saved, current)):
            if a != b:
                detail = (
                    f"{entries[i]['name']} was saved as {a[1]}{a[0]} but is now "
                    f"{variables[i].path} {b[1]}{b[0]}"
                )
                break
        raise IncompatibleCheckpointError(
            f"checkpoint {path} was written by a different model or configuration "
            f"({detail}): resume with the run's original configuration (same model, "
            "learner, optimizers, tasks_per_batch, batch_size, steps_per_chunk), or "
            "start a new run in another output directory."
        )
    try:
        with np.load(path / STATE_FILE, allow_pickle=False) as state:
            arrays = [state[f"v{i}"] for i in range(len(entries))]
    except Exception as error:  # zipfile/pickle/IO errors all mean corruption here
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: {STATE_FILE} is unreadable ({error}); delete "
            "it to resume from the previous checkpoint."
        ) from error
    with meta.distribute_strategy.scope():
        for variable, entry, array in zip(variables, entries, arrays):
            _write(variable, array, int(entry.get("replicas", 1)))
    return manifest


def read_metrics(path, manifest):
    """The saved metric accumulators of checkpoint `path`: `(entries, arrays)`."""
    saved = manifest.get("metrics", [])
    with np.load(pathlib.Path(path) / STATE_FILE, allow_pickle=False) as state:
        return saved, [state[f"m{i}"] for i in range(len(saved))]


def restore_metrics(meta, saved, arrays):
    """Load metric accumulators from `read_metrics` into `meta` (if they still match)."""
    metrics = metric_variables(meta)
    if [list(v.shape) for v in metrics] != [m["shape"] for m in saved]:
        return False
    with meta.distribute_strategy.scope():
        for variable, entry, array in zip(metrics, saved, arrays):
            _write(variable, array, int(entry.get("replicas", 1)))
    return True


# ----------------------------------------------------------------- callback
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

    Example::

        checkpoint = MetaCheckpoint("runs/x/checkpoints", every_steps=100)
        start = checkpoint.restore(meta, x_shape)
        meta.fit(tasks.as_dataset(..., start=start), steps_per_epoch=total - start,
                 callbacks=[checkpoint])
    """

    def __init__(self, directory, every_steps=None, every_seconds=None, keep=2, metadata=None):
        super().__init__()
        if every_steps is not None and int(every_steps) < 1:
            raise ValueError(f"every_steps={every_steps} must be >= 1 (or None).")
        if every_seconds is not None and float(every_seconds) <= 0:
            raise ValueError(f"every_seconds={every_seconds} must be > 0 (or None).")
        if int(keep) < 1:
            raise ValueError(f"keep={keep} must be >= 1.")
        self.directory = pathlib.Path(directory)
        self.every_steps = None if every_steps is None else int(every_steps)
        self.every_seconds = None if every_seconds is None else float(every_seconds)
        self.keep = int(keep)
        self.metadata = dict(metadata or {})
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
        """Refuse a checkpoint whose run metadata differs from this run's."""
        saved = manifest.get("metadata", {})
        for key, value in self.metadata.items():
            if key in saved and saved[key] != value:
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
        fault_point("train.step")
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


def resumable_fit(meta, make_dataset, *, total_steps, epochs, start=0, callbacks=(), **fit_kwargs):
    """`meta.fit` over train steps `start..total_steps`, split into `epochs` epochs.

    `make_dataset(start)` returns the task stream from chunk `start` on. A
    run resumed in the middle of epoch e first finishes that epoch (a fit of
    the remaining steps with `initial_epoch=e`), then runs the later epochs,
    so epoch boundaries, and hence logs, fall where the uninterrupted run's
    do. Returns the merged `history.history` dict.
    """
    if total_steps % epochs:
        raise ValueError(f"total_steps={total_steps} does not split into epochs={epochs}.")
    per_epoch = total_steps // epochs
    if start > total_steps:
        raise IncompatibleCheckpointError(
            f"the checkpoint has {start} train steps done but the run has only "
            f"{total_steps}: raise train.meta_updates, or start a new run."
        )
    epoch, done = divmod(start, per_epoch)
    merged: dict = {}

    def fit(steps, first, last, begin):
        history = meta.fit(
            make_dataset(begin),
            steps_per_epoch=steps,
            initial_epoch=first,
            epochs=last,
            callbacks=list(callbacks),
            **fit_kwargs,
        )
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(values)

    if done:
        fit(per_epoch - done, epoch, epoch + 1, start)
        epoch += 1
    if epoch < epochs:
        fit(per_epoch, epoch, epochs, epoch * per_epoch)
    return merged
