#!/usr/bin/env python
"""Many-shot meta-learning across heterogeneous datasets (issue 11), resumable.

    python tools/many_shot.py [--methods cts reptile ...] [--seeds 0 1 2]
                              [--output_dir runs/many_shot] [--resume] [--overwrite]
                              [--smoke] [--validation [--finetune_lrs 0.1 0.03 0.01]]
                              [--gin_param "..."] [--report] [--jobs N]
                              [--figure docs/figures/many_shot_convergence.png]

Each method is one gin file, gin/many_shot_<method>.gin (all include
gin/many_shot.gin). Cells (method x seed x meta-checkpoint x fine-tuning
rate) run seed by seed and each goes to <output_dir>/results.json as soon as
it is finished, with its settings (with `--jobs N`, the default on a
multi-core CPU, N single-threaded worker processes, each taking the next
method x seed unit until none is left; the cells are the same); `--resume` skips finished cells and
refuses ones computed with other settings. At the end (and with `--report`
alone) it writes summary.md (tables, claims) and the meta-convergence PNG.
A results.json of the older layout (docs/figures/many_shot_results.json) is
read as it is and converted in place by `--resume`.

`--validation` runs on the source-only validation split (meta-train on six
sources, meta-test on the two others: no target is touched) at a third of
the budget, for choosing hyperparameters; with `--finetune_lrs` every
meta-training is fine-tuned at each of those rates, and summary.md has
each method's validation accuracy and loss AUC per rate and its best rate
(for `Benchmark.finetune_lr` in its gin file). `--smoke` is a tiny run of
every method on real data (about a minute per method on 2 cores; with
`--validation`, on the validation split at smoke sizes).
"""

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

REPO = pathlib.Path(__file__).resolve().parents[1]
PROG = "many_shot.py"
#: gin/many_shot_<name>.gin, in the order they run (and appear in tables).
METHODS = ("scratch", "cts", "reptile", "cts_no_shift", "leap", "fomaml", "multitask")

SMOKE = [
    "Benchmark.sources = ('mnist', 'mnist/rot90', 'omniglot/background_a', 'omniglot/background_b')",
    "Benchmark.targets = ('fashion_mnist', 'digits')",
    "Benchmark.filters = 8",
    "Benchmark.inner_steps = 20",
    "Benchmark.tasks_per_batch = 2",
    "Benchmark.batch_size = 16",
    "Benchmark.budget = 40",
    "Benchmark.checkpoints = 2",
    "Benchmark.finetune_steps = 40",
    "Benchmark.finetune_examples = 300",
    "Benchmark.test_examples = 500",
]


def validation_bindings(smoke=False):
    """The source-only split; at a third of the budget, one checkpoint (smoke: the smoke budget)."""
    from tfmeta.experiments.many_shot import VALIDATION_SOURCES, VALIDATION_TARGETS

    split = [f"Benchmark.sources = {tuple(VALIDATION_SOURCES)!r}",
             f"Benchmark.targets = {tuple(VALIDATION_TARGETS)!r}"]
    return split if smoke else split + ["Benchmark.budget = 4000", "Benchmark.checkpoints = 1"]


def configured(name, bindings):
    """`(Benchmark, Method)` of gin/many_shot_<name>.gin with `bindings`."""
    import gin

    from tfmeta.cli import ginconfig

    gin.clear_config()
    # `load` names a mistyped --gin_param and its fix in one line.
    ginconfig.load([str(REPO / "gin" / f"many_shot_{name}.gin")], bindings)
    bench = gin.get_configurable("tfmeta.many_shot.Benchmark")()
    return bench, gin.get_configurable("tfmeta.many_shot.Method")()


def benchmark_lines(results):
    """summary.md's tables, meta-convergence and claims of `results` (one fine-tuning rate per method)."""
    from tfmeta.experiments import many_shot

    rates = ", ".join(f"{m} {r[0]:g}" for m, r in many_shot.rates_of(results).items())
    lines = [f"Fine-tuning learning rate per method: {rates}.", "",
             "## Final test accuracy per target (mean ± std over seeds)", "",
             many_shot.table(results, "test_accuracy"), "",
             "## Training-loss AUC per target (lower is better)", "",
             many_shot.table(results, "loss_auc"), "",
             "## Meta-convergence: mean test accuracy over targets vs task-steps", "",
             "| method | task-steps: mean ± std (seeds) |", "|---|---|"]
    for method, points in many_shot.convergence(results).items():
        lines.append(f"| {method} | " + ", ".join(
            f"{s}: {m:.4f} ± {d:.4f} ({n})" for s, m, d, n in points) + " |")
    lines += ["", "## Claims", ""]
    for claim, (holds, evidence) in many_shot.claims(results).items():
        lines.append(f"- **{'holds' if holds else 'does not hold'}**: {claim}: `{json.dumps(evidence)}`")
    return lines


def validation_lines(results, gin_names):
    """summary.md's choice of the fine-tuning rate: per method and rate, accuracy and loss AUC; the best."""
    from tfmeta.experiments import many_shot

    best = many_shot.best_finetune_lr(results)
    lines = ["## Fine-tuning learning rate on the source-only validation split", "",
             "Mean over the validation targets of the final test accuracy, mean ± std over seeds "
             "(seeds), at each method's last checkpoint:", "",
             many_shot.rate_table(results, "test_accuracy"), "",
             "Training-loss AUC (lower is better):", "",
             many_shot.rate_table(results, "loss_auc"), "",
             "Best rate per method (highest mean accuracy over the seeds all its rates have; "
             "ties: lower AUC):", ""]
    for method, rate in best.items():
        where = f"gin/many_shot_{gin_names[method]}.gin" if method in gin_names else "its gin file"
        lines.append(f"- {method}: `Benchmark.finetune_lr = {rate:g}` in {where}")
    for method, why in many_shot.incomplete(results).items():
        lines.append(f"- {method}: no rate chosen, incomplete: {why} (continue the run with --resume); "
                     "left out of the tables below")
    return lines + [""], best


def report(results, out, figure=None, log=print, validation=False, gin_names=None, configured_rates=None):
    """Write summary.md and the convergence PNG(s) of `results`; print the summary.

    A validation run gets the rate tables and each method's best rate first,
    then the benchmark's tables at those rates (an incomplete method, given
    no rate, is listed and left out of them). Otherwise each method is
    shown at `configured_rates[method]` (its gin file's Benchmark.finetune_lr)
    where it has cells at that rate, and flagged where it has none.
    """
    from tfmeta import atomic
    from tfmeta.experiments import many_shot

    rates, configured_rates = many_shot.rates_of(results), configured_rates or {}
    if validation:
        lines, best = validation_lines(results, gin_names or {})
        # A method given no rate (incomplete) has cells at several: the tables need one.
        picked = many_shot.at_rates(results, best)
        results = {**picked, "cells": {k: c for k, c in picked["cells"].items() if c["method"] in best}}
    else:
        lines = [f"**Note**: the {method} cells were fine-tuned at lr {', '.join(f'{r:g}' for r in found)}; "
                 f"its gin file says {configured_rates[method]:g}: re-run them."
                 for method, found in rates.items()
                 if method in configured_rates and configured_rates[method] not in found]
        chosen = {m: r for m, r in configured_rates.items() if r in rates.get(m, ())}
        results = many_shot.at_rates(results, chosen)
        lines += [""] if lines else []
    shown = bool(results["cells"])  # no cells: no method of a validation run has a rate chosen yet
    text = "\n".join(lines + (benchmark_lines(results) if shown else [])) + "\n"
    atomic.write_text(out / "summary.md", text)
    for path in {out / "convergence.png", *([pathlib.Path(figure)] if figure else [])} if shown else ():
        many_shot.plot_convergence(results, path, title=f"{out.name}: {len(results['cells'])} cells")
    log(text)


def run(argv):
    """The command line `argv`; errors propagate (`main` reports them)."""
    from tfmeta.cli import errors, workers
    from tfmeta.validation import ConfigError

    # No abbreviations: --jobs hands the options on to its workers by their full names.
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default=None,
                        help="default runs/many_shot (runs/many_shot_smoke, runs/many_shot_validation)")
    parser.add_argument("--resume", action="store_true", help="keep the finished cells of results.json")
    parser.add_argument("--overwrite", action="store_true", help="start over, replacing results.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one seed (CI scale)")
    parser.add_argument("--validation", action="store_true",
                        help="the source-only validation split at 1/3 of the budget")
    parser.add_argument("--finetune_lrs", type=float, nargs="+", default=None,
                        help="with --validation: fine-tune every meta-training at each of these rates")
    parser.add_argument("--gin_param", action="append", default=[],
                        help='extra bindings, e.g. "meta/SGD.learning_rate = 0.01"')
    parser.add_argument("--figure", default=None, help="also write the convergence PNG here")
    parser.add_argument("--report", action="store_true", help="only write summary.md and the PNG")
    parser.add_argument("--jobs", type=errors.at_least(1), default=workers.default_jobs(),
                        help="single-threaded worker processes side by side, each taking the next "
                             "method x seed unit when it ends one (faster on a CPU; results are the "
                             "same) (default: one per CPU, "
                             f"at most 4: here {workers.default_jobs()})")
    parser.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # a --jobs worker: its queue
    args = parser.parse_args(argv)
    if args.finetune_lrs and not args.validation:
        raise ConfigError("--finetune_lrs chooses the fine-tuning rate, which is done on the source-only "
                          "split only: add --validation (the benchmark uses each gin file's "
                          "Benchmark.finetune_lr).")

    import tfmeta.configurables  # noqa: F401  (registers Benchmark and Method)
    from tfmeta.experiments import many_shot

    bindings = (SMOKE if args.smoke else []) + (validation_bindings(args.smoke) if args.validation else [])
    bindings += args.gin_param
    seeds = args.seeds[:1] if args.smoke else args.seeds
    suffix = "_smoke" if args.smoke else "_validation" if args.validation else ""
    out = pathlib.Path(args.output_dir or f"runs/many_shot{suffix}")
    results_path = out / "results.json"
    setups = {name: configured(name, bindings) for name in args.methods}
    gin_names = {method.name: name for name, (_, method) in setups.items()}
    rates = {method.name: bench.finetune_lr for bench, method in setups.values()}
    show = dict(figure=args.figure, validation=args.validation, gin_names=gin_names, configured_rates=rates)
    if args.report:
        results = many_shot.load_results(results_path)
        # A validation run's file is reported as one, with or without --validation.
        targets = {tuple(c["settings"]["targets"]) for c in results["cells"].values()}
        show["validation"] |= targets == {tuple(many_shot.VALIDATION_TARGETS)}
        report(results, out, **show)
        return 0
    if results_path.exists() and not (args.resume or args.overwrite):
        raise ConfigError(f"{results_path} exists: pass --resume to continue it or --overwrite to "
                          "start over.")
    if args.overwrite and results_path.exists() and not args.unit:
        results_path.unlink()
    if results_path.exists():  # settings first: a mismatch costs seconds, not a run
        cells = many_shot.load_results(results_path)["cells"]
        for name in args.methods:
            bench, method = configured(name, bindings)
            many_shot.check_settings(bench, [method], seeds, cells, args.finetune_lrs, results_path)
        if not args.unit:  # once per run, not per worker
            from tfmeta.experiments import machine

            note = machine.other_kernels([cell.get("machine") for cell in cells.values()],
                                         machine.describe())
            if note:
                print(f"{PROG}: note: {note}", flush=True)
    began = time.perf_counter()
    with errors.resumable(out):  # each cell is in results.json as soon as it is finished
        if args.jobs > 1 and not args.unit:
            try:
                run_side_by_side(argv, args, out, seeds, setups)
            except workers.UnitFailed as failed:
                print(f"{PROG}: error: {failed}", file=sys.stderr)
                return failed.returncode if failed.returncode > 0 else 1
        else:
            units = _claimed(args.unit) if args.unit else ((name, seed) for seed in seeds
                                                           for name in args.methods)
            for name, seed in units:
                bench, method = configured(name, bindings)
                # After the first cell the file holds this run's own cells: always resume.
                many_shot.run(bench, [method], [seed], out, resume=True, finetune_lrs=args.finetune_lrs)
    if args.unit:
        return 0
    results = many_shot.load_results(results_path)
    print(f"\nDone in {time.perf_counter() - began:.0f} s; {len(results['cells'])} cells in {results_path}")
    report(results, out, **show)
    return 0


def run_side_by_side(argv, args, out, seeds, setups):
    """Every unfinished method x seed of `args` in `args.jobs` `--unit` workers (children of this tool).

    The units are queued in the order one process would run them (seed by
    seed), except that those with no meta-training come last, so the run
    ends on short units, not with one worker idle beside a long one. Each
    worker takes the next unit when it finishes one, in the same process
    (TensorFlow starts, and the fine-tuning functions are traced, once per
    worker). The workers add their cells to out/results.json (`CellStore`
    takes turns on it).
    """
    from tfmeta.cli import workers
    from tfmeta.experiments import many_shot

    results_path = out / "results.json"
    cells = many_shot.load_results(results_path)["cells"] if results_path.exists() else {}
    units = [(name, seed) for seed in seeds for name in args.methods
             if many_shot.missing_cells(*setups[name], seed, cells, args.finetune_lrs)]
    units.sort(key=lambda unit: setups[unit[0]][1].kind == "none")  # stable: seed by seed otherwise
    if not units:
        print(f"every cell is in {results_path} already: nothing to run", flush=True)
        return
    if results_path.exists():  # an older layout is converted once, here, not by every child
        bench, method = setups[args.methods[0]]
        many_shot.run(bench, [], [], out, resume=True, finetune_lrs=args.finetune_lrs)
    queue = workers.UnitQueue.create(out / ".units.json", units)
    # The same options, the queue's methods and seeds; --resume: the file is shared.
    common = _without(argv, {"--methods", "--seeds", "--jobs", "--output_dir"}, {"--overwrite", "--resume"})
    methods = [name for name in args.methods if any(unit[0] == name for unit in units)]
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), *common, "--unit", str(queue.path),
               "--resume", "--output_dir", str(out), "--methods", *methods,
               "--seeds", *sorted({str(seed) for _, seed in units}, key=int), "--jobs", "1"]
    jobs = min(args.jobs, len(units))
    env = workers.child_environment(args.jobs)
    print(f"{len(units)} method x seed units, {jobs} side by side (TensorFlow threads each: "
          f"{env['TF_NUM_INTRAOP_THREADS']} per op, {env['TF_NUM_INTEROP_THREADS']} ops at once)",
          flush=True)
    try:
        workers.run_units([command] * jobs, args.jobs, on_failure=queue.close)
    finally:  # the workers' cells are in the order they finished: put them in one process's order
        queue.remove()
        if results_path.exists():
            _in_run_order(results_path, seeds, [setups[name][1].name for name in args.methods])


def _claimed(path):
    """A worker's units: `(method, seed)` claimed one at a time from the queue at `path`."""
    from tfmeta.cli import workers

    queue = workers.UnitQueue(path)
    while (unit := queue.claim()) is not None:
        print(f"worker {os.getpid()} takes {unit[0]}, seed {unit[1]}", flush=True)
        yield tuple(unit)


def _in_run_order(path, seeds, methods):
    """Rewrite `path`'s cells in the order one process writes them: seed, method, checkpoint; others after."""
    from tfmeta import atomic

    results = json.loads(path.read_text())
    cells = results["cells"]

    def place(key):
        cell = cells[key]
        known = cell["seed"] in seeds and cell["method"] in methods
        return ((0, seeds.index(cell["seed"]), methods.index(cell["method"]), cell["inner_steps"])
                if known else (1,))

    order = sorted(cells, key=place)  # stable: rates and unknown cells keep their order
    atomic.write_text(path, json.dumps({**results, "cells": {key: cells[key] for key in order}}, indent=1))


def _without(argv, valued, flags):
    """`argv` without the options of `valued` (and their values) and the switches of `flags`."""
    kept, skipping = [], False
    for item in argv:
        name = item.split("=", 1)[0]
        if name in valued:
            skipping = "=" not in item
            continue
        if skipping and not item.startswith("--"):
            continue
        skipping = False
        if name not in flags:
            kept.append(item)
    return kept


def main(argv=None):
    """Bad input: one line on stderr, exit code 2; Ctrl-C: how to continue, 130 (tfmeta.cli.errors)."""
    from tfmeta.cli import errors

    argv = sys.argv[1:] if argv is None else list(argv)
    # A --jobs worker's Ctrl-C: the parent says how to continue, for the whole run.
    unit = (lambda stop, argv: "worker stopped; its finished cells are saved") if "--unit" in argv else None
    return errors.run_tool(PROG, run, argv, script=__file__, stopped=unit)


if __name__ == "__main__":
    # One thread per op whatever --jobs (its workers inherit it): the numbers
    # depend on the intra-op thread count (oneDNN's reductions split by it), and
    # a 16-filter convnet's kernels gain nothing from a second thread
    # (docs/performance.md); --jobs uses the cores instead.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    sys.exit(main())
