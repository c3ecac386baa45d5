"""Fine-tune held-out tasks from an exported initialization, and from a random one.

    python tools/finetune.py --init runs/quickstart/initialization --gin_file gin/digits.gin
    tfmeta-finetune --init runs/leap/initialization --gin_file gin/leap_omniglot.gin \\
        --gin_param "finetune.steps = 100"

The tasks are the held-out tasks of the gin file's `train.tasks` (the second
of a `(pretrain, heldout)` pair; the tasks themselves otherwise). Every task
is fine-tuned with plain Keras `fit` from a copy of the export
("meta-learned") and from the random initialization the training run started
from ("random init": `train.model` built with `train.seed`, or fresh weights
of the export's architecture if those differ), with the gin file's own
evaluation settings (`heldout_finetuning.steps`, `.learning_rate`,
`.batch_size`, `.seed`) unless `finetune.*` binds others, so the numbers
are the ones `tools/train.py` printed for the same gin file. The settings
used are printed first. Writes `results.json` (per-task and mean metrics:
training-loss and error AUC, held-out test error) and `curves.png`
(task-average curves) to `--output_dir` (default: next to the export,
`<init>/../finetune`).
"""

import argparse
import inspect
import json
import pathlib
import sys

import gin

from tfmeta.cli import errors, ginconfig, startup
from tfmeta.cli.report import LEARNED, RANDOM, comparison_lines

PROG = "tfmeta-finetune"


def finetune(init, output_dir, steps=None, learning_rate=None, batch_size=None, seed=None, num_tasks=None):
    """Fine-tune the held-out tasks of `train.tasks` from `init` and from a random init.

    `steps`, `learning_rate`, `batch_size` and `seed` left None are the gin
    config's `heldout_finetuning.*` (the training run's evaluation), else
    its defaults. `num_tasks` limits the held-out tasks to the first ones.
    Registered with gin as `tfmeta.finetune`.
    """
    from tfmeta import atomic, evaluation
    from tfmeta.export import load_initialization
    from tfmeta.finetune import plot_curves

    settings, source = _settings(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    heldout, random_start, start_note = _heldout_and_random_start()
    if num_tasks is not None:
        heldout = heldout.subset(range(min(num_tasks, heldout.num_tasks)))
    model = load_initialization(init, num_classes=heldout.num_classes)
    random_start, start_note = _random_start(random_start, start_note, model, settings["seed"])
    print(
        f"Fine-tuning {heldout.num_tasks} held-out tasks for {settings['steps']} steps each (SGD "
        f"{settings['learning_rate']}, batch {settings['batch_size']}, seed {settings['seed']}: "
        f"{source}) from {init} ({LEARNED}) and from {start_note} ({RANDOM}).",
        flush=True,
    )
    runs = {
        name: evaluation.finetune_every_task(m, heldout, **settings)
        for name, m in ((LEARNED, model), (RANDOM, random_start))
    }
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "init": str(init),
        "tasks": heldout.task_names,
        "settings": settings,
        **{name: {"mean": evaluation.summary(r), "per_task": [x.to_dict() for x in r]} for name, r in runs.items()},
    }
    atomic.write_text(output_dir / "results.json", json.dumps(results, indent=2))
    plot_curves(
        {name: evaluation.mean_curves(r) for name, r in runs.items()},
        output_dir / "curves.png",
        title=f"fine-tuning {heldout.num_tasks} held-out tasks",
    )
    return results


def _settings(**given):
    """The fine-tuning settings, and where they come from (for the printed line)."""
    from tfmeta import evaluation

    defaults = inspect.signature(evaluation.heldout_finetuning).parameters
    settings, overridden = {}, []
    for name, value in given.items():
        if value is not None:
            settings[name] = value
            overridden.append(f"finetune.{name}")
        else:
            settings[name] = ginconfig.query(f"heldout_finetuning.{name}", defaults[name].default)
    checked = evaluation.check_finetuning_settings(
        settings["steps"], settings["learning_rate"], settings["batch_size"],
        names={name.split(".")[1]: name for name in overridden},
    )
    settings.update(zip(("steps", "learning_rate", "batch_size"), checked))
    source = "as the training run's evaluation, heldout_finetuning"
    return settings, f"{', '.join(overridden)}; the rest {source}" if overridden else source


def _heldout_and_random_start():
    """The held-out tasks, and `train.model` as the training run built it (seeded by train.seed)."""
    import keras

    seed = ginconfig.query("train.seed", 0)
    keras.utils.set_random_seed(seed)
    # In the order of the training run (its gin call builds the tasks, then the model).
    tasks = gin.query_parameter("train.tasks").scoped_configurable_fn()
    model = ginconfig.query("train.model")
    random_start = model.scoped_configurable_fn() if hasattr(model, "scoped_configurable_fn") else None
    heldout = tasks[1] if isinstance(tasks, tuple) else tasks
    return heldout, random_start, f"the training run's random start (train.model, train.seed {seed})"


def _random_start(candidate, note, model, seed):
    """`candidate` if its weights have the export's shapes, else fresh weights of the export's architecture."""
    from tfmeta.finetune import random_initialization

    if candidate is not None and [w.shape for w in candidate.get_weights()] == [w.shape for w in model.get_weights()]:
        return candidate, note
    return random_initialization(model, seed=seed), f"fresh weights of the export's architecture (seed {seed})"


def parse_args(argv=None):
    """The command line of `tools/finetune.py` (no TensorFlow import: `--help` returns at once)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Bad input prints one line and exits 2; TFMETA_DEBUG=1 prints the traceback.",
    )
    parser.add_argument("--init", required=True, help="an export folder (tools/train.py's initialization/)")
    parser.add_argument("--gin_file", action="append", required=True, help="gin config(s) defining train.tasks")
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin bindings")
    parser.add_argument("--output_dir", default=None)
    startup.add_verbose_flag(parser)
    return parser.parse_args(argv)


def run(argv=None):
    """Parse the command line, configure gin, fine-tune; errors propagate (for tests)."""
    args = parse_args(argv)
    startup.import_tensorflow(args.verbose)
    import tfmeta.configurables  # noqa: F401  (registers everything with gin)

    files = ginconfig.load(args.gin_file, args.gin_param)
    ginconfig.check_required("train", ["tasks"], files)
    output_dir = args.output_dir or str(pathlib.Path(args.init).resolve().parent / "finetune")
    return gin.get_configurable("tfmeta.finetune")(args.init, output_dir), output_dir


def main(argv=None):
    """Command line entry: bad input prints one line and returns 2 (TFMETA_DEBUG=1: the traceback)."""
    try:
        results, output_dir = run(argv)
    except Exception as error:  # noqa: BLE001 - only bad input is reported in one line
        if not isinstance(error, errors.expected()):
            raise
        return errors.report(PROG, error)
    means = {name: results[name]["mean"] for name in (LEARNED, RANDOM)}
    print("\n".join(comparison_lines(means)))
    print(f"Wrote {output_dir}/results.json and curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
