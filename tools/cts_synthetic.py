#!/usr/bin/env python
"""The CTS paper's synthetic experiment (figures 4-5), measured.

    python tools/cts_synthetic.py [--methods reptile cts cts_accurate ...]
                                  [--task_seed 0] [--output_dir runs/cts_synthetic]

Prints a Markdown table (task-average loss after 100 inner steps from the
phi learned from each start point of {-5, 5, 15}^2), and writes
`landscape.png` (the initialization-quality landscape with every method's
meta-trajectories) and `results.json`.
"""

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    from tfmeta import atomic
    from tfmeta.experiments import cts_synthetic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["reptile", "cts", "cts_no_shift", "cts_random_shift", "cts_accurate"],
        choices=sorted(cts_synthetic.METHODS),
    )
    parser.add_argument("--task_seed", type=int, default=0, help="seed of the task rotations")
    parser.add_argument("--output_dir", default="runs/cts_synthetic")
    args = parser.parse_args(argv)

    config = cts_synthetic.Config(task_seed=args.task_seed)
    results = cts_synthetic.run(methods=args.methods, config=config)
    print()
    print(cts_synthetic.table(results))
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cts_synthetic.plot(results, out / "landscape.png", config)
    atomic.write_text(out / "results.json", cts_synthetic.to_json(results))
    print(f"\nWrote {out / 'landscape.png'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
