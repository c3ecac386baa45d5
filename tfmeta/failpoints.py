"""Failpoints: named places in tfmeta's writes where a test can kill the process.

Like etcd's gofail, a failpoint is a call ``failpoint("name")`` left in the
code at an exact place of a write (between two halves of a file, after the
fsync and before the rename, between the two renames of a replace, ...).
It does nothing unless the ``TFMETA_FAULT`` environment variable names it,
so a test can run a real process and SIGKILL it at that very place: a real,
uncatchable kill, the same as a power cut for everything already handed to
the kernel.

``TFMETA_FAULT`` is a comma-separated list of ``<name>@<n>[=<action>]``:
the n-th time (default 1) this process reaches ``<name>``, it does
``<action>``:

- ``kill`` (default): SIGKILL this process;
- ``error``: raise ``OSError(EIO)`` there, as a failing disk would (an
  in-process test of the clean-up path).

Example::

    TFMETA_FAULT="checkpoint.state_written@3" python tools/train.py ...
    TFMETA_FAULT="atomic.half_written@1,train.step@5=error" python ...

Points (every name used in tfmeta; `POINTS` lists them):

``atomic.half_written``
    `tfmeta.atomic.write_bytes`/`write_text`: half the new bytes are in the
    hidden temporary file, the target still has its previous content.
``atomic.file_synced``
    any atomic file write: the temporary file is complete and fsynced, not
    yet renamed over the target.
``atomic.file_replaced``
    renamed over the target, its directory not yet fsynced.
``atomic.dir_staged``
    `tfmeta.atomic.staged_directory`: the staging folder is complete and
    fsynced, not yet in place.
``atomic.dir_moved_aside``
    replacing a folder: the previous one is moved to a hidden ``.old``
    backup, the new one is not in place yet (recovered by
    `tfmeta.atomic.recover_directory`).
``atomic.dir_replaced``
    the new folder is in place, the backup not yet deleted.
``atomic.dir_removing``
    `tfmeta.atomic.remove_directory`: the folder is renamed to a hidden
    ``.partial`` name, not yet deleted.
``export.model_written``
    `tfmeta.export.export_initialization`: model.keras is in the staging
    folder, the SavedModel not yet.
``checkpoint.started``, ``checkpoint.state_written`` (state.npz in the
staging folder, no manifest yet), ``checkpoint.manifest_written`` (complete,
not renamed), ``checkpoint.renamed`` (in place, older checkpoints not yet
pruned), ``train.step`` (after every train execution): see
`tfmeta.checkpoint`.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["ENV", "POINTS", "failpoint", "reset"]

ENV = "TFMETA_FAULT"

POINTS = (
    "atomic.half_written",
    "atomic.file_synced",
    "atomic.file_replaced",
    "atomic.dir_staged",
    "atomic.dir_moved_aside",
    "atomic.dir_replaced",
    "atomic.dir_removing",
    "export.model_written",
    "checkpoint.started",
    "checkpoint.state_written",
    "checkpoint.manifest_written",
    "checkpoint.renamed",
    "train.step",
)

_ACTIONS = ("kill", "error")
_counts: dict = {}


def failpoint(name):
    """Count a pass through failpoint `name`; act if ``TFMETA_FAULT`` asks for it.

    Example::

        write_first_half()
        failpoint("atomic.half_written")   # TFMETA_FAULT=atomic.half_written@1 kills here
        write_second_half()
    """
    spec = os.environ.get(ENV)
    if not spec:
        return
    _counts[name] = _counts.get(name, 0) + 1
    for item in spec.split(","):
        point, _, rest = item.strip().partition("@")
        if point != name:
            continue
        count, _, action = rest.partition("=")
        action = action or "kill"
        if action not in _ACTIONS:
            raise ValueError(
                f"{ENV}={spec!r}: unknown action {action!r} for {point}; use one of {_ACTIONS}."
            )
        if _counts[name] != int(count or 1):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.EIO, f"failpoint {name} ({ENV}={spec!r})")


def reset():
    """Forget how often each point was reached (for in-process tests)."""
    _counts.clear()
