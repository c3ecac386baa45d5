"""How the command-line tools end on bad input: one line naming the problem and the fix.

`report(prog, error)` prints ``<prog>: error: <Type>: <what is wrong>: <what to
do>`` on stderr and returns exit code 2 (`TFMETA_DEBUG=1` re-raises, for the
traceback). Operating-system errors from deep inside a write (a full disk, a
file-size limit, a read-only folder) carry no advice of their own;
`describe` adds it. `explain_gin_error` does the same for gin's parse errors.

Example::

    try:
        results = run(argv)
    except errors.EXPECTED as error:
        return errors.report("tfmeta-train", error)
"""

from __future__ import annotations

import difflib
import errno
import inspect
import re
import sys

from tfmeta.cli.startup import debug_enabled

#: The exit code of every bad-input error (argparse's own usage errors exit 2 too).
EXIT_BAD_INPUT = 2
#: The exit code of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Training stopped on Ctrl-C after writing a checkpoint of train step `step` in `directory`."""

    def __init__(self, step, directory):
        # `message` too: gin appends its call site to str() of errors raised inside `train`.
        self.message = f"interrupted at train step {step}, checkpoint saved in {directory}"
        super().__init__(self.message)
        self.step, self.directory = step, directory


def expected():
    """The exception types that are bad input (reported in one line), not bugs."""
    from tfmeta.checkpoint import CheckpointError
    from tfmeta.divergence import DivergenceError

    return (
        ValueError, TypeError, OSError, SyntaxError, CheckpointError, DivergenceError,
    ) + _tensorflow_errors()


def _tensorflow_errors():
    # TensorFlow's file errors (TensorBoard's event writer) are not OSErrors.
    tf = sys.modules.get("tensorflow")
    return (tf.errors.OpError,) if tf is not None else ()


_WRITE_FIXES = {
    errno.EFBIG: "the file is larger than this process may write (file-size limit, see "
    "`ulimit -f`): raise the limit or choose another --output_dir",
    errno.ENOSPC: "the disk is full: free some space or choose another --output_dir",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another --output_dir",
    errno.EACCES: "permission denied: make it writable or choose another --output_dir",
    errno.EPERM: "permission denied: make it writable or choose another --output_dir",
    errno.EROFS: "the file system is read-only: choose another --output_dir",
}


def unwrap(error):
    """The error itself, not gin's copy of it.

    gin re-raises an error from inside a configurable as an instance of a
    subclass that only appends the call site to its message; that copy
    lacks the original's attributes (an OSError's errno and filename).

    Example::

        unwrap(error).errno
    """
    inner = error.__context__
    while (
        inner is not None and error.__suppress_context__
        and type(error).__bases__ == (type(inner),)
        and type(error).__qualname__ == type(inner).__qualname__  # gin names the copy as the original
    ):
        error, inner = inner, inner.__context__
    return error


def describe(error):
    """The one line that explains `error` to a user (its first line, plus advice).

    Example::

        describe(OSError(errno.EFBIG, "File too large", "runs/x/history.csv"))
        # "writing runs/x/history.csv failed: the file is larger than ... --output_dir."
    """
    from tfmeta.atomic import WriteError

    error = unwrap(error)
    if isinstance(error, WriteError):  # names its file and says the old content is intact
        return error.strerror
    if isinstance(error, OSError) and error.errno in _WRITE_FIXES:
        where = error.filename or "a file"
        return f"writing {where} failed: {_WRITE_FIXES[error.errno]}."
    message = getattr(error, "message", None) if _tensorflow_errors() and isinstance(
        error, _tensorflow_errors()
    ) else None
    text = str(message if message is not None else error)
    # One line: gin and TensorFlow append call sites on lines of their own.
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def report(prog, error):
    """Print `error` as one line on stderr and return the exit code (2).

    With TFMETA_DEBUG=1 the error is re-raised instead (the full traceback).
    """
    if debug_enabled():
        raise error
    print(f"{prog}: error: {type(unwrap(error)).__name__}: {describe(error)}", file=sys.stderr)
    return EXIT_BAD_INPUT


# ------------------------------------------------------------------ gin
def _registry():
    # Only for suggestions ("did you mean"): gin has no public list of names.
    try:
        from gin import config

        return config._REGISTRY
    except (ImportError, AttributeError):
        return None


def _parameters_of(registry, configurable):
    try:
        found = registry.get_match(configurable)
        return [
            p for p in inspect.signature(found.wrapped).parameters
            if p not in (found.denylist or ()) and p not in ("self", "args", "kwargs")
        ]
    except Exception:  # noqa: BLE001 - suggestions are best effort
        return []


def explain_gin_error(error):
    """Turn a gin parse error into a one-line `ConfigError` naming the fix, or None.

    Handles unknown configurables ("No configurable matching 'trian'") and
    unknown parameters ("Configurable 'train' doesn't have a parameter named
    'meta_update'"), suggesting the closest names.

    Example::

        explain_gin_error(ValueError("No configurable matching 'trian'."))
        # ConfigError("gin: no configurable named 'trian'; did you mean train?")
    """
    from tfmeta.validation import ConfigError

    text = str(error)
    registry = _registry()
    match = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
    if match and registry is not None:
        configurable, parameter = match.groups()
        known = _parameters_of(registry, configurable)
        close = difflib.get_close_matches(parameter, known, n=1)
        hint = f"did you mean {configurable}.{close[0]}?" if close else (
            f"its parameters are: {', '.join(known)}" if known else "check the spelling"
        )
        return ConfigError(
            f"gin binding {configurable}.{parameter}: {configurable} has no parameter "
            f"{parameter!r}; {hint}"
        )
    match = re.search(r"No configurable matching (?:reference )?'@?([^'(]+)", text)
    if match:
        name = match.group(1)
        known = [selector.split(".")[-1] for selector, _ in registry.items()] if registry else []
        close = difflib.get_close_matches(name.split(".")[-1], known, n=1)
        hint = f"did you mean {close[0]}?" if close else (
            "register it with gin.external_configurable or import the module that "
            "defines it (tfmeta.configurables registers tfmeta's)"
        )
        return ConfigError(f"gin: no configurable named {name!r}; {hint}")
    return None
