"""Meta-train an initialization, export it and evaluate it: the main job.

    python tools/train.py --gin_file gin/cts_synthetic.gin --output_dir runs/cts
    tfmeta-train --gin_file gin/leap_omniglot.gin --gin_param "train.meta_updates=100"

    python tools/train.py --gin_file gin/digits.gin --output_dir runs/digits --resume

Everything is configured with gin (`gin/*.gin`): `tfmeta.cli.settings`
(`Parts` and `Settings`) lists what a config binds as `train.<name>`, and
`tfmeta.cli.job.train` (gin name `train`) runs the job's steps.
Outputs in `--output_dir`: `logs/` (TensorBoard), `history.csv`,
`checkpoints/` (the newest complete checkpoints, see `tfmeta.checkpoint`),
`initialization/` (the export: `.keras` + SavedModel), `operative_config.gin`
(every binding in force) and, written last, `results.json`.

`--resume` continues a killed run from its newest checkpoint and ends with
the same phi as an uninterrupted run (docs/resilience.md); run the same
command line with `--resume` until it exits 0 (a finished run says so).
Ctrl-C stops at the next train step with a checkpoint and prints the
command that resumes. `train.overwrite=True` starts afresh in a folder that
holds an earlier run.

`train.strategy = "mirrored"` spreads each task batch over the local GPUs,
`"multi_worker"` over the machines of `TF_CONFIG` (run the same command on
every worker; only the chief writes the outputs): docs/performance.md.

Bad input ends in one line naming the problem and the fix, exit code 2,
before any training; `--verbose` shows TensorFlow's start-up messages and
`TFMETA_DEBUG=1` also the traceback of an error. This module imports
TensorFlow only after parsing the command line (`--help` is instant).
"""

import argparse
import inspect
import os
import pathlib
import re
import sys

import gin

from tfmeta.cli import errors, ginconfig, startup

PROG = "tfmeta-train"


def parse_args(argv=None):
    """The command line of `tools/train.py` (no TensorFlow import: `--help` returns at once)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Bad input prints one line and exits 2; TFMETA_DEBUG=1 prints the traceback.",
    )
    parser.add_argument("--gin_file", action="append", required=True, help="gin config file(s), e.g. gin/digits.gin")
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin bindings, e.g. 'train.meta_updates = 30'")
    parser.add_argument("--output_dir", default=None, help="default: runs/<first gin file name>")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output_dir from its newest checkpoint (a fresh start "
        "if it has none): a killed run resumed this way ends as if never interrupted",
    )
    startup.add_verbose_flag(parser)
    return parser.parse_args(argv)


def train(output_dir, resume=False):
    """Run the gin-configured `tfmeta.train` job (`tfmeta.cli.job.train`) in `output_dir`.

    Gin must already hold the configuration (tfmeta.configurables imported).
    The bindings in force are handed over for `--resume` to compare, and
    `operative_config.gin` is written from gin's record of what was used.

    Example::

        gin.parse_config_files_and_bindings(["gin/digits.gin"], [])
        results = train("runs/digits")
    """
    job = gin.get_configurable("tfmeta.train")
    return job(
        output_dir, resume=resume, bindings=ginconfig.bindings(), operative_config=gin.operative_config_str
    )


def _required_parameters():
    from tfmeta.cli import job

    parameters = inspect.signature(job.train).parameters.values()
    return [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name != "output_dir"]


def _prepare_process():
    """Create a named strategy and seed, before gin builds the model (on the `train` call)."""
    import keras

    from tfmeta import distribute

    strategy = ginconfig.query("train.strategy", "default")
    if isinstance(strategy, str):
        # A multi-worker strategy must exist before TensorFlow runs any op
        # (a strategy object from gin, `@MirroredStrategy()`, is built by gin).
        distribute.get_strategy(strategy)
    # So that the random initialization gin builds is the seed's too.
    keras.utils.set_random_seed(ginconfig.query("train.seed", 0))


def run(argv=None):
    """Parse the command line, configure gin, train; errors propagate (for tests)."""
    args = parse_args(argv)
    startup.import_tensorflow(args.verbose)
    import tfmeta.configurables  # noqa: F401  (registers everything with gin)

    files = ginconfig.load(args.gin_file, args.gin_param)
    ginconfig.check_required("train", _required_parameters(), files)
    _prepare_process()
    output_dir = args.output_dir or os.path.join("runs", pathlib.Path(args.gin_file[0]).stem)
    return train(output_dir, resume=args.resume)


_OVERWRITE = re.compile(r"^\s*train\.overwrite\s*=")


def resume_command(argv):
    """The command line that continues the run of `argv`: the same, with --resume, without overwrite.

    `errors.continue_command` with train's own rule: a `train.overwrite`
    binding is dropped too (it would start over).

    Example::

        resume_command(["--gin_file", "gin/digits.gin", "--gin_param", "train.overwrite = True"])
        # "python tools/train.py --gin_file gin/digits.gin --resume"
    """
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--gin_param" and i + 1 < len(argv) and _OVERWRITE.match(argv[i + 1]):
            skip = True
            continue
        if arg.startswith("--gin_param=") and _OVERWRITE.match(arg.split("=", 1)[1]):
            continue
        kept.append(arg)
    return errors.continue_command(kept, prog=PROG)[0]


def _stopped_line(stop, argv):
    if isinstance(stop, errors.Interrupted):
        return f"{stop.message}: continue with: {resume_command(argv)}"
    return "aborted; --resume continues from the newest checkpoint, if any."


def _train_and_summarise(argv):
    from tfmeta.cli.report import training_summary

    print(training_summary(run(argv)))
    return 0


def main(argv=None):
    """Command line entry: bad input prints one line and returns 2 (TFMETA_DEBUG=1: the traceback); Ctrl-C 130."""
    return errors.run_tool(PROG, _train_and_summarise, argv, stopped=_stopped_line)


if __name__ == "__main__":
    sys.exit(main())
