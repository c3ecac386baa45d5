#!/usr/bin/env python
"""The CTS paper's approximation error (figure 3), measured on MNIST / Fashion-MNIST.

    python tools/cts_approximation.py [--draws 10] [--max_k 20]
                                      [--inner_lrs 0.01 0.03 0.1 0.3]
                                      [--meta_lrs 0.01 0.03 0.1 0.3 1]
                                      [--alpha0 0.1] [--beta0 0.1]
                                      [--output_dir runs/cts_approximation] [--resume]

For ReLU and softplus MLPs, measures ||U_k(phi + Delta_1 + ... + Delta_{k-1}) -
U_1(... U_1(U_1(phi) + Delta_1) ... + Delta_{k-1})|| over `--draws` draws
(fresh phi and mini-batches) with tfmeta's CTS (shift="gradient") and its
exact reference (shift="accurate"); see tfmeta/experiments/cts_approximation.py.
Writes `cts_approximation.png`, `results.json` (after every setting) and
`table.md` to --output_dir, and prints the table. `--resume` reuses the
settings already in results.json. The default grid takes about 2 minutes
on 2 CPU cores.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROG = "cts_approximation.py"


def _parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=10, help="draws of phi and mini-batches")
    parser.add_argument("--max_k", type=int, default=20, help="the largest trajectory length k")
    parser.add_argument("--inner_lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3],
                        help="the alpha sweep (at beta0, k = max_k)")
    parser.add_argument("--meta_lrs", type=float, nargs="+",
                        default=[0.01, 0.03, 0.1, 0.3, 1.0],
                        help="the beta sweep (at alpha0, k = max_k)")
    parser.add_argument("--alpha0", type=float, default=0.1, help="alpha of the beta and k sweeps")
    parser.add_argument("--beta0", type=float, default=0.1, help="beta of the alpha and k sweeps")
    parser.add_argument("--output_dir", default="runs/cts_approximation")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the settings already measured in output_dir/results.json")
    return parser


def _measured(path):
    """The results already in `path` (this tool's results.json), by setting; a ConfigError if it is not one."""
    from tfmeta.validation import ConfigError

    fix = "choose another --output_dir, or drop --resume to measure again"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--resume: {path} cannot be read as JSON ({error}): {fix}.") from None
    results = stored.get("results") if isinstance(stored, dict) else None
    if not isinstance(results, dict):
        raise ConfigError(f"--resume: {path} is not a results.json of tools/cts_approximation.py "
                          f"(no \"results\" by setting): {fix}.")
    return results


def run(argv):
    """The command line `argv`; errors propagate (`main` reports them)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.draws < 2:
        parser.error(f"--draws {args.draws}: a 95% interval needs at least 2 draws")
    if args.max_k < 2:
        parser.error(f"--max_k {args.max_k}: the error is 0 at k = 1; give k >= 2")
    rates = [*args.inner_lrs, *args.meta_lrs, args.alpha0, args.beta0]
    if min(rates) <= 0:
        parser.error(f"learning rates must be > 0, got {min(rates):g}")

    from tfmeta import atomic
    from tfmeta.cli import errors
    from tfmeta.experiments import cts_approximation as cts

    ks = tuple(k for k in (1, 2, 5, 10, 15, 20, 50, 100) if k < args.max_k) + (args.max_k,)
    grid = cts.Grid(tuple(args.inner_lrs), tuple(args.meta_lrs), args.alpha0, args.beta0,
                    args.max_k, table_ks=ks)
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    done = _measured(path) if args.resume and path.exists() else {}
    measured = dict(done)

    def save(result):
        measured[cts.key(result["setting"])] = result
        atomic.write_text(path, cts.to_json(list(measured.values()), grid, args.draws))

    with errors.resumable(out):  # results.json is rewritten after every setting
        results = cts.run(grid, draws=args.draws, done=done, on_result=save)
    atomic.write_text(path, cts.to_json(results, grid, args.draws))
    table = cts.table(results, grid)
    atomic.write_text(out / "table.md", table + "\n")
    cts.plot(results, out / "cts_approximation.png", grid)
    print()
    print(table)
    print(f"\nWrote {out / 'cts_approximation.png'}, {path} and {out / 'table.md'}")
    return 0


def main(argv=None):
    """Bad input: one line on stderr, exit code 2; Ctrl-C: how to continue, 130 (tfmeta.cli.errors)."""
    from tfmeta.cli import errors

    return errors.run_tool(PROG, run, argv, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
