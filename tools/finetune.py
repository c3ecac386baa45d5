#!/usr/bin/env python
"""Fine-tune held-out tasks from an exported initialization and from a random one.

    python tools/finetune.py --init PATH --gin_file F [--gin_param P ...] [--output_dir D]

Same as the installed `tfmeta-finetune` command (see tfmeta/cli/finetune.py).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tfmeta.cli.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
