"""Atomic writes: after a crash, a file or folder holds its previous content or the new one, complete.

Every file tfmeta writes goes through this module. A file is written to a
hidden temporary sibling (``.<name>.<8 hex>.partial``), flushed and fsynced,
renamed over the target with `os.replace` (atomic on POSIX), and the folder
is fsynced so that the rename itself survives a power cut. A folder (an
export, a checkpoint) is built in a hidden staging sibling, fsynced file by
file, and renamed into place; an existing folder is first moved to a hidden
``.<name>.<8 hex>.old`` backup, which `recover_directory` renames back if the
process died between the two renames.

A write that fails for lack of space, a file-size limit or permissions
raises `WriteError` (an `OSError` with the same errno) naming the target
and saying its previous content is unchanged; the temporary file or staging
folder is removed. A killed write can leave a hidden ``.partial`` sibling
behind, never a damaged target; `recover_directory` removes such leftovers.

Failpoints (`tfmeta.failpoints`) mark every step, so tests kill a real
process at each one.

`exclusive_lock(path)` lets processes that update one file take turns (a
results.json that several workers add cells to).

Example::

    from tfmeta import atomic

    atomic.write_text("runs/x/results.json", json.dumps(results))
    with atomic.open_atomic("cache/arrays.npz") as handle:
        np.savez(handle, x=x)
    with atomic.staged_directory("runs/x/initialization") as staging:
        model.save(staging / "model.keras")       # in place only if this block ends well
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import pathlib
import re
import shutil
import uuid

from tfmeta.failpoints import failpoint

__all__ = [
    "BACKUP_SUFFIX",
    "STAGING_SUFFIX",
    "WriteError",
    "backups",
    "copy_file",
    "exclusive_lock",
    "fsync_directory",
    "fsync_tree",
    "open_atomic",
    "recover_directories",
    "recover_directory",
    "remove_directory",
    "replace_directory",
    "staged_directory",
    "write_bytes",
    "write_text",
]

STAGING_SUFFIX = ".partial"
BACKUP_SUFFIX = ".old"
_HEX8 = "[0-9a-f]" * 8
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}(?P<kind>\.partial|\.old)$")

# Errors that mean "this disk/folder cannot take the write now": reported as
# WriteError with the target's name. Other OSErrors (e.g. a missing source
# file read inside an `open_atomic` block) keep their own type.
_WRITE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO")
    if hasattr(errno, name)
)


class WriteError(OSError):
    """A write failed (disk full, file-size limit, read-only or forbidden folder, I/O error).

    ``errno`` is the underlying error's; the target keeps its previous content.
    """


def _sibling(path, suffix):
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


def _write_error(error, path):
    """`error` as a `WriteError` naming `path`, or `error` itself if it is of another kind."""
    if isinstance(error, WriteError) or not (
        isinstance(error, OSError) and error.errno in _WRITE_ERRNOS
    ):
        return error
    return WriteError(
        error.errno,
        f"could not write {path}: {error.strerror or error}; its previous content, if any, is "
        "unchanged: free disk space, raise the file-size limit or make the folder writable, "
        "then retry",
    )


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_directory(path):
    """fsync the folder `path` so that renames and new entries in it are durable.

    Platforms that cannot open a folder (Windows) skip it.

    Example::

        os.replace(tmp, target); fsync_directory(target.parent)
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some file systems refuse fsync on folders; the data is fsynced anyway.
    finally:
        os.close(fd)


def fsync_tree(root):
    """fsync every file and folder under `root` (files written by other libraries, e.g. Keras).

    Example::

        keras.saving.save_model(model, staging / "model.keras"); fsync_tree(staging)
    """
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(folder, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(folder)


@contextlib.contextmanager
def open_atomic(path, mode="wb", *, encoding=None, newline=None):
    """Open a temporary sibling of `path` for writing; on success it replaces `path`.

    The block writes to the yielded handle; when it ends without an error the
    file is flushed, fsynced and renamed over `path`. On any error (or a
    kill) `path` keeps its previous content and the temporary file is
    removed (a kill leaves it as a hidden ``.<name>.<hex>.partial``). The
    file gets the usual mode of a new file (0666 less the umask).

    Example::

        with open_atomic("cache/digits.npz") as handle:
            np.savez_compressed(handle, x=x, y=y)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = pathlib.Path(path)
    tmp = _sibling(path, STAGING_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        failpoint("atomic.file_synced")
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        raised = _write_error(error, path)
        if raised is error:
            raise
        raise raised from error
    failpoint("atomic.file_replaced")
    fsync_directory(path.parent)


def write_bytes(path, data):
    """Atomically replace the file `path` with `data`; return `path` as a Path.

    Example::

        write_bytes("runs/x/weights.bin", array.tobytes())
    """
    path = pathlib.Path(path)
    view = memoryview(data)
    half = len(view) // 2
    with open_atomic(path, "wb") as handle:
        handle.write(view[:half])
        handle.flush()  # So that a kill at the failpoint leaves exactly half on disk.
        failpoint("atomic.half_written")
        handle.write(view[half:])
    return path


def write_text(path, text, encoding="utf-8"):
    """Atomically replace the file `path` with `text`; return `path` as a Path.

    Example::

        write_text("runs/x/results.json", json.dumps(results, indent=2))
    """
    return write_bytes(path, text.encode(encoding))


def copy_file(source, path):
    """Atomically replace the file `path` with a copy of the file `source`.

    Example::

        copy_file("archives/images.zip", "cache/images.zip")
    """
    path = pathlib.Path(path)
    with open(source, "rb") as src, open_atomic(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return path


def replace_directory(staging, path):
    """Rename the complete folder `staging` to `path`, replacing any folder there.

    An existing `path` is renamed to a hidden ``.old`` backup first and
    deleted only once `staging` is in place; if the second rename fails the
    backup is renamed back. A kill between the two renames leaves no `path`
    and the backup, which `recover_directory(path)` renames back.

    Example::

        replace_directory(pathlib.Path(".init.1234abcd.partial"), pathlib.Path("init"))
    """
    staging, path = pathlib.Path(staging), pathlib.Path(path)
    if not (path.exists() or path.is_symlink()):
        os.rename(staging, path)
        fsync_directory(path.parent)
        return path
    backup = _sibling(path, BACKUP_SUFFIX)
    os.rename(path, backup)
    failpoint("atomic.dir_moved_aside")
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(backup, path)
        raise
    # Durable before the old copy goes: a power cut must not lose both.
    fsync_directory(path.parent)
    failpoint("atomic.dir_replaced")
    _remove(backup)
    return path


def remove_directory(path):
    """Delete the folder `path` so that no half-deleted folder is ever left under its name.

    It is renamed to a hidden staging name first (one atomic step), then
    deleted: a kill during the deletion leaves a hidden ``.partial`` folder
    that `recover_directory` removes, never a `path` with some files gone.

    Example::

        remove_directory("runs/x/checkpoints/ckpt-000000100")
    """
    path = pathlib.Path(path)
    doomed = _sibling(path, STAGING_SUFFIX)
    os.rename(path, doomed)
    fsync_directory(path.parent)
    failpoint("atomic.dir_removing")
    _remove(doomed)


@contextlib.contextmanager
def staged_directory(path):
    """Build a folder in a hidden staging sibling of `path`; it becomes `path` on success.

    Yields the staging folder (a `pathlib.Path`, created with the usual
    folder mode). When the block ends without an error, every file in it
    is fsynced and the folder replaces `path` (`replace_directory`); on an
    error the staging folder is removed and `path` is untouched.

    Example::

        with staged_directory("runs/x/checkpoints/ckpt-000000100") as staging:
            np.savez(staging / "state.npz", **arrays)
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide
    # the folder from other users; mkdir applies the umask like any folder.
    staging = _sibling(path, STAGING_SUFFIX)
    try:
        staging.mkdir()
        yield staging
        fsync_tree(staging)
        failpoint("atomic.dir_staged")
        replace_directory(staging, path)
    except BaseException as error:
        # BaseException too: a KeyboardInterrupt must not leave a staging folder.
        _remove(staging)
        raised = _write_error(error, path)
        if raised is error:
            raise
        raise raised from error


def backups(path):
    """Hidden ``.old`` backups of `path` left by killed `replace_directory` calls, oldest first.

    Example::

        backups(pathlib.Path("runs/x/initialization"))   # [] after clean writes
    """
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        return []
    found = path.parent.glob(f".{glob.escape(path.name)}.{_HEX8}{BACKUP_SUFFIX}")
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover_directory(path):
    """Undo what killed writes of `path` left beside it; return the leftovers removed.

    If `path` is missing but a backup exists (killed between the two renames
    of `replace_directory`), the newest backup is renamed back to `path`.
    Staging folders and temporary files of killed writes, and backups no
    longer needed, are removed. Only for paths with a single writer: it
    would remove a concurrent writer's staging folder.

    Example::

        recover_directory("runs/x/initialization")
    """
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        return []
    olds = backups(path)
    if olds and not (path.exists() or path.is_symlink()):
        os.rename(olds.pop(), path)
        fsync_directory(path.parent)
    staged = sorted(path.parent.glob(f".{glob.escape(path.name)}.{_HEX8}{STAGING_SUFFIX}"))
    for leftover in staged + olds:
        _remove(leftover)
    return staged + olds


def recover_directories(parent, prefix=""):
    """`recover_directory` for every target in `parent` whose name starts with `prefix`.

    Returns the leftovers removed, sorted.

    Example::

        recover_directories("runs/x/checkpoints", prefix="ckpt-")
    """
    parent = pathlib.Path(parent)
    if not parent.is_dir():
        return []
    names = set()
    for entry in parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and match["name"].startswith(prefix):
            names.add(match["name"])
    removed = []
    for name in sorted(names):
        removed += recover_directory(parent / name)
    return sorted(removed)


@contextlib.contextmanager
def exclusive_lock(path, waiting=None):
    """Hold an exclusive lock on the file `path` (created if needed) for the block, waiting for it.

    POSIX advisory locking (`fcntl.flock`): processes that take the same lock
    take turns; the lock goes with the process, also when it is killed.
    Elsewhere (no `fcntl`) the block runs unlocked. `waiting()`, when given,
    is called once if another process holds the lock.

    Example::

        with atomic.exclusive_lock("runs/x/.results.lock"):
            cells = {**json.loads(path.read_text())["cells"], key: cell}
            atomic.write_text(path, json.dumps({"cells": cells}))
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
