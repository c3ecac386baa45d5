"""Meta-train an initialization, export it and evaluate it: the main job.

    python tools/train.py --gin_file gin/cts_synthetic.gin --output_dir runs/cts
    tfmeta-train --gin_file gin/leap_omniglot.gin --gin_param "train.meta_updates=100"

Everything is configured with gin (`gin/*.gin`); `train` below lists what a
config binds. Outputs in `--output_dir`: `logs/` (TensorBoard), `history.csv`,
`initialization/` (the export: `.keras` + SavedModel), `results.json`,
and `operative_config.gin` (every binding in force).
"""

import argparse
import json
import os
import pathlib
import sys
import time

import gin


@gin.configurable(module="tfmeta", denylist=["output_dir"])
def train(
    output_dir,
    tasks=gin.REQUIRED,
    model=gin.REQUIRED,
    learner=gin.REQUIRED,
    loss=gin.REQUIRED,
    inner_steps=gin.REQUIRED,
    meta_updates=gin.REQUIRED,
    tasks_per_batch=None,
    batch_size=1,
    steps_per_chunk=1,
    meta_optimizer=None,
    inner_optimizer=None,
    epochs=1,
    steps_per_execution=1,
    vectorize_tasks=False,
    jit_compile="auto",
    evaluation=None,
    overwrite=False,
    seed=0,
    verbose=1,
):
    """Meta-train `model`'s initialization on `tasks`, export it, evaluate it.

    Args:
        output_dir: where everything is written.
        tasks: a `TaskDistribution`, or a `(pretrain, heldout)` pair of them
            (the evaluation then uses the held-out tasks).
        model: the Keras model whose initialization is learned.
        learner: a meta-learner (`Leap()`, `Reptile()`, ...).
        loss: the task loss.
        inner_steps: K.
        meta_updates: how many meta-updates to run.
        tasks_per_batch, batch_size, steps_per_chunk: T, B and S of the task
            batches.
        meta_optimizer, inner_optimizer: Keras optimizers (default SGD 0.1).
        epochs: the meta-updates are split into this many Keras epochs (one
            progress bar and one TensorBoard point each).
        steps_per_execution, vectorize_tasks, jit_compile: see `MetaModel.compile`.
        evaluation: `evaluate(learned, baseline, tasks) -> dict` run after
            export (see `tfmeta.evaluation`); the baseline is the model as it
            was before meta-training (its random initialization).
        overwrite: replace an existing export in `output_dir`.
        seed: seeds Keras, NumPy, Python and the task stream.
        verbose: Keras verbosity (1: progress bar).

    Returns:
        A dict with the export path, the history and the evaluation.
    """
    import keras

    from tfmeta.export import export_initialization
    from tfmeta.meta_model import MetaModel

    output_dir = pathlib.Path(output_dir)
    export_path = output_dir / "initialization"
    if export_path.exists() and not overwrite:
        # Fail before hours of training, not after.
        raise FileExistsError(
            f"{export_path} already exists: pass --gin_param train.overwrite=True "
            "or choose another --output_dir."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    pretrain, heldout = tasks if isinstance(tasks, tuple) else (tasks, tasks)
    baseline = keras.models.clone_model(model)
    baseline.set_weights(model.get_weights())

    meta = MetaModel(model)
    meta.compile(
        optimizer=meta_optimizer or keras.optimizers.SGD(0.1),
        inner_optimizer=inner_optimizer or keras.optimizers.SGD(0.1),
        loss=loss,
        learner=learner,
        inner_steps=inner_steps,
        steps_per_execution=steps_per_execution,
        vectorize_tasks=vectorize_tasks,
        jit_compile=jit_compile,
    )
    dataset = pretrain.as_dataset(
        tasks_per_batch=tasks_per_batch or pretrain.num_tasks,
        inner_steps=inner_steps,
        batch_size=batch_size,
        steps_per_chunk=steps_per_chunk,
        seed=seed,
    )
    total = meta.steps_for(meta_updates, steps_per_chunk)
    if total % epochs:
        raise ValueError(
            f"{meta_updates} meta-updates take {total} train steps, which do not "
            f"split into epochs={epochs}: choose a divisor of {total}."
        )
    began = time.perf_counter()
    history = meta.fit(
        dataset,
        epochs=epochs,
        steps_per_epoch=total // epochs,
        verbose=verbose,
        callbacks=[
            keras.callbacks.TensorBoard(str(output_dir / "logs")),
            keras.callbacks.CSVLogger(str(output_dir / "history.csv")),
        ],
    )
    seconds = time.perf_counter() - began
    export_initialization(
        model,
        export_path,
        overwrite=overwrite,
        metadata={"learner": repr(learner), "meta_updates": int(meta.meta_updates.numpy())},
    )
    results = {
        "export": str(export_path),
        "meta_updates": int(meta.meta_updates.numpy()),
        "meta_training_seconds": seconds,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    if evaluation is not None:
        results["evaluation"] = evaluation(model, baseline, heldout)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "operative_config.gin").write_text(gin.operative_config_str())
    return results


def _report(results):
    lines = [
        f"Meta-training: {results['meta_updates']} meta-updates in "
        f"{results['meta_training_seconds']:.1f} s.",
        f"Initialization exported to {results['export']} "
        "(model.keras + saved_model/; load with tfmeta.export.load_initialization).",
    ]
    for name, metrics in results.get("evaluation", {}).items():
        shown = ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_std")
        )
        lines.append(f"  {name:>13}: {shown}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", required=True, help="gin config file(s)")
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin bindings")
    parser.add_argument("--output_dir", default=None, help="default: runs/<first gin file name>")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import tfmeta.configurables  # noqa: F401  (registers everything with gin)

    repo_gin = pathlib.Path(__file__).resolve().parents[2] / "gin"
    if repo_gin.is_dir():
        gin.add_config_file_search_path(str(repo_gin))
    gin.parse_config_files_and_bindings(args.gin_file, args.gin_param)
    output_dir = args.output_dir or os.path.join("runs", pathlib.Path(args.gin_file[0]).stem)
    results = train(output_dir)
    print(_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
