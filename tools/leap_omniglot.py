#!/usr/bin/env python
"""Leap's Omniglot experiment (figure 2), resumable cell by cell.

    python tools/leap_omniglot.py [--alphabets 1 3 5 10 15 20 25] [--seeds 0 1 2]
                                  [--methods leap reptile fomaml multi-headed "no pretraining"]
                                  [--meta_updates 80] [--inner_steps 50] [--tasks_per_batch 5]
                                  [--filters 16] [--stages 0.25 0.5]
                                  [--output_dir runs/leap_omniglot] [--resume | --overwrite]
                                  [--figure_right PNG] [--figure_left PNG] [--plot_only]

For each seed, number of pretraining alphabets and method: pretrain (Leap,
Reptile, FOMAML with gin/<method>_omniglot.gin and these sizes bound over
it; the multi-headed baseline with `tfmeta.multitask.MultiTaskModel`; or
nothing) and fine-tune on the seed's 10 held-out alphabets for 100 steps
(`tfmeta.experiments.leap_omniglot`). Each finished cell goes to
<output_dir>/results.json at once; `--resume` continues a killed run (a
meta-learner killed mid-cell from its last checkpoint). Prints the Markdown
table of docs/results.md; `--figure_right` draws the held-out loss AUC
against the number of alphabets, `--figure_left` Leap's fine-tuning curves
at 0 %, the `--stages` and 100 % of meta-training (at the largest
--alphabets); `--plot_only` redraws them from results.json.
"""

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

REPO = pathlib.Path(__file__).resolve().parents[1]
PROG = "leap_omniglot.py"
HELP = {
    "meta_updates": "meta-updates per meta-learner run (the paper: 1000)",
    "inner_steps": "K, inner steps per trajectory (the paper: 100)",
    "tasks_per_batch": "tasks per meta-batch, at most the alphabets (the paper: 20)",
    "filters": "convnet width (the paper: 64)",
    "num_heldout": "held-out alphabets (the paper: 10)",
    "finetune_steps": "fine-tuning steps per held-out alphabet",
    "finetune_lr": "fine-tuning SGD learning rate",
    "batch_size": "examples per task per step",
    "multihead_lr": "multi-headed baseline's SGD rate per task-step",
}


def train_learner(gin_file, bindings, run_dir, resume):
    """Meta-train with gin/<gin_file> under `bindings` (the `tfmeta.train` job); the learned model."""
    import gin
    import keras

    import tfmeta.configurables  # noqa: F401  (registers the job and its parts)
    from tfmeta.cli.train import train

    gin.clear_config()
    gin.parse_config_files_and_bindings([str(REPO / "gin" / gin_file)], bindings)
    try:
        result = train(run_dir, resume=resume)
    finally:
        gin.clear_config()
    return keras.models.load_model(pathlib.Path(result["export"]) / "model.keras")


def parse_args(argv):
    from tfmeta.experiments import leap_omniglot as experiment

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphabets", type=int, nargs="+", default=list(experiment.ALPHABETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(experiment.METHODS), choices=experiment.METHODS)
    for field in dataclasses.fields(experiment.Config):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default,
                            help=f"{HELP[field.name]} (default {field.default})")
    parser.add_argument("--stages", type=float, nargs="*", default=[0.25, 0.5],
                        help="fractions of the meta-updates at which Leap is also trained, at the "
                             "largest --alphabets, for --figure_left (none: no extra cells)")
    parser.add_argument("--output_dir", default="runs/leap_omniglot")
    parser.add_argument("--resume", action="store_true", help="keep the finished cells of results.json")
    parser.add_argument("--overwrite", action="store_true", help="start over, replacing results.json")
    parser.add_argument("--figure_right", help="write figure 2 (right), loss AUC vs alphabets, here")
    parser.add_argument("--figure_left", help="write figure 2 (left), Leap's curves by stage, here")
    parser.add_argument("--plot_only", action="store_true",
                        help="train nothing: the table and figures from results.json")
    return parser.parse_args(argv)


def run(argv):
    """The command line `argv`; errors propagate (`main` reports them)."""
    from tfmeta.cli import errors
    from tfmeta.experiments import leap_omniglot as experiment

    args = parse_args(argv)
    out = pathlib.Path(args.output_dir)
    if args.plot_only:
        results = experiment.load_results(out / "results.json")
    else:
        config = experiment.Config(**{f.name: getattr(args, f.name)
                                      for f in dataclasses.fields(experiment.Config)})
        cells = experiment.plan(args.methods, args.alphabets, args.seeds, args.stages)
        # A meta-learner stopped by Ctrl-C has just written a checkpoint; --resume continues it.
        with errors.resumable(out):
            results = experiment.run(config, cells, out, train_learner,
                                     resume=args.resume, overwrite=args.overwrite)
    if args.figure_right:
        print(f"Wrote {experiment.plot_auc(results, args.figure_right)}")
    if args.figure_left:
        print(f"Wrote {experiment.plot_stages(results, args.figure_left)}")
    print()
    print(experiment.table(results))
    return 0


def main(argv=None):
    """Bad input: one line on stderr, exit code 2; Ctrl-C: how to continue, 130 (tfmeta.cli.errors)."""
    from tfmeta.cli import errors

    return errors.run_tool(PROG, run, argv, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
