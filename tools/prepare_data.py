"""Prepare the TFDS datasets tfmeta uses, offline, from the original archives.

Usage (from the repository root)::

    python tools/prepare_data.py --from ../shared/data
    python tools/prepare_data.py --from ../shared/data --names mnist --data_dir /tmp/tfds

All logic lives in ``tfmeta.prepare``; this is only the entry point (bad
input ends in one line, exit code 2, as in every tool: ``tfmeta.cli.errors``).
"""

import pathlib
import sys

# The tool must also run from a plain checkout where tfmeta is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tfmeta import prepare  # noqa: E402
from tfmeta.cli import errors  # noqa: E402

PROG = "prepare_data.py"


def main(argv=None):
    """Bad input: one line on stderr, exit code 2 (tfmeta.cli.errors)."""
    return errors.run_tool(PROG, prepare.main, argv, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
