"""The output folder of a training run: what is in it, whether it may be written, and clean-up.

`RunDir.check` runs before anything is built: the folder must be creatable
and writable, and an earlier run in it is refused unless `--resume` or
`train.overwrite=True` says what to do with it. `RunDir.claimed` is the
block in which training writes: it creates the folder, replaces an earlier
run as one atomic step when overwriting (`tfmeta.atomic.remove_directory`:
renamed aside, then deleted), and if the block fails before the first
checkpoint exists it removes what it created, so a failed start leaves
nothing behind.

Example::

    folder = RunDir("runs/x")
    folder.check(overwrite=False, resume=False)
    with folder.claimed(replace=False):
        ...  # fit: logs/, history.csv, checkpoints/
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil

from tfmeta import atomic
from tfmeta.checkpoint import list_checkpoints

__all__ = ["RunDir"]

#: What a tfmeta run folder holds (tools/finetune.py writes finetune/ by default).
RUN_ENTRIES = frozenset({
    "checkpoints", "finetune", "history.csv", "initialization", "logs", "operative_config.gin",
    "results.json", "workers",
})
OVERWRITE = "--gin_param train.overwrite=True"


class RunDir:
    """The paths of a run in `path` and the checks and clean-up around writing them."""

    def __init__(self, path, checkpoint_dir=None):
        self.path = pathlib.Path(path)
        self.export = self.path / "initialization"
        self.checkpoints = pathlib.Path(checkpoint_dir or self.path / "checkpoints")
        self.history = self.path / "history.csv"
        self.logs = self.path / "logs"
        self.results = self.path / "results.json"
        self.operative_config = self.path / "operative_config.gin"

    # ------------------------------------------------------------ before building
    def check(self, *, overwrite, resume, chief=True):
        """Raise a one-line error if this run cannot (or must not) write in the folder."""
        if overwrite and resume:
            raise ValueError(
                f"--resume and train.overwrite=True contradict each other: drop one (--resume "
                f"continues the run in {self.path}, overwrite starts it afresh)."
            )
        self._check_location()
        if not chief:
            return  # the chief owns the folder; this worker writes only its checkpoints
        if overwrite:
            self._check_replaceable()
            return
        if self.export.exists() and not resume:
            raise FileExistsError(
                f"{self.export} already exists: pass {OVERWRITE} to start the run afresh, "
                "--resume to continue it, or choose another --output_dir."
            )
        if list_checkpoints(self.checkpoints) and not resume:
            raise FileExistsError(
                f"{self.checkpoints} holds checkpoints of an earlier run: pass --resume to "
                f"continue it, {OVERWRITE} to start afresh, or choose another --output_dir."
            )

    def _check_location(self):
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                f"--output_dir {self.path} is a file, not a folder: choose another --output_dir "
                "(or move the file away)."
            )
        existing = self.path
        while not existing.exists():
            if existing.is_symlink():  # a dangling link
                break
            existing = existing.parent
        if existing != self.path and not existing.is_dir():
            raise NotADirectoryError(
                f"--output_dir {self.path} is inside {existing}, which is a file, not a folder: "
                "choose an --output_dir elsewhere."
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "is" if existing == self.path else f"would be created in {existing}, which is"
            raise PermissionError(
                f"--output_dir {self.path} {what} not writable: choose another --output_dir "
                f"(or make it writable: chmod u+w {existing})."
            )

    def _check_replaceable(self):
        if not self.path.is_dir():
            return
        foreign = sorted(
            e.name for e in self.path.iterdir()
            if e.name not in RUN_ENTRIES and not e.name.startswith(".")
        )
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise FileExistsError(
                f"--output_dir {self.path} holds files that are not part of a tfmeta run "
                f"({shown}): train.overwrite=True replaces only run folders; choose another "
                "--output_dir."
            )

    # ------------------------------------------------------------ while training
    @contextlib.contextmanager
    def claimed(self, *, replace):
        """Create the folder (replacing an earlier run if `replace`); undo it on an early failure.

        If the block raises before any checkpoint exists, everything the
        block created is removed again: the folder itself if this run made
        it, else the entries that were not there before.
        """
        if replace and self.path.is_dir():
            atomic.remove_directory(self.path)
        created = self._first_missing()
        before = set(os.listdir(self.path)) if created is None else set()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            yield self
        except BaseException:
            if not list_checkpoints(self.checkpoints):
                self._remove_new(created, before)
            raise

    def _first_missing(self):
        """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
        missing = None
        for folder in (self.path, *self.path.parents):
            if folder.exists():
                break
            missing = folder
        return missing

    def _remove_new(self, created, before):
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
            return
        for name in set(os.listdir(self.path)) - before:
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
