"""Start-up of the command-line tools: parse the command line first, then import TensorFlow quietly.

`--help` and usage errors need no TensorFlow, so the tools parse their
arguments before importing it (well under 2 s instead of 10-20 s). TensorFlow
then prints C++ log lines from the moment it is imported (CUDA probing,
oneDNN notices, `NodeDef mentions attribute ...`), some of them before its
own logging is set up, where `TF_CPP_MIN_LOG_LEVEL` does not reach them.
`import_tensorflow` therefore sets `TF_CPP_MIN_LOG_LEVEL=3` (unless already
set), imports TensorFlow and Keras with the process's stderr (file
descriptor 2) held in a temporary file, which is replayed if the import
fails, and turns TensorFlow's Python logger down to errors. `--verbose` or
`TFMETA_DEBUG=1` keeps every message.

It also turns TensorFlow's oneDNN CPU kernels on (`TF_ENABLE_ONEDNN_OPTS=1`)
unless the environment already says otherwise. TensorFlow enables them by
itself only on CPUs with AVX-512; on CPUs without (the AMD EPYC of the
project's CI), they ran tfmeta's meta-training 1.1-1.2x faster than
TensorFlow's Eigen kernels (docs/performance.md, "Against PyTorch").
`TF_ENABLE_ONEDNN_OPTS=0` keeps the Eigen kernels.

Example::

    args = parser.parse_args(argv)          # --help exits here, TensorFlow unimported
    startup.import_tensorflow(args.verbose)
"""

from __future__ import annotations

import contextlib
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


def import_tensorflow(verbose=False):
    """Import TensorFlow and Keras, silencing their start-up noise unless `verbose`."""
    loud = verbose or debug_enabled()
    if not loud:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        # Too late once TensorFlow is imported: it reads them at import.
        for name, value in KERNEL_DEFAULTS.items():
            os.environ.setdefault(name, value)
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
