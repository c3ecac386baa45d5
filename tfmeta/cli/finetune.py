"""Fine-tune held-out tasks from an exported initialization, and from a random one.

    python tools/finetune.py --init runs/quickstart/initialization --gin_file gin/digits.gin
    tfmeta-finetune --init runs/leap/initialization --gin_file gin/leap_omniglot.gin \\
        --gin_param "finetune.steps = 100"

The tasks are the held-out tasks of the gin file's `train.tasks` (the second
of a `(pretrain, heldout)` pair; the tasks themselves otherwise). Every task
is fine-tuned with plain Keras `fit` from a copy of the initialization and
from a random initialization of the same architecture (no pretraining).
Writes `results.json` (per-task and mean metrics: training-loss and error
AUC, held-out test error) and `curves.png` (task-average curves) to
`--output_dir` (default: next to the export, `<init>/../finetune`).
"""

import argparse
import json
import os
import pathlib
import sys

import gin


@gin.configurable(module="tfmeta", denylist=["init", "output_dir"])
def finetune(init, output_dir, steps=100, learning_rate=0.1, batch_size=20, seed=0, num_tasks=None):
    """Fine-tune the held-out tasks of `train.tasks` from `init` and from a random init."""
    from tfmeta import evaluation
    from tfmeta.export import load_initialization
    from tfmeta.finetune import plot_curves, random_initialization

    tasks = gin.query_parameter("train.tasks").scoped_configurable_fn()
    heldout = tasks[1] if isinstance(tasks, tuple) else tasks
    if num_tasks is not None:
        heldout = heldout.subset(range(min(num_tasks, heldout.num_tasks)))
    model = load_initialization(init, num_classes=heldout.num_classes)
    candidates = {"initialization": model, "random init": random_initialization(model, seed=seed)}
    runs = {
        name: evaluation.finetune_every_task(m, heldout, steps, learning_rate, batch_size, seed)
        for name, m in candidates.items()
    }
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "init": str(init),
        "tasks": heldout.task_names,
        **{
            name: {"mean": evaluation.summary(r), "per_task": [x.to_dict() for x in r]}
            for name, r in runs.items()
        },
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(
        {name: evaluation.mean_curves(r) for name, r in runs.items()},
        output_dir / "curves.png",
        title=f"fine-tuning {heldout.num_tasks} held-out tasks",
    )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="an export folder (tools/train.py's initialization/)")
    parser.add_argument("--gin_file", action="append", required=True, help="gin config(s) defining train.tasks")
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin bindings")
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import tfmeta.cli.train  # noqa: F401  (the gin files bind `train`)
    import tfmeta.configurables  # noqa: F401

    gin.parse_config_files_and_bindings(args.gin_file, args.gin_param)
    output_dir = args.output_dir or str(pathlib.Path(args.init).resolve().parent / "finetune")
    results = finetune(args.init, output_dir)
    for name in ("initialization", "random init"):
        mean = results[name]["mean"]
        print(
            f"{name:>14}: loss AUC {mean['loss_auc']:.4g} ± {mean['loss_auc_std']:.2g}, "
            f"error AUC {mean['error_auc']:.4g}, test error {mean['test_error']:.4g} "
            f"({mean['tasks']} tasks)"
        )
    print(f"Wrote {output_dir}/results.json and curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
