"""Start-up of the command-line tools: parse the command line first, then import TensorFlow quietly.

`--help` and usage errors need no TensorFlow, so the tools parse their
arguments before importing it (well under 2 s instead of 10-20 s). TensorFlow
then prints C++ log lines from the moment it is imported (CUDA probing,
oneDNN notices, `NodeDef mentions attribute ...`), some of them before its
own logging is set up, where `TF_CPP_MIN_LOG_LEVEL` does not reach them.
`import_tensorflow` therefore sets `TF_CPP_MIN_LOG_LEVEL=3` (unless already
set: `quiet_cpp_logs`), imports TensorFlow and Keras with the process's stderr (file
descriptor 2) held in a temporary file, which is replayed if the import
fails, and turns TensorFlow's Python logger down to errors. `--verbose` or
`TFMETA_DEBUG=1` keeps every message.

Every tool (`use_kernel_defaults`, called by `import_tensorflow` and by
`errors.run_tool`) turns TensorFlow's oneDNN CPU kernels on
(`TF_ENABLE_ONEDNN_OPTS=1`) unless the environment already says otherwise.
TensorFlow enables them by itself only on CPUs with AVX-512; on CPUs
without (the AMD EPYC of the project's CI), they ran tfmeta's meta-training
1.1-1.2x and the many-shot benchmark's fine-tuning 1.24x faster than
TensorFlow's Eigen kernels (docs/performance.md). `TF_ENABLE_ONEDNN_OPTS=0`
keeps the Eigen kernels. The library itself sets no environment variable.

The other tools import TensorFlow wherever they first need it, after their
arguments are parsed; `errors.run_tool`, every tool's entry point, calls
`quiet_cpp_logs()` too (TensorFlow also logs at error level while it runs,
e.g. "oneDNN supports DT_INT64 only on platforms with AVX-512", once per
process on some CPUs with oneDNN on: a notice, not an error; a real error
reaches Python as an exception) and `hold_stderr_at_import()`, so that this first `import tensorflow` is done with
file descriptor 2 held just the same, and a bad-input error is the first
line on stderr, not the tenth. Unlike `import_tensorflow`, it changes no
logger (their warnings stay as they were). `TFMETA_DEBUG=1` keeps every
message.

Example::

    args = parser.parse_args(argv)          # --help exits here, TensorFlow unimported
    startup.import_tensorflow(args.verbose)
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile

DEBUG_ENV = "TFMETA_DEBUG"
#: Set (unless already set) before the tools import TensorFlow: the faster CPU kernels.
KERNEL_DEFAULTS = {"TF_ENABLE_ONEDNN_OPTS": "1"}


def debug_enabled():
    """True when `TFMETA_DEBUG` is set (to anything but "" or "0"): tracebacks and all logs."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def add_verbose_flag(parser):
    """Add `--verbose` (TensorFlow's start-up and C++ log messages) to an argparse parser."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show TensorFlow's start-up and C++ log messages (also TFMETA_DEBUG=1, which "
        "also prints the traceback of an error)",
    )


def use_kernel_defaults():
    """Set `KERNEL_DEFAULTS` where the environment does not, if TensorFlow is not imported yet.

    They stay in `os.environ` (children inherit them). Once TensorFlow is
    imported it is too late (it reads them at import), so nothing is set then.

    Example::

        startup.use_kernel_defaults()
        import tensorflow as tf                 # oneDNN kernels, unless TF_ENABLE_ONEDNN_OPTS=0
    """
    if "tensorflow" not in sys.modules:
        for name, value in KERNEL_DEFAULTS.items():
            os.environ.setdefault(name, value)


def quiet_cpp_logs():
    """Set `TF_CPP_MIN_LOG_LEVEL=3` (only fatal C++ log lines) unless set already or `TFMETA_DEBUG` is on.

    TensorFlow reads it when it logs, so this works before and after the
    import. It stays in `os.environ` (children inherit it).

    Example::

        startup.quiet_cpp_logs()
        import tensorflow as tf                 # no "E0000 ... util.cc] oneDNN supports ..." line
    """
    if not debug_enabled():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tensorflow(verbose=False):
    """Import TensorFlow and Keras, silencing their start-up noise unless `verbose`."""
    loud = verbose or debug_enabled()
    _stop_holding()  # the decision is `verbose`'s now
    if not loud:
        quiet_cpp_logs()
    if "tensorflow" not in sys.modules:
        use_kernel_defaults()
        with contextlib.nullcontext() if loud else _stderr_held():
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
    if not loud:
        import absl.logging
        import tensorflow as tf

        absl.logging.set_verbosity(absl.logging.ERROR)
        tf.get_logger().setLevel("ERROR")


@contextlib.contextmanager
def _stderr_held():
    """Point file descriptor 2 at a temporary file for the block; replay it on error."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def hold_stderr_at_import(module="tensorflow"):
    """Until `module` is imported, make its first import hold file descriptor 2 as `import_tensorflow` does.

    For a tool that imports TensorFlow only once its arguments are parsed
    (`--help` stays fast): TensorFlow's C++ start-up lines (CUDA probing,
    oneDNN notices), which `TF_CPP_MIN_LOG_LEVEL` does not reach, are then
    not printed, or printed only if the import fails; TensorFlow's devices are
    listed with it held too (its CUDA probe). Nothing happens with
    `TFMETA_DEBUG=1` or once `module` is imported.

    Example::

        startup.hold_stderr_at_import()
        args = parser.parse_args(argv)
        import tensorflow as tf                 # quiet
    """
    if debug_enabled() or module in sys.modules:
        return
    _stop_holding()
    sys.meta_path.insert(0, _HoldingFinder(module))


def _stop_holding():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _HoldingFinder)]


class _HoldingFinder(importlib.abc.MetaPathFinder):
    """Finds `module` as the other finders do, its loader running with stderr held."""

    def __init__(self, module):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        # The other finders answer. This one stays until the import runs
        # (`exec_module`): `importlib.util.find_spec("tensorflow")` alone, as
        # etils asks whether TensorFlow is installed, imports nothing.
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HoldingLoader(spec.loader)
                return spec
        return None


class _HoldingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # resource readers and the like: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        _stop_holding()  # once
        # The module keeps its real loader (pickling, importlib.resources).
        module.__loader__ = module.__spec__.loader = self.loader
        with _stderr_held():
            self.loader.exec_module(module)
            if module.__name__ == "tensorflow":
                # TensorFlow probes CUDA ("failed call to cuInit" without a GPU,
                # an error that TF_CPP_MIN_LOG_LEVEL=2 shows) when it first lists
                # the devices, not at import. Listing them here, held, leaves
                # them configurable (logical devices, memory growth).
                module.config.list_physical_devices()
