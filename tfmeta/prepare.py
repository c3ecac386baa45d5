"""Prepare real TensorFlow Datasets (TFDS) datasets offline from local archives.

Machines that build or test tfmeta cannot reach the hosts TFDS downloads from,
so the original archives are kept in a folder (one sub-folder per dataset, plus
a ``SHA256SUMS`` file) and the official TFDS builders are pointed at them:

* archives byte-identical to what TFDS registers are served through
  ``DownloadConfig(manual_dir=...)``; TFDS re-checks their sha256 itself;
* archives whose content is original but whose bytes differ from the
  registered ones (two Omniglot zips were re-zipped) are placed in the TFDS
  download cache under the name TFDS expects for the *registered* checksum,
  with the ``.INFO`` file beside it, which TFDS treats as already downloaded.

Every archive is first checked against ``SHA256SUMS`` (our own check), so a
corrupted archive fails early with the file's name instead of deep inside TFDS.

TFDS writes each dataset into an ``incomplete.*`` folder and renames it to its
final ``<data_dir>/<name>/<version>`` folder only on success, so an interrupted
preparation never looks prepared; this module relies on that. The files it
writes itself (cached archive copies and their ``.INFO``) go through
`tfmeta.atomic`; the folder of links for ``manual_dir`` is rebuilt from
scratch on every preparation, so a crash while building it is harmless.
Concurrent preparations of one data_dir (two shells, parallel test workers)
take turns on a lock file in it: the second waits, then finds the datasets
prepared and returns without building them again.

Example::

    from tfmeta.prepare import prepare_datasets, load

    prepare_datasets("../shared/data")             # once; no-op afterwards
    train = load("mnist", "train", as_supervised=True)
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import pathlib
import shutil
import sys
import time

from tfmeta import atomic
from tfmeta.checksums import sha256_file

__all__ = [
    "ArchiveChecksumError",
    "DatasetNotPreparedError",
    "DEFAULT_NAMES",
    "default_data_dir",
    "load",
    "main",
    "prepare_datasets",
    "resolve_data_dir",
]

log = logging.getLogger(__name__)

DEFAULT_NAMES = ("mnist", "fashion_mnist", "omniglot")
DATA_DIR_ENV = "TFMETA_TFDS_DIR"
SUMS_FILENAME = "SHA256SUMS"
PREPARE_COMMAND = "python tools/prepare_data.py --from ../shared/data"


class ArchiveChecksumError(ValueError):
    """An archive's sha256 differs from the one listed in ``SHA256SUMS``."""


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset was requested that has not been prepared in data_dir."""


def default_data_dir() -> pathlib.Path:
    """Return the TFDS ``data_dir`` tfmeta reads and writes datasets in.

    ``$TFMETA_TFDS_DIR`` if set, else ``~/.cache/tfmeta/tensorflow_datasets``:
    outside the repository, so prepared datasets survive clean checkouts and
    are never committed.

    Example::

        >>> default_data_dir().name  # doctest: +SKIP
        'tensorflow_datasets'
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return pathlib.Path(env).expanduser().resolve()
    return pathlib.Path("~/.cache/tfmeta/tensorflow_datasets").expanduser()


def resolve_data_dir(data_dir=None) -> pathlib.Path:
    """`data_dir` as an absolute path, or `default_data_dir()` when None."""
    return (
        pathlib.Path(data_dir).expanduser().resolve()
        if data_dir is not None
        else default_data_dir()
    )




def _read_sums(sums_path: pathlib.Path) -> dict[str, str]:
    """Parse a ``sha256sum``-style file into ``{relative/path: hexdigest}``."""
    sums = {}
    for line in sums_path.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, rel = line.strip().partition(" ")
        # sha256sum writes "<hash>  <path>" (text) or "<hash> *<path>" (binary).
        sums[rel.strip().lstrip("*")] = digest.lower()
    return sums


def _prepare_command(data_dir: pathlib.Path) -> str:
    if data_dir == default_data_dir():
        return PREPARE_COMMAND
    return f"{PREPARE_COMMAND} --data_dir {data_dir}"


def _archive_folder(archive_dir, given="the archive folder") -> pathlib.Path:
    """`archive_dir` resolved, or a FileNotFoundError naming it (`given`: how it was given) and the fix."""
    path = pathlib.Path(archive_dir).expanduser().resolve()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"{given} {path} {what}: pass the folder holding {', '.join(DEFAULT_NAMES)} "
            f"(one sub-folder each) and {SUMS_FILENAME} (e.g. --from ../shared/data)"
        )
    return path


def _data_folder(data_dir: pathlib.Path) -> pathlib.Path:
    """`data_dir`, or a NotADirectoryError when it or a folder above it is a file."""
    for path in (data_dir, *data_dir.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == data_dir else f"is under the file {path}"
                raise NotADirectoryError(
                    f"the TFDS data_dir {data_dir} {where}: pass a folder to write the "
                    "prepared datasets into (--data_dir), or None for the default "
                    f"{default_data_dir()}"
                )
            return data_dir
    return data_dir


def _builder(name: str, data_dir: pathlib.Path, archive_dir=None):
    # Imported here: tensorflow_datasets is only needed when data is touched.
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=os.fspath(data_dir))
    except tfds.core.DatasetNotFoundError:
        close = difflib.get_close_matches(name, DEFAULT_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = f"the archives in {archive_dir}" if archive_dir is not None else "local archives"
        raise ValueError(
            f"TFDS has no dataset named {name!r}: {hint}tfmeta prepares {', '.join(DEFAULT_NAMES)} "
            f"from {where} (--names {' '.join(DEFAULT_NAMES)})"
        ) from None


def _is_prepared(builder) -> bool:
    # exists() first: is_prepared() alone logs a warning for a missing folder,
    # which is the normal state before the first preparation.
    return builder.data_path.exists() and builder.is_prepared()


def _check_archives(builder, archive_dir: pathlib.Path, sums, verify: bool):
    """Locate and hash every archive ``builder`` registers.

    Returns ``[(url, registered UrlInfo, local path, local sha256)]``. Raises
    ``FileNotFoundError`` for a missing archive and ``ArchiveChecksumError``
    when ``verify`` and an archive differs from ``SHA256SUMS``.
    """
    name = builder.name
    url_infos = builder.url_infos
    if not url_infos:
        raise ValueError(
            f"TFDS registers no checksums for {name!r}; it cannot be "
            "prepared offline from archives"
        )
    found = []
    # Builders download every registered URL (omniglot needs all four zips
    # even for one split), so every registered file must be present.
    for url, info in sorted(url_infos.items()):
        rel = f"{name}/{info.filename}"
        path = archive_dir / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"archive {rel} is missing from {archive_dir} (TFDS "
                f"{name!r} needs it; originally from {url})"
            )
        digest = sha256_file(path)
        if verify:
            if rel not in sums:
                raise ArchiveChecksumError(
                    f"archive {rel} is not listed in {archive_dir / SUMS_FILENAME}"
                )
            if digest != sums[rel]:
                raise ArchiveChecksumError(
                    f"archive {rel} in {archive_dir} is corrupted: sha256 "
                    f"{digest} != {sums[rel]} listed in {SUMS_FILENAME}; "
                    "replace it with the original file"
                )
        found.append((url, info, path, digest))
    return found


def _stage(builder, archives, download_dir, manual_dir) -> None:
    """Put each archive where TFDS will pick it up without a network."""
    from tensorflow_datasets.core.download import resource

    name = builder.name
    if manual_dir.exists():
        shutil.rmtree(manual_dir)  # Only ever holds our own symlinks.
    manual_dir.mkdir(parents=True)
    for url, info, path, digest in archives:
        if digest == info.checksum:
            # Byte-identical to TFDS's registration: the manual_dir route,
            # where TFDS verifies size and sha256 again. A filtered folder of
            # links is needed because TFDS prefers a manual_dir file over the
            # download cache and would reject a re-zipped archive there.
            (manual_dir / info.filename).symlink_to(path)
            continue
        # Same content, different bytes (re-zipped): TFDS accepts a file in its
        # download cache named after the URL and the *registered* checksum
        # when an .INFO file is beside it, without re-hashing it. The
        # DownloadManager looks in download_dir/<dataset name>/.
        dst = download_dir / name / resource.get_dl_fname(url, info.checksum)
        dst.parent.mkdir(parents=True, exist_ok=True)
        log.info(
            "%s: %s differs from TFDS's registered sha256 (re-zipped); "
            "placing it in the download cache as %s",
            name, info.filename, dst.name,
        )
        # Both writes atomic, and .INFO last: .INFO marks the file as cached,
        # so a crash here never leaves a truncated "cached" archive.
        atomic.copy_file(path, dst)
        info_json = {
            "dataset_names": [name],
            "original_fname": info.filename,
            # The bytes actually present, for humans inspecting the cache.
            "url_info": {
                "checksum": digest,
                "filename": info.filename,
                "size": path.stat().st_size,
            },
            "urls": [url],
        }
        atomic.write_text(resource.get_info_path(dst), json.dumps(info_json, sort_keys=True))


def prepare_datasets(
    archive_dir,
    data_dir=None,
    names=DEFAULT_NAMES,
    verify: bool = True,
) -> pathlib.Path:
    """Build TFDS datasets offline from the original archives.

    Args:
      archive_dir: folder with one sub-folder per dataset (``mnist/``,
        ``fashion_mnist/``, ``omniglot/``) holding the files TFDS registers,
        and a ``SHA256SUMS`` file listing them.
      data_dir: TFDS data_dir to write into; default ``default_data_dir()``.
      names: TFDS dataset names to prepare.
      verify: check every archive against ``SHA256SUMS`` first. With False,
        archives matching TFDS's registered sha256 are still checked by TFDS,
        others are trusted as they are.

    Returns:
      The data_dir, to pass to ``load`` or ``tfds.load``.

    Already prepared datasets are skipped without reading any archive, so a
    second call is a fast no-op (even if `archive_dir` is gone; the command
    line, `main`, refuses a missing folder). Otherwise a missing archive
    folder, or a data_dir that is or lies under a file, is refused before
    data_dir is touched. All requested archives are verified before
    anything is built.

    Example::

        data_dir = prepare_datasets("../shared/data", names=["mnist"])
    """
    if isinstance(names, str):
        names = [names]
    data_dir = _data_folder(resolve_data_dir(data_dir))
    todo = _unprepared(names, data_dir, archive_dir)
    if not todo:
        return data_dir
    # Before the lock: a wrong archive folder must not create data_dir.
    archive_dir = _archive_folder(archive_dir)
    with _preparation_lock(data_dir):
        # Another process may have prepared some while this one waited.
        todo = [builder for builder in todo if not _is_prepared(builder)]
        if todo:
            _build(todo, data_dir, archive_dir, verify)
    return data_dir


def _unprepared(names, data_dir, archive_dir):
    """The builders of `names` whose dataset is not prepared in `data_dir` yet."""
    todo = []
    for name in names:
        builder = _builder(name, data_dir, archive_dir)
        if _is_prepared(builder):
            log.info("%s: already prepared in %s", name, builder.data_path)
        else:
            todo.append(builder)
    return todo


def _preparation_lock(data_dir: pathlib.Path):
    """An exclusive lock on `data_dir`/.prepare.lock (blocking; POSIX)."""
    return atomic.exclusive_lock(
        data_dir / ".prepare.lock",
        waiting=lambda: log.info("waiting for another preparation of %s to finish", data_dir))


def _build(todo, data_dir: pathlib.Path, archive_dir, verify: bool):
    """Verify every archive of `todo`, then build the datasets one by one."""

    archive_dir = _archive_folder(archive_dir)
    sums = {}
    if verify:
        sums_path = archive_dir / SUMS_FILENAME
        if not sums_path.is_file():
            raise FileNotFoundError(
                f"{sums_path} not found; it is needed to verify the archives "
                "(verify=False or --no-verify skips that check)"
            )
        sums = _read_sums(sums_path)
    # Check everything before building anything: a bad archive should fail in
    # a second, not after minutes of building the datasets before it.
    staged = []
    for builder in todo:
        log.info(
            "%s: checking archives in %s", builder.name, archive_dir / builder.name
        )
        archives = _check_archives(builder, archive_dir, sums, verify)
        staged.append((builder, archives))

    import tensorflow_datasets as tfds

    download_dir = data_dir / "downloads"
    for builder, archives in staged:
        name = builder.name
        # Per-dataset folders: mnist and fashion_mnist archives share file
        # names and TFDS names extractions after the file name, so a shared
        # extract_dir silently reuses the other dataset's extraction.
        extract_dir = download_dir / "extracted" / name
        manual_dir = download_dir / "manual" / name
        _stage(builder, archives, download_dir, manual_dir)
        log.info(
            "%s: building version %s into %s", name, builder.version, builder.data_path
        )
        start = time.perf_counter()
        builder.download_and_prepare(
            download_dir=os.fspath(download_dir),
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir),
                extract_dir=os.fspath(extract_dir),
                # Never ask GCS for a pre-built copy: offline, and the dataset
                # must come from the verified local archives.
                try_download_gcs=False,
            ),
        )
        # Extractions, links and cached copies are only inputs of the build;
        # dropping them saves ~250 MB and a rebuild recreates them.
        for leftover in (extract_dir, manual_dir, download_dir / name):
            shutil.rmtree(leftover, ignore_errors=True)
        for parent in (
            download_dir / "extracted", download_dir / "manual", download_dir
        ):
            try:
                parent.rmdir()  # Only if empty: other datasets may still use it.
            except OSError:
                pass
        splits = ", ".join(
            f"{split} {info.num_examples}"
            for split, info in sorted(builder.info.splits.items())
        )
        seconds = time.perf_counter() - start
        log.info("%s: prepared in %.1f s (%s)", name, seconds, splits)


def load(name: str, split=None, data_dir=None, **kwargs):
    """``tfds.load`` a prepared dataset, never downloading.

    Keyword arguments (``as_supervised``, ``shuffle_files``, ``with_info``,
    ...) are passed to ``tfds.load`` unchanged.

    Raises:
      DatasetNotPreparedError: ``name`` is not prepared in data_dir; the message
        says how to prepare it offline.

    Example::

        ds = load("omniglot", "small1", as_supervised=True)
        image, label = next(iter(ds))
    """
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(data_dir)
    if not _is_prepared(_builder(name, data_dir)):
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in {data_dir}; prepare it "
            f"offline with: {_prepare_command(data_dir)} "
            f"(or tfmeta.prepare.prepare_datasets('../shared/data', "
            f"data_dir={os.fspath(data_dir)!r}))"
        )
    return tfds.load(
        name, split=split, data_dir=os.fspath(data_dir), download=False, **kwargs
    )


def main(argv=None) -> int:
    """The command line of ``python tools/prepare_data.py --from ../shared/data``; errors propagate.

    Run it through the tool, which ends bad input in one line
    (``tfmeta.cli.errors.run_tool``; this module stands below ``cli/`` in
    docs/design.md's floors, so it has no ``python -m tfmeta.prepare``).
    """
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Prepare TFDS datasets offline from local archives.",
    )
    parser.add_argument(
        "--from",
        dest="archive_dir",
        default=None,
        help="folder with omniglot/, mnist/, fashion_mnist/ and SHA256SUMS "
        "(default: $TFMETA_DATA_DIR)",
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help=f"TFDS data_dir to write (default: ${DATA_DIR_ENV} or "
        "~/.cache/tfmeta/tensorflow_datasets)",
    )
    parser.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES))
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the SHA256SUMS check",
    )
    args = parser.parse_args(argv)
    archive_dir = args.archive_dir or os.environ.get("TFMETA_DATA_DIR")
    if not archive_dir:
        parser.error("--from is required (or set TFMETA_DATA_DIR)")
    # Checked even when every dataset is prepared (nothing is read then): a
    # mistyped folder would otherwise pass silently, and fail on the next build.
    given = "--from" if args.archive_dir else "$TFMETA_DATA_DIR"
    archive_dir = _archive_folder(archive_dir, f"the archive folder ({given})")

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    # Not propagated: TFDS (absl) installs a root handler that would print
    # every progress line a second time.
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        data_dir = prepare_datasets(
            archive_dir, args.data_dir, args.names, verify=args.verify
        )
    # A bad archive folder raises: tools/prepare_data.py reports it in one line
    # (tfmeta.cli.errors.run_tool), callers of main() get the exception.
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
    print(f"datasets ready in {data_dir}")
    return 0


if __name__ == "__main__":
    # The command line is tools/prepare_data.py's: it ends bad input in one line,
    # with tfmeta.cli, which this module may not import (docs/design.md's floors).
    print("python -m tfmeta.prepare is no command: run python tools/prepare_data.py with the same "
          "arguments (e.g. --from ../shared/data)", file=sys.stderr)
    sys.exit(2)
