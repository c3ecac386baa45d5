"""The tfmeta export format: names, errors, and the validation of an export folder.

Example::

    from tfmeta.export.format import read_export_info

    read_export_info("runs/init")["output_units"]
"""

from __future__ import annotations

import json
import pathlib

from tfmeta import atomic
from tfmeta.checksums import sha256_file

__all__ = [
    "CorruptExportError",
    "FEATURES_ENDPOINT",
    "FEATURES_TRAINING_ENDPOINT",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INFO_FILE",
    "InvalidExportError",
    "MODEL_FILE",
    "SAVED_MODEL_DIR",
    "SERVE_ENDPOINT",
    "TRAINING_ENDPOINT",
    "checksums",
    "head_is_meta_learned",
    "read_export_info",
]

FORMAT_NAME = "tfmeta.initialization"
FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
INFO_FILE = "tfmeta.json"
SERVE_ENDPOINT = "serve"
TRAINING_ENDPOINT = "serve_training"
FEATURES_ENDPOINT = "features"
FEATURES_TRAINING_ENDPOINT = "features_training"


def head_is_meta_learned(info):
    """Whether an export's head weights were meta-learned (`read_export_info`'s dict).

    False for models meta-trained with per-task heads (`tfmeta.TaskHeads`):
    only their body is an initialization. Exports written before tfmeta
    recorded it count as meta-learned.

    Example::

        head_is_meta_learned(read_export_info("runs/init"))
    """
    return bool(info.get("head_meta_learned", True))


class InvalidExportError(ValueError):
    """The folder is not a readable tfmeta export."""


class CorruptExportError(InvalidExportError):
    """A file of the export is missing or differs from its recorded sha256."""


def read_export_info(path):
    """Validate the export at ``path`` and return its ``tfmeta.json`` as a dict.

    Raises ``FileNotFoundError`` when ``path`` does not exist,
    ``InvalidExportError`` when it is not a tfmeta export and
    ``CorruptExportError`` when a file is missing or its sha256 differs.

    Example::

        read_export_info("runs/init")["output_units"]
    """
    path = pathlib.Path(path)
    if not path.exists():
        backups = atomic.backups(path)
        if backups:
            raise FileNotFoundError(
                f"no tfmeta export at {path}, but {backups[-1].name} beside it is the "
                "previous export, moved aside by an overwrite that was killed: rename it "
                f"back to {path.name} (export_initialization to {path} does so itself)."
            )
        raise FileNotFoundError(
            f"no tfmeta export at {path}; create one with "
            "tfmeta.export.export_initialization(model, path)"
        )
    info_file = path / INFO_FILE
    if not path.is_dir() or not info_file.is_file():
        raise InvalidExportError(
            f"{path} is not a tfmeta export: it has no {INFO_FILE}. Create an "
            "export with tfmeta.export.export_initialization(model, path); a "
            "plain .keras file loads with keras.saving.load_model."
        )
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError) as err:
        raise CorruptExportError(
            f"{info_file} is unreadable ({err}); re-export with "
            "export_initialization(..., overwrite=True)"
        ) from err
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise InvalidExportError(
            f"{info_file} does not describe a tfmeta initialization export "
            f"(format {info.get('format') if isinstance(info, dict) else None!r}, "
            f"expected {FORMAT_NAME!r})"
        )
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InvalidExportError(
            f"{path} has export format version {version!r}; this tfmeta reads "
            f"versions up to {FORMAT_VERSION}. Upgrade tfmeta to load it."
        )
    files = info.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CorruptExportError(
            f"{info_file} lists no checksum for {MODEL_FILE}; re-export with "
            "export_initialization(..., overwrite=True)"
        )
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CorruptExportError(
                f"{path} is corrupt: {name} is missing. Re-export with "
                "export_initialization(..., overwrite=True)."
            )
        if sha256_file(file) != expected:
            raise CorruptExportError(
                f"{path} is corrupt: the sha256 of {name} does not match the "
                f"one recorded in {INFO_FILE} (the file was damaged or edited "
                "after export). Re-export with "
                "export_initialization(..., overwrite=True)."
            )
    return info


def checksums(root):
    """`{relative path: sha256}` of every file under `root`."""
    return {
        file.relative_to(root).as_posix(): sha256_file(file)
        for file in sorted(root.rglob("*"))
        if file.is_file()
    }
