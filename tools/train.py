#!/usr/bin/env python
"""Meta-train, export and evaluate an initialization from a gin config.

    python tools/train.py --gin_file gin/cts_synthetic.gin [--gin_param P ...] [--output_dir D]

Same as the installed `tfmeta-train` command (see tfmeta/cli/train.py).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tfmeta.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
