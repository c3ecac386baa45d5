"""The errors of `tfmeta.checkpoint`: each message names the problem and the fix."""

__all__ = ["CheckpointError", "CorruptCheckpointError", "IncompatibleCheckpointError"]


class CheckpointError(RuntimeError):
    """Base class of checkpoint problems."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are missing, unreadable or differ from their sha256."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint was written by a different model or run configuration."""
