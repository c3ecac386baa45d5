"""tfmeta.atomic: a crash, a full disk or a read-only folder never leaves a half-written file.

Each crash case runs a real child process that SIGKILLs itself at a
failpoint (`tfmeta.failpoints`) inside the write, then the parent checks
what is on disk: the previous content, or the new content complete.
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from tfmeta import atomic, failpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
KILLED = -signal.SIGKILL
OLD = b"old content\n" * 1000
NEW_EXPR = "bytes(range(256)) * 4000"   # ~1 MB, built the same way in the child
NEW = bytes(range(256)) * 4000     # NEW_EXPR, in this process

# The child imports tfmeta.atomic without running tfmeta/__init__ (which
# imports TensorFlow): a bare package module pointing at the source folder.
PRELUDE = f"""
import json, os, pathlib, resource, signal, sys, types
package = types.ModuleType("tfmeta")
package.__path__ = [{str(REPO / "tfmeta")!r}]
sys.modules["tfmeta"] = package
from tfmeta import atomic
"""


def _child(code, tmp_path, fault=None, prefix=()):
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV}
    if fault:
        env[failpoints.ENV] = fault
    return subprocess.run(
        [*prefix, sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


FULL_DISK = """
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
"""


def _write_error_of(code, tmp_path, prefix=()):
    """`(errno, message)` of the WriteError that `code`, run in a child, raises."""
    body = textwrap.indent(textwrap.dedent(code), "    ")
    proc = _child(f"try:\n{body}\nexcept atomic.WriteError as error:\n"
                  "    print(json.dumps([error.errno, str(error)]))\n", tmp_path, prefix=prefix)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout, "no WriteError"
    return json.loads(proc.stdout)


def _hidden(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith("."))


@pytest.fixture(autouse=True)
def _no_fault(monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reset()
    yield
    failpoints.reset()


def test_write_replaces_the_whole_file_with_the_usual_mode(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(OLD)
    assert atomic.write_bytes(target, NEW) == target
    assert target.read_bytes() == NEW
    atomic.write_text(tmp_path / "note.txt", "é\n")
    assert (tmp_path / "note.txt").read_bytes() == "é\n".encode()
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("point, survivor", [
    ("atomic.half_written", "old"),     # temp file half written
    ("atomic.file_synced", "old"),      # temp file complete, not renamed
    ("atomic.file_replaced", "new"),    # renamed, folder not yet fsynced
])
def test_a_write_killed_at_any_point_leaves_old_or_new_never_half(tmp_path, point, survivor):
    target = tmp_path / "data.bin"
    target.write_bytes(OLD)
    proc = _child(f"atomic.write_bytes('data.bin', {NEW_EXPR})", tmp_path, fault=f"{point}@1")
    assert proc.returncode == KILLED, proc.stderr
    survivor = {"old": OLD, "new": NEW}[survivor]
    assert target.read_bytes() == survivor
    leftovers = _hidden(tmp_path)
    if point == "atomic.file_replaced":
        assert leftovers == []
        return
    # The kill really was mid-write: the hidden temporary holds the new bytes
    # up to that point, exactly half of them at atomic.half_written.
    assert len(leftovers) == 1 and leftovers[0].startswith(".data.bin.")
    written = (tmp_path / leftovers[0]).read_bytes()
    assert written == (NEW[: len(NEW) // 2] if point == "atomic.half_written" else NEW)
    assert atomic.recover_directory(target) == [tmp_path / leftovers[0]]
    assert _hidden(tmp_path) == []
    assert target.read_bytes() == survivor


def test_disk_full_raises_write_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(OLD)
    # RLIMIT_FSIZE: writes past 64 KiB fail with EFBIG, as on a full disk
    # (no root needed). SIGXFSZ would kill the process instead of failing
    # the write: ignored, so the write returns the error.
    code, message = _write_error_of(FULL_DISK + f"atomic.write_bytes('data.bin', {NEW_EXPR})", tmp_path)
    assert code == errno.EFBIG
    assert "could not write data.bin" in message and "previous content" in message
    assert target.read_bytes() == OLD
    assert _hidden(tmp_path) == []


def without_dac_override():
    """Command prefix running a child without root's permission override (CAP_DAC_OVERRIDE).

    Tests run as root in CI, where a read-only mode stops no write; `setpriv`
    drops the capability, so the child obeys the mode bits as any user does.
    """
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only mode would not stop writes")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_read_only_folder_raises_write_error_and_keeps_the_old_file(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    target = folder / "data.bin"
    target.write_bytes(OLD)
    folder.chmod(0o555)
    try:
        code, message = _write_error_of(
            f"atomic.write_bytes('ro/data.bin', {NEW_EXPR})", tmp_path, prefix=without_dac_override()
        )
    finally:
        folder.chmod(0o755)
    assert code == errno.EACCES and "could not write ro/data.bin" in message
    assert target.read_bytes() == OLD
    assert _hidden(folder) == []


def test_an_io_error_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    target.write_bytes(OLD)
    monkeypatch.setenv(failpoints.ENV, "atomic.file_synced@1=error")
    with pytest.raises(atomic.WriteError) as caught:
        atomic.write_bytes(target, NEW)
    assert caught.value.errno == errno.EIO
    assert target.read_bytes() == OLD
    assert _hidden(tmp_path) == []


def test_other_errors_in_an_open_atomic_block_keep_their_type(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(OLD)
    with pytest.raises(FileNotFoundError):
        with atomic.open_atomic(target) as handle:
            handle.write(b"new")
            open(tmp_path / "missing")
    assert target.read_bytes() == OLD
    assert _hidden(tmp_path) == []


def test_copy_file_copies_atomically(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(NEW)
    atomic.copy_file(source, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == NEW


# ----------------------------------------------------------------- folders
STAGE = """
with atomic.staged_directory("export") as staging:
    (staging / "a.txt").write_text("new a")
    (staging / "sub").mkdir()
    (staging / "sub" / "b.txt").write_text("new b")
"""


def _export_content(path):
    return {p.relative_to(path).as_posix(): p.read_text() for p in path.rglob("*") if p.is_file()}


OLD_EXPORT = {"a.txt": "old a"}
NEW_EXPORT = {"a.txt": "new a", "sub/b.txt": "new b"}


@pytest.fixture
def old_export(tmp_path):
    """`tmp_path/export` holding OLD_EXPORT."""
    target = tmp_path / "export"
    target.mkdir()
    (target / "a.txt").write_text("old a")
    return target


@pytest.mark.parametrize("point, survivor", [
    ("atomic.dir_staged", OLD_EXPORT),       # staging complete, not in place
    ("atomic.dir_moved_aside", OLD_EXPORT),  # old moved to its backup, new not in place
    ("atomic.dir_replaced", NEW_EXPORT),     # new in place, backup not yet deleted
])
def test_a_folder_replace_killed_at_any_point_recovers_old_or_new(tmp_path, old_export, point, survivor):
    target = old_export
    proc = _child(STAGE, tmp_path, fault=f"{point}@1")
    assert proc.returncode == KILLED, proc.stderr
    assert _hidden(tmp_path)  # a leftover staging folder or backup
    atomic.recover_directory(target)
    assert _export_content(target) == survivor
    assert _hidden(tmp_path) == []


def test_a_failing_block_leaves_the_folder_untouched(tmp_path, old_export):
    target = old_export
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.staged_directory(target) as staging:
            (staging / "a.txt").write_text("new a")
            raise RuntimeError("boom")
    assert _export_content(target) == OLD_EXPORT
    assert _hidden(tmp_path) == []


def test_a_full_disk_while_staging_leaves_the_folder_untouched(tmp_path, old_export):
    target = old_export
    code, message = _write_error_of(FULL_DISK + f"""
with atomic.staged_directory("export") as staging:
    (staging / "a.txt").write_bytes({NEW_EXPR})
""", tmp_path)
    assert code == errno.EFBIG and "could not write export" in message
    assert _export_content(target) == OLD_EXPORT
    assert _hidden(tmp_path) == []


def test_a_removal_killed_midway_leaves_no_half_folder_under_its_name(tmp_path, old_export):
    proc = _child('atomic.remove_directory("export")', tmp_path, fault="atomic.dir_removing@1")
    assert proc.returncode == KILLED, proc.stderr
    assert not old_export.exists()
    assert atomic.recover_directory(old_export) and _hidden(tmp_path) == []
    assert not old_export.exists()


def test_recover_directories_handles_every_target_with_the_prefix(tmp_path):
    for name in ("ckpt-1", "ckpt-2", "other"):
        (tmp_path / f".{name}.0123abcd.partial").mkdir()
    (tmp_path / ".ckpt-3.89abcdef.old").mkdir()      # killed between the two renames
    removed = atomic.recover_directories(tmp_path, prefix="ckpt-")
    assert [p.name for p in removed] == [".ckpt-1.0123abcd.partial", ".ckpt-2.0123abcd.partial"]
    assert (tmp_path / "ckpt-3").is_dir()             # the backup renamed back
    assert _hidden(tmp_path) == [".other.0123abcd.partial"]


def test_failpoint_actions(monkeypatch):
    monkeypatch.setenv(failpoints.ENV, "x.y@2=error")
    failpoints.failpoint("x.y")                      # 1st pass: nothing
    with pytest.raises(OSError, match="failpoint x.y"):
        failpoints.failpoint("x.y")                  # 2nd pass: the error
    failpoints.failpoint("x.y")                      # 3rd: nothing again
    monkeypatch.setenv(failpoints.ENV, "x.y@1=explode")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        failpoints.failpoint("x.y")
