"""Meta-train an initialization, export it and evaluate it: the main job.

    python tools/train.py --gin_file gin/cts_synthetic.gin --output_dir runs/cts
    tfmeta-train --gin_file gin/leap_omniglot.gin --gin_param "train.meta_updates=100"

    python tools/train.py --gin_file gin/digits.gin --output_dir runs/digits --resume

Everything is configured with gin (`gin/*.gin`); `train` below lists what a
config binds. Outputs in `--output_dir`: `logs/` (TensorBoard), `history.csv`,
`checkpoints/` (the newest complete checkpoints, see `tfmeta.checkpoint`),
`initialization/` (the export: `.keras` + SavedModel), `results.json`,
and `operative_config.gin` (every binding in force).

`--resume` continues a killed run from its newest checkpoint and ends with
the same phi as an uninterrupted run (docs/resilience.md); run the same
command line with `--resume` until it exits 0.

`train.strategy = "mirrored"` spreads each task batch over the local GPUs,
`"multi_worker"` over the machines of `TF_CONFIG` (run the same command on
every worker; only the chief writes the outputs): docs/performance.md.
"""

import argparse
import contextlib
import csv
import json
import math
import os
import pathlib
import sys
import time

import gin
import numpy as np


@gin.configurable(module="tfmeta", denylist=["output_dir", "resume"])
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
    checkpoint_every=None,
    checkpoint_seconds=300.0,
    keep_checkpoints=2,
    deterministic=True,
    resume=False,
    strategy="default",
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
            `steps_per_execution` is lowered to a divisor of the steps per
            epoch if needed (Keras would otherwise run extra steps).
        evaluation: `evaluate(learned, baseline, tasks) -> dict` run after
            export (see `tfmeta.evaluation`); the baseline is the model as it
            was before meta-training (its random initialization).
        overwrite: replace an existing export in `output_dir`.
        seed: seeds Keras, NumPy, Python and the task stream (`main` seeds
            before gin builds the model, so its random init is seeded too).
        verbose: Keras verbosity (1: progress bar).
        checkpoint_every: also checkpoint every this many train steps
            (checkpoints are always written at the end of every epoch and
            every `checkpoint_seconds`); see `tfmeta.checkpoint`.
        checkpoint_seconds: checkpoint at least this often (wall clock), or None.
        keep_checkpoints: complete checkpoints kept in `output_dir/checkpoints`.
        deterministic: `tf.config.experimental.enable_op_determinism()`, so
            the same seed gives the same phi run to run (see docs/resilience.md).
        strategy: `"default"` (one device), `"mirrored"` (the tasks of each
            batch split over the local GPUs) or `"multi_worker"` (over the
            workers of `TF_CONFIG`), or a `tf.distribute.Strategy`; see
            `tfmeta.distribute`. tasks_per_batch must be a multiple of the
            number of replicas. Only the chief writes logs, the export,
            results and `checkpoints/`; every other worker checkpoints its
            own tasks' states in `workers/worker-<i>/checkpoints` (at the
            same steps: `checkpoint_seconds` is ignored with several workers).
        resume: continue from the newest checkpoint in `output_dir/checkpoints`
            (`--resume`; a fresh start if there is none). The task stream
            restarts at the checkpoint's train step, so the resumed run ends
            with the phi of an uninterrupted one.

    Returns:
        A dict with the export path, the history and the evaluation.
    """
    import keras

    from tfmeta import distribute, validation
    from tfmeta.checkpoint import MetaCheckpoint, list_checkpoints, resumable_fit
    from tfmeta.export import export_initialization
    from tfmeta.meta_model import MetaModel

    # Cheap checks first: a wrong setting must cost seconds, not a run.
    inner_steps = validation.check_positive_int(
        "train.inner_steps", inner_steps, "set train.inner_steps (K, the inner trajectory length) >= 1"
    )
    meta_updates = validation.check_positive_int("train.meta_updates", meta_updates)
    batch_size = validation.check_positive_int("train.batch_size", batch_size)
    steps_per_chunk = validation.check_positive_int(
        "train.steps_per_chunk", steps_per_chunk, "set train.steps_per_chunk to a divisor of train.inner_steps"
    )
    epochs = validation.check_positive_int("train.epochs", epochs)
    steps_per_execution = validation.check_positive_int("train.steps_per_execution", steps_per_execution)
    if tasks_per_batch is not None:
        tasks_per_batch = validation.check_positive_int(
            "train.tasks_per_batch", tasks_per_batch, "set train.tasks_per_batch (T) >= 1, or None for all tasks"
        )
    validation.check_learning_rate(meta_optimizer, "meta_optimizer", "meta/SGD.learning_rate (train.meta_optimizer)")
    validation.check_learning_rate(inner_optimizer, "inner_optimizer", "inner/SGD.learning_rate (train.inner_optimizer)")
    strategy = distribute.get_strategy(strategy)
    distribute.check_jit_compile(jit_compile, strategy)
    chief = distribute.is_chief(strategy)
    if steps_per_execution > 1 and distribute.uses_collectives(strategy):
        print(
            f"tfmeta-train: steps_per_execution={steps_per_execution} -> 1 under "
            f"{type(strategy).__name__} (see tfmeta.distribute.uses_collectives).",
            file=sys.stderr,
        )
        steps_per_execution = 1

    output_dir = pathlib.Path(output_dir)
    export_path = output_dir / "initialization"
    checkpoint_dir = output_dir / "checkpoints"
    multi_worker = distribute.worker_count(strategy) > 1
    if not chief:
        # Every worker checkpoints at the same steps (reading Keras' metrics
        # is a collective, and each worker holds its own tasks' states);
        # the others write only their own task state, under workers/.
        checkpoint_dir = output_dir / "workers" / f"worker-{distribute.worker_index(strategy)}" / "checkpoints"
    if export_path.exists() and not (overwrite or resume):
        # Fail before hours of training, not after.
        raise FileExistsError(
            f"{export_path} already exists: pass --gin_param train.overwrite=True "
            "or choose another --output_dir."
        )
    if list_checkpoints(checkpoint_dir) and not resume:
        raise FileExistsError(
            f"{checkpoint_dir} holds checkpoints of an earlier run: pass --resume to "
            "continue it, or choose another --output_dir (or delete the folder)."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    with _op_determinism(deterministic):
        pretrain, heldout = tasks if isinstance(tasks, tuple) else (tasks, tasks)
        num_tasks = getattr(pretrain, "num_tasks", None)
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(
                f"the task distribution {pretrain!r} has no tasks: give it at least "
                "train.tasks_per_batch tasks."
            )
        baseline = keras.models.clone_model(model)
        baseline.set_weights(model.get_weights())

        # phi must live in the strategy (gin built the model before).
        model = distribute.in_scope(model, strategy)
        with strategy.scope():
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
        tasks_per_batch = tasks_per_batch or num_tasks

        def make_dataset(start=0):
            return pretrain.as_dataset(
                tasks_per_batch=tasks_per_batch,
                inner_steps=inner_steps,
                batch_size=batch_size,
                steps_per_chunk=steps_per_chunk,
                seed=seed,
                start=start,
            )

        # The task batches against the model, before any train step.
        first = make_dataset(0)
        x_spec, y_spec = first.element_spec
        validation.check_task_batch(model, x_spec.shape, y_spec.shape)
        classes = getattr(pretrain, "num_classes", None)
        _, y0 = next(iter(first.take(1)))
        labels = y0.numpy()
        if classes:
            labels = np.append(labels.ravel(), [0, classes - 1]).astype(labels.dtype)
        validation.check_labels(model, labels, meta.task_loss)

        total = meta.steps_for(meta_updates, steps_per_chunk)
        if total % epochs:
            raise ValueError(
                f"{meta_updates} meta-updates take {total} train steps, which do not "
                f"split into epochs={epochs}: choose a divisor of {total}."
            )
        per_epoch = total // epochs
        if per_epoch % meta.steps_per_execution:
            # Keras runs whole executions: the last one of an epoch would run
            # steps past the epoch's end (and past the requested meta-updates).
            meta.steps_per_execution = math.gcd(per_epoch, meta.steps_per_execution)

        replicas = meta.distribute_strategy.num_replicas_in_sync
        shape = (x_spec.shape[0] // replicas, *x_spec.shape[1:])
        checkpoint = MetaCheckpoint(
            checkpoint_dir,
            every_steps=checkpoint_every,
            # Wall-clock triggers would differ between workers.
            every_seconds=None if multi_worker else checkpoint_seconds,
            keep=keep_checkpoints,
            metadata={
                "seed": seed,
                "tasks_per_batch": tasks_per_batch,
                "batch_size": batch_size,
                "steps_per_chunk": steps_per_chunk,
                "inner_steps": inner_steps,
                "learner": repr(learner),
            },
        )
        with meta.distribute_strategy.scope():
            meta.build(shape)
        start = checkpoint.restore(meta, shape) if resume else 0
        if start > total:
            raise ValueError(
                f"the checkpoint in {checkpoint_dir} is at train step {start}, past this "
                f"run's {total} steps ({meta_updates} meta-updates): raise train.meta_updates "
                "or start a new run."
            )
        history_csv = output_dir / "history.csv"
        if chief:
            _keep_history_before(history_csv, start // per_epoch if start else 0)

        began = time.perf_counter()
        history = resumable_fit(
            meta,
            make_dataset,
            total_steps=total,
            epochs=epochs,
            start=start,
            verbose=verbose if chief else 0,
            # Other workers train alongside the chief and write only checkpoints.
            callbacks=[
                keras.callbacks.TensorBoard(str(output_dir / "logs")),
                keras.callbacks.CSVLogger(str(history_csv), append=True),
                checkpoint,
            ] if chief else [checkpoint],
        )
        seconds = time.perf_counter() - began
        if not chief:
            return {
                "export": None,
                "worker": distribute.worker_index(strategy),
                "meta_updates": int(meta.meta_updates.numpy()),
                "meta_training_seconds": seconds,
            }
        if start:
            history = _read_history(history_csv)
        export_initialization(
            model,
            export_path,
            overwrite=overwrite or resume,
            metadata={"learner": repr(learner), "meta_updates": int(meta.meta_updates.numpy())},
        )
        results = {
            "export": str(export_path),
            "meta_updates": int(meta.meta_updates.numpy()),
            "meta_training_seconds": seconds,
            "resumed_from_step": start,
            "train_steps": total,
            "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        }
        if evaluation is not None:
            results["evaluation"] = evaluation(model, baseline, heldout)
        _write_atomic(output_dir / "results.json", json.dumps(results, indent=2))
        _write_atomic(output_dir / "operative_config.gin", gin.operative_config_str())
        return results


@contextlib.contextmanager
def _op_determinism(enabled):
    """`tf.config.experimental.enable_op_determinism()` for the block only.

    TensorFlow has no public switch back; the private one is used when it
    exists, so that calling `train` in a test or notebook does not change
    the rest of the process.
    """
    import tensorflow as tf

    if not enabled:
        yield
        return
    try:
        from tensorflow.python.framework import config as tf_config

        was = tf_config.is_op_determinism_enabled()
    except (ImportError, AttributeError):
        tf_config, was = None, True
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was:
            tf_config.disable_op_determinism()


def _keep_history_before(path, epoch):
    """Drop history.csv rows of epochs >= `epoch` (all of it for a fresh run)."""
    if epoch <= 0:
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [r for r in rows[1:] if r and int(float(r[0])) < epoch]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(kept)


def _read_history(path):
    history = {}
    if path.exists():
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    try:
                        number = float(value)
                    except (TypeError, ValueError):  # Keras writes "NA" for absent val_ columns
                        continue
                    if key != "epoch":
                        history.setdefault(key, []).append(number)
    return history


def _write_atomic(path, text):
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _report(results):
    lines = [
        f"Meta-training: {results['meta_updates']} meta-updates in "
        f"{results['meta_training_seconds']:.1f} s.",
        f"Initialization exported to {results['export']} (model.keras + saved_model/; "
        "load it with tfmeta.export.load_initialization).",
    ]
    evaluation = results.get("evaluation", {})
    for name, metrics in evaluation.items():
        shown = ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_std")
        )
        lines.append(f"  {name:>13}: {shown}")
    learned, random = evaluation.get("meta-learned"), evaluation.get("random init")
    if learned and random:
        metric = next(k for k, v in learned.items() if isinstance(v, float))
        ratio = random[metric] / learned[metric] if learned[metric] else float("inf")
        lines.append(
            f"The meta-learned initialization's {metric} is {ratio:.1f}x lower than a random "
            "initialization's." if ratio >= 1 else
            f"The meta-learned initialization's {metric} is {1 / ratio:.1f}x HIGHER than a random "
            "initialization's."
        )
    return "\n".join(lines)


def run(argv=None):
    """Parse the command line, configure gin, train; errors propagate (for tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", required=True, help="gin config file(s)")
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin bindings")
    parser.add_argument("--output_dir", default=None, help="default: runs/<first gin file name>")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output_dir from its newest checkpoint (a fresh start "
        "if it has none): a killed run resumed this way ends as if never interrupted",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras

    import tfmeta.configurables  # noqa: F401  (registers everything with gin)
    from tfmeta import validation

    repo_gin = pathlib.Path(__file__).resolve().parents[2] / "gin"
    if repo_gin.is_dir():
        gin.add_config_file_search_path(str(repo_gin))
    try:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin_param)
    except (ValueError, OSError) as error:
        explained = validation.explain_gin_error(error, args.gin_param)
        if explained is None:
            raise
        raise explained from error
    # A multi-worker strategy must exist before TensorFlow runs any op (so
    # before gin builds the model below).
    from tfmeta import distribute

    try:
        strategy = gin.query_parameter("train.strategy")
    except ValueError:  # not bound
        strategy = "default"
    distribute.get_strategy(strategy)
    # Seed before gin builds the model (and the tasks) on the call below, so
    # that the random initialization is the seed's too.
    try:
        seed = gin.query_parameter("train.seed")
    except ValueError:
        seed = 0
    keras.utils.set_random_seed(seed)
    output_dir = args.output_dir or os.path.join("runs", pathlib.Path(args.gin_file[0]).stem)
    return train(output_dir, resume=args.resume)


def main(argv=None):
    """Command line entry: a setup error prints one line (TFMETA_DEBUG=1: the traceback)."""
    from tfmeta.checkpoint import CheckpointError
    from tfmeta.divergence import DivergenceError

    try:
        results = run(argv)
    except (
        ValueError, FileExistsError, FileNotFoundError, CheckpointError, DivergenceError
    ) as error:
        if os.environ.get("TFMETA_DEBUG"):
            raise
        # One line: gin appends the call site on a line of its own.
        message = str(error).splitlines()[0] if str(error) else ""
        print(f"tfmeta-train: error: {type(error).__name__}: {message}", file=sys.stderr)
        print("(set TFMETA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    if results.get("export") is None and "worker" in results:
        print(
            f"Worker {results['worker']}: {results['meta_updates']} meta-updates in "
            f"{results['meta_training_seconds']:.1f} s; the chief wrote the outputs."
        )
        return 0
    print(_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
