#!/usr/bin/env python
"""Fisher-based task complexity experiments on real data (Achille et al.).

    python tools/complexity.py --gin_file gin/complexity_relabel.gin [--output_dir D]
    python tools/complexity.py --gin_file gin/complexity_reachability.gin
    python tools/complexity.py --gin_file gin/complexity_ranking.gin \\
        --gin_param "ranking_experiment.initializations = {'leap': 'runs/x/initialization'}"
    python tools/complexity.py --gin_file gin/complexity_kramers.gin --output_dir D [--resume]
    python tools/complexity.py --gin_file gin/complexity_prediction.gin --output_dir D [--resume]

The gin file selects the experiment (``run.experiment = @relabel_experiment``,
``@reachability_experiment``, ``@ranking_experiment``, ``@kramers_experiment``
or ``@prediction_experiment``, see tfmeta/experiments/complexity_*.py) and
binds its settings; ``--gin_param`` overrides any binding. ``--resume``
continues an interrupted run of an experiment that checkpoints its finished
cells in ``results.json`` (relabel, kramers, prediction). ``--experiment NAME`` selects an experiment without a
gin file (library defaults). Outputs in ``--output_dir`` (default
``runs/<gin file name>``): ``results.json``, ``summary.md``, the PNG figure
and ``operative_config.gin``.

The datasets must be prepared offline first
(``python tools/prepare_data.py --from ../shared/data``).
"""

import argparse
import contextlib
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROG = "complexity.py"
EXPERIMENTS = ("relabel", "reachability", "ranking", "kramers", "prediction")


def run(argv):
    """The command line `argv`; errors propagate (`main` reports them)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file(s), e.g. gin/complexity_relabel.gin")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="extra gin bindings, e.g. \"relabel_experiment.seeds = (0, 1)\"")
    parser.add_argument("--experiment", choices=EXPERIMENTS, default=None,
                        help="run this experiment (overrides run.experiment of the gin files)")
    parser.add_argument("--output_dir", default=None,
                        help="default: runs/<first gin file name> or runs/complexity_<experiment>")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --output_dir from the cells its "
                             "results.json holds (relabel, kramers, prediction)")
    args = parser.parse_args(argv)
    if not args.gin_file and not args.experiment:
        parser.error("pass --gin_file (e.g. gin/complexity_relabel.gin) or --experiment "
                     f"{{{','.join(EXPERIMENTS)}}}")

    import gin

    import tfmeta.configurables  # noqa: F401  (registers the experiments with gin)
    from tfmeta.cli import errors, ginconfig
    from tfmeta.experiments import complexity_run
    from tfmeta.validation import ConfigError

    bindings = list(args.gin_param)
    if args.experiment:
        bindings.append(f"tfmeta.complexity.run.experiment = "
                        f"@tfmeta.complexity.{args.experiment}_experiment")
    # A missing gin file or a mistyped binding: one line naming it and the fix.
    ginconfig.load(args.gin_file, bindings)
    if not ginconfig.is_bound("tfmeta.complexity.run.experiment"):
        raise ConfigError("no experiment selected: bind it in the gin file (e.g. 'run.experiment = "
                          "@relabel_experiment') or pass --experiment.")
    # The bound function (gin holds a reference to it; its selector names it).
    reference = ginconfig.query("tfmeta.complexity.run.experiment")
    selector = getattr(reference, "selector", None)
    experiment = gin.get_configurable(selector) if selector else reference
    if args.output_dir:
        output_dir = args.output_dir
    elif args.gin_file:
        output_dir = os.path.join("runs", pathlib.Path(args.gin_file[0]).stem)
    else:
        output_dir = os.path.join("runs", f"complexity_{args.experiment}")
    began = time.perf_counter()
    resumable = complexity_run.checkpoints_cells(experiment)
    saved = errors.resumable(output_dir) if resumable else contextlib.nullcontext()
    with saved:
        # The gin-configured `run` (the plain function would see no bindings).
        gin.get_configurable("tfmeta.complexity.run")(output_dir, resume=args.resume)
    from tfmeta import atomic

    atomic.write_text(pathlib.Path(output_dir) / "operative_config.gin", gin.operative_config_str())
    print(f"\nDone in {time.perf_counter() - began:.0f} s; outputs in {output_dir}/ "
          "(results.json, summary.md, PNG, operative_config.gin)")
    return 0


def main(argv=None):
    """Bad input: one line on stderr, exit code 2; Ctrl-C: how to continue, 130 (tfmeta.cli.errors)."""
    from tfmeta.cli import errors

    return errors.run_tool(PROG, run, argv, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
