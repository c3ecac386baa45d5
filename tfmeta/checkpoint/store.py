"""The on-disk format of a checkpoint, and its I/O.

`directory/` holds complete checkpoints only::

    ckpt-000000120/
      state.npz       every variable's value (per replica for per-replica state)
      manifest.json   format, step, variables (names, shapes, dtypes), the
                      sha256 of state.npz, and run metadata

A checkpoint is written into a hidden `.ckpt-<step>.<hex>.partial` folder,
fsynced, and renamed to `ckpt-<step>` only when complete
(`tfmeta.atomic.staged_directory`); older checkpoints are deleted only
after that, so a kill at any moment leaves the previous good checkpoint. A
write that fails (disk full, read-only folder) raises `tfmeta.atomic.WriteError`
and leaves no folder that would be picked up. On restore the newest
checkpoint's sha256 is checked: a damaged or edited checkpoint raises
`CorruptCheckpointError` and is never silently loaded; leftovers of killed
writes are reported and removed.

Failpoints (`tfmeta.failpoints`): ``checkpoint.started``,
``checkpoint.state_written`` (state.npz in the staging folder, no manifest
yet), ``checkpoint.manifest_written`` (complete, not renamed),
``checkpoint.renamed`` (in place, older checkpoints not yet pruned).

Example::

    path = save_checkpoint(meta, "runs/x/checkpoints", step=200, metadata={"seed": 0})
    path, manifest = latest_checkpoint("runs/x/checkpoints")
    restore_checkpoint(meta, path, manifest)
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib

import keras
import numpy as np

from tfmeta import atomic
from tfmeta.checkpoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from tfmeta.checkpoint.state import assign_value, metric_variables, read_value, training_variables
from tfmeta.checksums import sha256_file
from tfmeta.failpoints import failpoint

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PREFIX",
    "STATE_FILE",
    "latest_checkpoint",
    "list_checkpoints",
    "read_manifest",
    "read_metrics",
    "restore_checkpoint",
    "restore_metrics",
    "save_checkpoint",
]

FORMAT_NAME = "tfmeta.checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "state.npz"
MANIFEST_FILE = "manifest.json"
PREFIX = "ckpt-"

log = logging.getLogger("tfmeta.checkpoint")


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
    step = int(step)
    failpoint("checkpoint.started")
    variables = training_variables(meta)
    arrays, entries = {}, []
    for i, variable in enumerate(variables):
        array, replicas = read_value(variable)
        arrays[f"v{i}"] = array
        entries.append({
            "name": variable.path,
            "shape": list(variable.shape),
            "dtype": keras.backend.standardize_dtype(variable.dtype),
            "replicas": replicas,
        })
    metric_entries = []
    for i, variable in enumerate(metric_variables(meta)):
        arrays[f"m{i}"], replicas = read_value(variable)
        metric_entries.append(
            {"name": variable.path, "shape": list(variable.shape), "replicas": replicas}
        )
    # The same step written again (a resumed run passing a step it had
    # already saved) holds the same state: the new copy replaces the old.
    target = directory / f"{PREFIX}{step:09d}"
    with atomic.staged_directory(target) as staging:
        np.savez(staging / STATE_FILE, **arrays)
        failpoint("checkpoint.state_written")
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
            "settings": _settings(meta),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        failpoint("checkpoint.manifest_written")
    failpoint("checkpoint.renamed")
    complete = list_checkpoints(directory)
    for _, path in complete[: max(0, len(complete) - max(1, int(keep)))]:
        atomic.remove_directory(path)
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
    for leftover in atomic.recover_directories(directory, prefix=PREFIX):
        log.warning("Removed the incomplete checkpoint %s (its writer was interrupted).", leftover)
    found = list_checkpoints(directory)
    if not found:
        return None
    path = found[-1][1]
    return path, read_manifest(path)


def _settings(meta):
    """`meta.checkpoint_settings()` as JSON values, or {} for a model without them."""
    settings = getattr(meta, "checkpoint_settings", None)
    return json.loads(json.dumps(settings())) if callable(settings) else {}


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
    # Same shapes are not the same run: K, the chunk length or the learner's
    # settings change what the restored state means (a K = 4 trajectory length
    # restored into a K = 8 run would keep running K = 4 trajectories).
    saved_settings, settings = manifest.get("settings"), _settings(meta)
    if saved_settings is not None and settings and saved_settings != settings:
        key = next(k for k in sorted(set(saved_settings) | set(settings))
                   if saved_settings.get(k) != settings.get(k))
        raise IncompatibleCheckpointError(
            f"checkpoint {path} was written with {key}={saved_settings.get(key)!r}, this run has "
            f"{key}={settings.get(key)!r}: resume with the run's original setting, or start a "
            "new run in another output directory."
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
            assign_value(variable, array, int(entry.get("replicas", 1)))
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
            assign_value(variable, array, int(entry.get("replicas", 1)))
    return True
