"""Prepare the TFDS datasets tfmeta uses, offline, from the original archives.

Usage (from the repository root)::

    python tools/prepare_data.py --from ../shared/data
    python tools/prepare_data.py --from ../shared/data --names mnist --data_dir /tmp/tfds

All logic lives in ``tfmeta.prepare``; this is only the entry point.
"""

import os
import pathlib
import sys

# The tool must also run from a plain checkout where tfmeta is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfmeta.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
