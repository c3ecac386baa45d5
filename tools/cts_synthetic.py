#!/usr/bin/env python
"""The CTS paper's synthetic experiment (figures 4-5), measured over task seeds and K.

    python tools/cts_synthetic.py [--methods reptile cts cts_accurate ...]
                                  [--task_seeds 0 1 2 3 4] [--inner_steps 80 100 120]
                                  [--processes M] [--budget meta_updates|processes]
                                  [--template mean|drawn] [--meta_lr 0.1]
                                  [--output_dir runs/cts_synthetic] [--resume]
                                  [--figure docs/figures/cts_synthetic_k.png]

Meta-trains from each start point of {-5, 5, 15}^2 for every (method, K,
task seed) cell (M = --processes, default 3 at K = 100 as the paper and
240 // K otherwise as the authors' script), writing each cell to
`results.json` as soon as it is done (`--resume` keeps the cells there; a
cell measured with other settings is an error). Prints and writes
`summary.md` (mean +- std over task seeds per method and K, how often each
method is below Reptile, the per-start tables) and `landscape.png` (the
meta-trajectories of the first K and seed). `--figure PATH` also draws the
paper's figure 5 and the effect of K (tfmeta.experiments.cts_synthetic.plot_k).
"""

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROG = "cts_synthetic.py"
DEFAULT_METHODS = ["reptile", "cts", "cts_no_shift", "cts_random_shift", "cts_accurate"]


def _parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--task_seeds", type=int, nargs="+", default=[0],
                        help="seeds of the task rotations")
    parser.add_argument("--inner_steps", type=int, nargs="+", default=[100], help="K values")
    parser.add_argument("--processes", type=int, default=None,
                        help="M, inner processes (default: 3 at K = 100, else 240 // K)")
    parser.add_argument("--budget", default="meta_updates", choices=["meta_updates", "processes"],
                        help="every method gets M*K meta-updates (the paper), or M inner "
                             "processes (the authors' script: Reptile makes M meta-updates)")
    parser.add_argument("--template", default="mean", choices=["mean", "drawn"],
                        help="a = c = 0.5, or (a, c) drawn from the task seed as the authors")
    parser.add_argument("--meta_lr", type=float, default=0.1, help="beta")
    parser.add_argument("--output_dir", default="runs/cts_synthetic")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells already in output_dir/results.json")
    parser.add_argument("--figure", default=None,
                        help="also write figure 5 and the effect of K to this PNG")
    parser.add_argument("--figure_grid", type=int, default=21,
                        help="grid of phi for figure 5(a-c) (the authors: 41)")
    return parser


def run(argv):
    """The command line `argv`; errors propagate (`main` reports them)."""
    parser = _parser()
    args = parser.parse_args(argv)
    from tfmeta.experiments import cts_synthetic as cts

    unknown = sorted(set(args.methods) - set(cts.METHODS))
    if unknown:
        parser.error(f"--methods {' '.join(unknown)}: choose from {', '.join(sorted(cts.METHODS))}")
    if min(args.inner_steps) < 2 or (args.processes is not None and args.processes < 1):
        parser.error("--inner_steps must be >= 2 and --processes >= 1")
    if args.meta_lr <= 0:
        parser.error(f"--meta_lr {args.meta_lr:g} must be > 0")
    if args.figure and not {"reptile", "cts"} <= set(args.methods):
        parser.error("--figure compares reptile and cts: include both in --methods")

    from tfmeta import atomic
    from tfmeta.cli import errors

    config = cts.Config(meta_lr=args.meta_lr, budget=args.budget, template=args.template)
    out = pathlib.Path(args.output_dir)
    with errors.resumable(out):  # each cell is in results.json as soon as it is measured
        cells = cts.sweep(args.methods, args.inner_steps, args.task_seeds, config,
                          processes=args.processes, output_dir=out, resume=args.resume)
    methods, ks, seeds = args.methods, args.inner_steps, args.task_seeds
    parts = ["## Loss after 100 Adam steps (the score)", cts.sweep_table(cells, methods, ks, seeds)]
    for metric, title in (("loss_authors_test", "the authors' test(): Adam, K steps"),
                          ("loss_inner_optimizer", "100 steps of SGD with momentum 0.9")):
        parts += [f"## Loss after {title}", cts.sweep_table(cells, methods, ks, seeds, metric)]
    for K in ks:
        for seed in seeds:
            results = cts.results_of(cells, methods, K, seed, config=config)
            parts += [f"## K = {K}, task seed {seed}", cts.table(results)]
    summary = "\n\n".join(parts) + "\n"
    print("\n" + summary)
    atomic.write_text(out / "summary.md", summary)
    cts.plot(cts.results_of(cells, methods, ks[0], seeds[0], config=config),
             out / "landscape.png", dataclasses.replace(config, task_seed=seeds[0]))
    print(f"Wrote {out / 'results.json'}, {out / 'summary.md'} and {out / 'landscape.png'}")
    if args.figure:
        counts = cts.plot_k(cells, args.figure, methods, ks, seeds, config,
                            grid=args.figure_grid, log=print)
        atomic.write_text(out / "landscape_counts.json", json.dumps(counts, indent=1))
        print(f"Wrote {args.figure} and {out / 'landscape_counts.json'}")
    return 0


def main(argv=None):
    """Bad input: one line on stderr, exit code 2; Ctrl-C: how to continue, 130 (tfmeta.cli.errors)."""
    from tfmeta.cli import errors

    return errors.run_tool(PROG, run, argv, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
