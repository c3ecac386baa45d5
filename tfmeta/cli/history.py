"""`history.csv`, the per-epoch log of a training run: cut it back on resume, read it.

Keras' `CSVLogger` appends one row per epoch. A resumed run first drops the
rows of the epochs it will log again (`keep_epochs_before`); that rewrite
is atomic (`tfmeta.atomic`), so a crash or a full disk at that moment leaves
the previous file intact, and rows cut short by an earlier crash are
dropped rather than carried on.

Example::

    keep_epochs_before("runs/x/history.csv", 2)    # rows of epochs 0 and 1 stay
    read_history("runs/x/history.csv")["loss"]     # [0.52, 0.29]
"""

from __future__ import annotations

import csv
import io
import pathlib

from tfmeta import atomic

__all__ = ["keep_epochs_before", "read_history"]


def _complete_rows(path):
    """The header and every data row with as many fields as the header."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return [], []
    header = rows[0]
    return header, [r for r in rows[1:] if len(r) == len(header) and _epoch(r) is not None]


def _epoch(row):
    try:
        return int(float(row[0]))
    except (IndexError, ValueError):
        return None


def keep_epochs_before(path, epoch):
    """Drop the rows of epochs >= `epoch` (the whole file for `epoch` <= 0), atomically."""
    path = pathlib.Path(path)
    if epoch <= 0:
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    header, rows = _complete_rows(path)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(
        ([header] if header else []) + [r for r in rows if _epoch(r) < epoch]
    )
    atomic.write_text(path, buffer.getvalue())


def read_history(path):
    """`{metric: [value per epoch]}` from `path` (empty if it does not exist)."""
    path = pathlib.Path(path)
    history = {}
    if not path.exists():
        return history
    header, rows = _complete_rows(path)
    for row in rows:
        for key, value in zip(header, row):
            try:
                number = float(value)
            except ValueError:  # Keras writes "NA" for absent val_ columns
                continue
            if key != "epoch":
                history.setdefault(key, []).append(number)
    return history
