"""How the command-line tools end on bad input: one line naming the problem and the fix.

`report(prog, error)` prints ``<prog>: error: <Type>: <what is wrong>: <what to
do>`` on stderr and returns exit code 2 (`TFMETA_DEBUG=1` re-raises, for the
traceback). Operating-system errors from deep inside a write (a full disk, a
file-size limit, a read-only folder) carry no advice of their own;
`describe` adds it. `explain_gin_error` does the same for gin's parse errors.

`run_tool(prog, run, argv, script=__file__)` is every tool's entry point around its `run(argv)`:
bad input is `report`ed (TensorFlow's start-up lines held back: it is the only line
on stderr), Ctrl-C ends in one line with exit code 130, and
inside `resumable(directory)` (an experiment that writes each cell as it
finishes) that line says where the cells are and the command that continues.
A Ctrl-C that a library swallowed still stops the experiment after the cell
in progress (`CtrlC`).
`at_least(n)` is an argparse type for counts (``--steps 0`` is a usage error).

Example::

    def run(argv):
        args = parser.parse_args(argv)
        with errors.resumable(args.output_dir):
            experiment.run(args.output_dir, resume=args.resume)
        return 0

    def main(argv=None):
        return errors.run_tool("many_shot.py", run, argv, script=__file__)
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import inspect
import os
import re
import shlex
import signal
import sys
import threading

from tfmeta.cli.startup import debug_enabled, hold_stderr_at_import, quiet_cpp_logs, use_kernel_defaults

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


class Stopped(Exception):
    """Ctrl-C (or a training job's `Interrupted`, `during`) inside `resumable(directory)`."""

    def __init__(self, directory, during=None):
        self.directory, self.during = directory, during
        super().__init__(f"interrupted; finished cells are saved in {directory}")


@contextlib.contextmanager
def resumable(directory):
    """Within the block, Ctrl-C ends as `Stopped(directory)`: the experiment's cells are there.

    For an experiment that writes each cell to `directory` as it finishes and
    continues with ``--resume``; `run_tool` turns it into one line and exit
    code 130. A training job stopped at a step boundary (`Interrupted`, with
    its checkpoint) is `Stopped` too, its checkpoint named.

    Example::

        with errors.resumable(out):
            results = experiment.run(config, cells, out, resume=args.resume)
    """
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as stop:
        raise Stopped(directory, unwrap(stop) if isinstance(stop, Interrupted) else None) from stop
    except Exception as error:
        if not ctrl_c_received():
            raise
        raise Stopped(directory, None) from error  # the Ctrl-C, as C code reported it


def ctrl_c_received():
    """Whether `run_tool`'s SIGINT handler (`CtrlC`) has seen Ctrl-C in this process.

    The KeyboardInterrupt it raises can surface as another error: raised
    while C code runs (in TensorFlow's tracing, say), it may come out as
    ``SystemError: ... bad argument to internal function``. After a Ctrl-C,
    such an error is the interrupt.

    Example::

        except Exception:
            if ctrl_c_received():
                return EXIT_INTERRUPTED
    """
    return bool(getattr(signal.getsignal(signal.SIGINT), "interrupted", False))


def continue_command(argv, program=None, prog="tool.py"):
    """The command line that continues an interrupted run with `argv`, and a note.

    The same arguments with ``--resume`` and without ``--overwrite`` (which
    would start over); the note says so when ``--overwrite`` was dropped.
    `program` is the tool's script (`__file__`), written as the user typed it
    when that is what runs; without it, the running script (`sys.argv[0]`:
    ``python x.py``, or a console script by its name), else ``tools/<prog>``.

    Example::

        continue_command(["--seeds", "0", "--overwrite"], "tools/many_shot.py")
        # ("python tools/many_shot.py --seeds 0 --resume", " instead of --overwrite")
    """
    kept = [arg for arg in argv if not _spells(arg, "--overwrite")]
    note = " instead of --overwrite" if len(kept) < len(argv) else ""
    if not any(_spells(arg, "--resume") for arg in kept):
        kept.append("--resume")
    return shlex.join([*_command_head(program, prog), *kept]), note


def _command_head(program, prog):
    typed = sys.argv[0] if sys.argv else ""
    if program is None:
        if typed.endswith(".py"):
            return ["python", typed]
        if os.path.isfile(typed):  # a console script (tfmeta-train): on PATH by its name
            return [os.path.basename(typed)]
        # `python -c ...` or an embedding: the tool's script by its usual place.
        return ["python", f"tools/{prog}"] if prog.endswith(".py") else [prog]
    if os.path.isfile(typed) and os.path.isfile(program) and os.path.samefile(typed, program):
        return ["python", typed]
    relative = os.path.relpath(program)  # __file__ is absolute: shorter from the working folder
    return ["python", program if relative.startswith("..") else relative]


def _spells(arg, flag):
    # argparse takes an unambiguous prefix ("--over"); "--o" is ambiguous in every tool.
    return len(arg) > 3 and flag.startswith(arg)


def _interrupted_line(stop, argv, script, prog):
    if isinstance(stop, KeyboardInterrupt):
        return "interrupted"
    if isinstance(stop, Interrupted):
        return unwrap(stop).message
    command, note = continue_command(argv, script, prog)
    during = f"; the cell in progress was {stop.during.message}" if stop.during else ""
    return (f"interrupted; finished cells are saved in {stop.directory}{during}; continue with the "
            f"same command and --resume{note}: {command}")


def run_tool(prog, run, argv=None, script=None, stopped=None):
    """`run(argv)`'s exit code, with bad input and Ctrl-C each ended by one line on stderr.

    TensorFlow, imported later, gets the tools' kernels
    (`startup.use_kernel_defaults`) and no C++ log lines below fatal
    (`startup.quiet_cpp_logs`; TFMETA_DEBUG=1 keeps them). Bad input (`expected()`) is
    `report`ed (exit code 2); Ctrl-C exits 130
    with "interrupted", and inside `resumable` with where the finished cells
    are and the command that continues (`continue_command` of `script`, the
    tool's `__file__`); during `run` SIGINT is handled by a `CtrlC`, also
    when it was ignored. `stopped(stop, argv)`, when given, is that line
    instead (the training job's own). Other errors are bugs: they
    propagate, traceback and all. With TFMETA_DEBUG=1 everything propagates.

    Example::

        def main(argv=None):
            return errors.run_tool("cts_synthetic.py", run, argv, script=__file__)
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # TensorFlow's start-up lines, printed when a tool first imports it, would
    # come before a bad-input line (tfmeta.cli.startup).
    hold_stderr_at_import()
    quiet_cpp_logs()
    use_kernel_defaults()
    def ended(stop):
        line = stopped(stop, argv) if stopped else _interrupted_line(stop, argv, script, prog)
        print(f"{prog}: {line}", file=sys.stderr)
        return EXIT_INTERRUPTED

    ctrl_c = CtrlC()
    try:
        with _recording_ctrl_c() as ctrl_c:
            return run(argv)
    except (KeyboardInterrupt, Interrupted, Stopped) as stop:
        if debug_enabled():
            raise
        return ended(stop)
    except Exception as error:  # noqa: BLE001 - only bad input is reported in one line
        if ctrl_c.interrupted and not debug_enabled():
            return ended(KeyboardInterrupt())  # the Ctrl-C, as C code it interrupted reported it
        if not isinstance(error, expected()):
            raise
        return report(prog, error)


class CtrlC:
    """`run_tool`'s SIGINT handler: raises KeyboardInterrupt, and remembers it in `interrupted`.

    A library may discard that KeyboardInterrupt (a bare ``except:``, a
    finalizer whose error Python only prints as "Exception ignored in"), and
    the experiment would go on with its other cells. An experiment's
    `CellStore` therefore raises it again after saving each cell while the
    SIGINT handler says `interrupted` (it reads the handler from `signal`:
    `experiments/` may not import `cli/`, docs/design.md).

    Example::

        handler = signal.getsignal(signal.SIGINT)
        if getattr(handler, "interrupted", False):
            raise KeyboardInterrupt
    """

    interrupted = False

    def __call__(self, signum, frame):
        self.interrupted = True
        raise KeyboardInterrupt


@contextlib.contextmanager
def _recording_ctrl_c():
    if threading.current_thread() is not threading.main_thread():
        yield CtrlC()  # only the main thread may set signal handlers: never interrupted
        return
    # Also when SIGINT is ignored: started in the background by a script (no
    # job control), a tool inherits it so, and `timeout -s INT` or `kill -INT`
    # could not stop it with its cells saved.
    handler = CtrlC()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield handler
    finally:
        # None: set outside Python, which Python cannot restore; its default instead.
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def at_least(minimum):
    """An argparse `type`: a whole number >= `minimum`, else a usage error naming the flag.

    Example::

        parser.add_argument("--steps", type=errors.at_least(1), default=100)
        # --steps 0: "error: argument --steps: 0 is not a whole number >= 1"
    """
    def whole(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is not a whole number >= {minimum}")
        return value

    return whole


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
