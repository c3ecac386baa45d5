"""sha256 of files: how archives, exports and checkpoints are verified."""

import hashlib


def sha256_file(path):
    """Hex sha256 of the file at `path`, read in 1 MiB blocks.

    Example:
        >>> sha256_file("runs/quickstart/initialization/model.keras")
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
