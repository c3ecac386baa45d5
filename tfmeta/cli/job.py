"""The training job of `tools/train.py`, as named steps: configure, build, resume, fit, export, evaluate.

`train(output_dir, tasks=..., model=..., ...)` is registered with gin as
`tfmeta.train` (in `tfmeta.configurables`) and runs the steps in order:

1. `configure` checks every setting before anything is built (a wrong
   setting costs seconds, not a run) and returns them as `Settings`;
2. `TrainingJob.build` wraps the model in a compiled `MetaModel` and checks
   the task stream, the labels and the evaluation's settings against it;
3. `TrainingJob.resume` restores the newest checkpoint (`--resume`) once the
   configuration is the one the checkpoint was written with;
4. `TrainingJob.fit` meta-trains (Ctrl-C stops at the next train step with
   a checkpoint, `tfmeta.cli.interrupt`);
5. `TrainingJob.export` writes the initialization (`tfmeta.export`);
6. `TrainingJob.evaluate` evaluates it and writes `operative_config.gin`
   and, last, `results.json`.

Example (what `train` does, step by step)::

    settings = configure(parts, inner_steps=20, meta_updates=300, ...)
    job = TrainingJob("runs/x", settings, parts)
    job.build()
    start = job.resume()
    with job.folder.claimed(replace=settings.overwrite):
        history, seconds = job.fit(start)
    job.export()
    results = job.evaluate(history, seconds, start)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from typing import Any, Callable

import keras
import numpy as np

from tfmeta import atomic, distribute, validation
from tfmeta.checkpoint import (
    IncompatibleCheckpointError,
    MetaCheckpoint,
    latest_checkpoint,
    resumable_fit,
)
from tfmeta.cli.history import keep_epochs_before, read_history
from tfmeta.cli.interrupt import StopOnInterrupt, stopping_on_interrupt
from tfmeta.cli.rundir import RunDir
from tfmeta.export import export_initialization
from tfmeta.meta_model import MetaModel

__all__ = ["Parts", "Settings", "TrainingJob", "configure", "train"]

#: Bindings a resumed run may change: how it logs, checkpoints, compiles and is
#: evaluated. Everything else must be the run's own, its length included
#: (other meta_updates or steps_per_execution would move its epoch and
#: execution boundaries away from the checkpoint's).
RESUMABLE_CHANGES = (
    "train.verbose", "train.evaluation", "train.checkpoint_every", "train.checkpoint_seconds",
    "train.keep_checkpoints", "train.overwrite", "train.jit_compile", "train.deterministic",
)
RESUMABLE_PREFIXES = ("heldout_finetuning.", "himmelblau_adaptation.", "finetune.")


@dataclasses.dataclass
class Parts:
    """The objects gin builds for a run: tasks (or a `(pretrain, heldout)` pair), model, ..."""

    tasks: Any
    model: Any
    learner: Any
    loss: Any
    meta_optimizer: Any = None
    inner_optimizer: Any = None
    evaluation: Callable | None = None


@dataclasses.dataclass
class Settings:
    """A run's checked settings (see `train` for each)."""

    inner_steps: int
    meta_updates: int
    tasks_per_batch: int | None
    batch_size: int
    steps_per_chunk: int
    epochs: int
    steps_per_execution: int
    vectorize_tasks: bool
    jit_compile: Any
    overwrite: bool
    seed: int
    verbose: int
    checkpoint_every: int | None
    checkpoint_seconds: float | None
    keep_checkpoints: int
    deterministic: bool
    resume: bool
    strategy: Any
    bindings: dict | None = None
    operative_config: Callable[[], str] | None = None

    @property
    def chief(self):
        return distribute.is_chief(self.strategy)

    @property
    def workers(self):
        return distribute.worker_count(self.strategy)


def train(
    output_dir, tasks, model, learner, loss, inner_steps, meta_updates, tasks_per_batch=None,
    batch_size=1, steps_per_chunk=1, meta_optimizer=None, inner_optimizer=None, epochs=1,
    steps_per_execution=1, vectorize_tasks=False, jit_compile="auto", evaluation=None,
    overwrite=False, seed=0, verbose=1, checkpoint_every=None, checkpoint_seconds=300.0,
    keep_checkpoints=2, deterministic=True, resume=False, strategy="default", bindings=None,
    operative_config=None,
):
    """Meta-train `model`'s initialization on `tasks`, export it, evaluate it.

    Args:
        output_dir: where everything is written (`tfmeta.cli.rundir`).
        tasks: a `TaskDistribution`, or a `(pretrain, heldout)` pair of them
            (the evaluation then uses the held-out tasks).
        model: the Keras model whose initialization is learned.
        learner: a meta-learner (`Leap()`, `Reptile()`, ...).
        loss: the task loss.
        inner_steps: K.
        meta_updates: how many meta-updates to run.
        tasks_per_batch, batch_size, steps_per_chunk: T, B and S of the task
            batches (T None: all tasks).
        meta_optimizer, inner_optimizer: Keras optimizers (default SGD 0.1).
        epochs: the meta-updates are split into this many Keras epochs (one
            progress bar, history row and TensorBoard point each).
        steps_per_execution, vectorize_tasks, jit_compile: see `MetaModel.compile`.
            `steps_per_execution` is lowered to a divisor of the steps per
            epoch if needed (Keras would otherwise run extra steps).
        evaluation: `evaluate(learned, baseline, tasks) -> dict` run after
            export (see `tfmeta.evaluation`); the baseline is the model as it
            was before meta-training (its random initialization).
        overwrite: start afresh in an `output_dir` that holds an earlier
            run: it is removed (one atomic step) when training starts.
        seed: seeds Keras, NumPy, Python and the task stream (the command
            line seeds before gin builds the model, so its init is seeded too).
        verbose: Keras verbosity (1: progress bar).
        checkpoint_every: also checkpoint every this many train steps
            (checkpoints are always written at the end of every epoch and
            every `checkpoint_seconds`); see `tfmeta.checkpoint`.
        checkpoint_seconds: checkpoint at least this often (wall clock), or None.
        keep_checkpoints: complete checkpoints kept in `output_dir/checkpoints`.
        deterministic: `tf.config.experimental.enable_op_determinism()`, so
            the same seed gives the same phi run to run (docs/resilience.md).
        resume: continue from the newest checkpoint in `output_dir/checkpoints`
            (`--resume`; a fresh start if there is none). The task stream
            restarts at the checkpoint's train step, so the resumed run ends
            with the phi of an uninterrupted one. A checkpoint written with
            other `bindings` (beyond `RESUMABLE_CHANGES`) is refused.
        strategy: `"default"`, `"mirrored"`, `"multi_worker"` or a
            `tf.distribute.Strategy` (`tfmeta.distribute`); tasks_per_batch
            must be a multiple of the replicas. Only the chief writes logs,
            the export and results; every other worker checkpoints its own
            tasks' states in `workers/worker-<i>/checkpoints`.
        bindings: the gin bindings in force (`tfmeta.cli.ginconfig.bindings`),
            stored in every checkpoint and compared on resume.
        operative_config: returns the text of `operative_config.gin`.

    Returns:
        A dict with the export path, the history and the evaluation
        (`"complete": True` when `--resume` found the run already finished).
    """
    options = dict(locals())
    output_dir = options.pop("output_dir")
    parts = Parts(**{f.name: options.pop(f.name) for f in dataclasses.fields(Parts)})
    settings = configure(parts, **options)
    job = TrainingJob(output_dir, settings, parts)
    job.folder.check(overwrite=settings.overwrite, resume=settings.resume, chief=settings.chief)
    with _op_determinism(settings.deterministic):
        job.build()
        start = job.resume()
        if start == job.total and job.finished():
            return job.completed()
        claim = job.folder.claimed(replace=settings.overwrite) if settings.chief else contextlib.nullcontext()
        with claim:
            history, seconds = job.fit(start)
        if not settings.chief:
            return job.worker_results(seconds)
        job.export()
        return job.evaluate(history, seconds, start)


# ---------------------------------------------------------------- configure
def configure(parts, **options):
    """Check every setting of `train` (all but the parts), before anything is built.

    Returns `Settings`; raises a one-line ValueError naming the gin binding to fix.
    """
    positive = validation.check_positive_int
    options["inner_steps"] = positive(
        "train.inner_steps", options["inner_steps"], "set train.inner_steps (K, the inner trajectory length) >= 1"
    )
    options["steps_per_chunk"] = positive(
        "train.steps_per_chunk", options["steps_per_chunk"], "set train.steps_per_chunk to a divisor of train.inner_steps"
    )
    for name in ("meta_updates", "batch_size", "epochs", "steps_per_execution", "keep_checkpoints"):
        options[name] = positive(f"train.{name}", options[name])
    if options["tasks_per_batch"] is not None:
        options["tasks_per_batch"] = positive(
            "train.tasks_per_batch", options["tasks_per_batch"], "set train.tasks_per_batch (T) >= 1, or None for all tasks"
        )
    if options["checkpoint_every"] is not None:
        options["checkpoint_every"] = positive(
            "train.checkpoint_every", options["checkpoint_every"],
            "set train.checkpoint_every to a number of train steps >= 1, or None (checkpoints "
            "then come at every epoch's end and every train.checkpoint_seconds)",
        )
    options["checkpoint_seconds"] = _check_seconds(options["checkpoint_seconds"])
    validation.check_learning_rate(parts.meta_optimizer, "meta_optimizer", "meta/SGD.learning_rate (train.meta_optimizer)")
    validation.check_learning_rate(parts.inner_optimizer, "inner_optimizer", "inner/SGD.learning_rate (train.inner_optimizer)")
    settings = Settings(**options)
    settings.strategy = distribute.get_strategy(settings.strategy)
    distribute.check_jit_compile(settings.jit_compile, settings.strategy)
    if settings.steps_per_execution > 1 and distribute.uses_collectives(settings.strategy):
        print(
            f"tfmeta-train: steps_per_execution={settings.steps_per_execution} -> 1 under "
            f"{type(settings.strategy).__name__} (see tfmeta.distribute.uses_collectives).",
            file=sys.stderr,
        )
        settings.steps_per_execution = 1
    return settings


def _check_seconds(seconds):
    if seconds is None:
        return None
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"train.checkpoint_seconds={seconds!r} must be a number of seconds > 0: set it to "
            "e.g. 300, or None for no wall-clock checkpoints."
        )
    return value


def fixed_bindings(bindings):
    """The bindings a resumed run must share with its checkpoint (all but `RESUMABLE_CHANGES`)."""
    return {
        key: value for key, value in (bindings or {}).items()
        if key not in RESUMABLE_CHANGES and not key.startswith(RESUMABLE_PREFIXES)
    }


def check_same_bindings(saved, current, path):
    """Refuse to resume checkpoint `path` (written with `saved` bindings) under `current` ones."""
    if saved is None or current is None:
        return  # a checkpoint of an older tfmeta, or a run started outside the command line
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if not differ:
        return
    key = differ[0]
    more = f" ({len(differ) - 1} more differ: {', '.join(differ[1:4])})" if len(differ) > 1 else ""
    if key in saved:
        now = f"this run has {current[key]}" if key in current else "this run leaves it unbound"
        fix = f'resume with --gin_param "{key} = {saved[key]}" (the run\'s own setting)'
        was = f"{key} = {saved[key]}"
    else:
        now, was = f"this run binds it to {current[key]}", f"{key} unbound"
        fix = "drop that binding to resume"
    raise IncompatibleCheckpointError(
        f"checkpoint {path} was written with {was}, {now}{more}: {fix}, or start a new run "
        "in another --output_dir (a resumed run must compute what the checkpoint's run did)."
    )


# ---------------------------------------------------------------- the job
class TrainingJob:
    """One run of `train` in `output_dir`, as steps that can be called one by one (see the module)."""

    def __init__(self, output_dir, settings, parts):
        self.settings, self.parts = settings, parts
        checkpoints = None
        if not settings.chief:
            # Every worker checkpoints at the same steps (reading Keras' metrics
            # is a collective, and each worker holds its own tasks' states);
            # the others write only their own task state, under workers/.
            index = distribute.worker_index(settings.strategy)
            checkpoints = f"{output_dir}/workers/worker-{index}/checkpoints"
        self.folder = RunDir(output_dir, checkpoints)
        tasks = parts.tasks
        self.pretrain, self.heldout = tasks if isinstance(tasks, tuple) else (tasks, tasks)
        self.meta = self.baseline = self.checkpoint = self.shape = None
        self.tasks_per_batch = self.total = self.per_epoch = None

    # ------------------------------------------------------------ build
    def build(self):
        """Compile the `MetaModel`, check the task stream and evaluation against it, plan the epochs."""
        s, parts = self.settings, self.parts
        num_tasks = getattr(self.pretrain, "num_tasks", None)
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(
                f"the task distribution {self.pretrain!r} has no tasks: give it at least "
                "train.tasks_per_batch tasks."
            )
        self.tasks_per_batch = s.tasks_per_batch or num_tasks
        self.baseline = keras.models.clone_model(parts.model)
        self.baseline.set_weights(parts.model.get_weights())
        # phi must live in the strategy (gin built the model before).
        parts.model = distribute.in_scope(parts.model, s.strategy)
        with s.strategy.scope():
            self.meta = MetaModel(parts.model)
            self.meta.compile(
                optimizer=parts.meta_optimizer or keras.optimizers.SGD(0.1),
                inner_optimizer=parts.inner_optimizer or keras.optimizers.SGD(0.1),
                loss=parts.loss, learner=parts.learner, inner_steps=s.inner_steps,
                steps_per_execution=s.steps_per_execution, vectorize_tasks=s.vectorize_tasks,
                jit_compile=s.jit_compile,
            )
        x_spec = self._check_stream()
        self._plan_epochs()
        if parts.evaluation is not None and s.chief and getattr(parts.evaluation, "checks_settings", False):
            parts.evaluation(None, None, self.heldout)  # only checks its settings: seconds, not a run
        replicas = self.meta.distribute_strategy.num_replicas_in_sync
        self.shape = (x_spec.shape[0] // replicas, *x_spec.shape[1:])
        self.checkpoint = self._checkpointer()
        with self.meta.distribute_strategy.scope():
            self.meta.build(self.shape)

    def dataset(self, start=0):
        """The task stream from chunk `start` on."""
        s = self.settings
        return self.pretrain.as_dataset(
            tasks_per_batch=self.tasks_per_batch, inner_steps=s.inner_steps, batch_size=s.batch_size,
            steps_per_chunk=s.steps_per_chunk, seed=s.seed, start=start,
        )

    def _check_stream(self):
        """The task batches and their labels against the model, before any train step."""
        first = self.dataset(0)
        x_spec, y_spec = first.element_spec
        validation.check_task_batch(self.parts.model, x_spec.shape, y_spec.shape)
        classes = getattr(self.pretrain, "num_classes", None)
        _, y0 = next(iter(first.take(1)))
        labels = y0.numpy()
        if classes:
            labels = np.append(labels.ravel(), [0, classes - 1]).astype(labels.dtype)
        validation.check_labels(self.parts.model, labels, self.meta.task_loss)
        return x_spec

    def _plan_epochs(self):
        s = self.settings
        self.total = self.meta.steps_for(s.meta_updates, s.steps_per_chunk)
        if self.total % s.epochs:
            raise ValueError(
                f"{s.meta_updates} meta-updates take {self.total} train steps, which do not "
                f"split into epochs={s.epochs}: choose a divisor of {self.total}."
            )
        self.per_epoch = self.total // s.epochs
        if self.per_epoch % self.meta.steps_per_execution:
            # Keras runs whole executions: the last one of an epoch would run
            # steps past the epoch's end (and past the requested meta-updates).
            self.meta.steps_per_execution = math.gcd(self.per_epoch, self.meta.steps_per_execution)

    def _checkpointer(self):
        s = self.settings
        metadata = {
            "seed": s.seed, "tasks_per_batch": self.tasks_per_batch, "batch_size": s.batch_size,
            "steps_per_chunk": s.steps_per_chunk, "inner_steps": s.inner_steps,
            "learner": repr(self.parts.learner),
        }
        if s.bindings is not None:
            metadata["bindings"] = fixed_bindings(s.bindings)
        return MetaCheckpoint(
            self.folder.checkpoints,
            every_steps=s.checkpoint_every,
            # Wall-clock triggers would differ between workers.
            every_seconds=None if s.workers > 1 else s.checkpoint_seconds,
            keep=s.keep_checkpoints,
            metadata=metadata,
        )

    # ------------------------------------------------------------ resume
    def resume(self):
        """Restore the newest checkpoint (with --resume); return the train steps done (0: fresh)."""
        s = self.settings
        if not s.resume:
            return 0
        found = latest_checkpoint(self.folder.checkpoints)
        if found is None:
            return 0
        path, manifest = found
        saved = manifest.get("metadata", {}).get("bindings")
        check_same_bindings(saved, fixed_bindings(s.bindings) if s.bindings else None, path)
        start = self.checkpoint.restore(self.meta, self.shape)
        if start > self.total:
            raise ValueError(
                f"the checkpoint in {self.folder.checkpoints} is at train step {start}, past this "
                f"run's {self.total} steps ({s.meta_updates} meta-updates): resume with the "
                "train.meta_updates of the run that wrote it, or start a new run in another --output_dir."
            )
        return start

    def finished(self):
        """Whether this run's export and results are already written (a finished run resumed)."""
        try:
            results = json.loads(self.folder.results.read_text())
        except (OSError, ValueError):
            return False
        return self.folder.export.is_dir() and results.get("train_steps") == self.total

    def completed(self):
        """The results of the finished run, marked `"complete"`: nothing is trained or written."""
        results = json.loads(self.folder.results.read_text())
        return {**results, "complete": True, "output_dir": str(self.folder.path)}

    # ------------------------------------------------------------ fit
    def fit(self, start):
        """Meta-train from train step `start` to the end; return `(history, seconds)`.

        Only the chief logs (TensorBoard `logs/`, `history.csv`); on a resume
        the history rows of the epochs trained again are dropped first.
        """
        s = self.settings
        callbacks = [self.checkpoint]
        if s.chief:
            keep_epochs_before(self.folder.history, start // self.per_epoch)
            callbacks = [
                keras.callbacks.TensorBoard(str(self.folder.logs)),
                keras.callbacks.CSVLogger(str(self.folder.history), append=True),
                self.checkpoint,
            ]
        stopper = StopOnInterrupt(self.checkpoint)
        # One worker of several cannot stop alone: the others would wait for it.
        interrupt = stopping_on_interrupt(stopper) if s.workers == 1 else contextlib.nullcontext()
        began = time.perf_counter()
        with interrupt:
            history = resumable_fit(
                self.meta, self.dataset, total_steps=self.total, epochs=s.epochs, start=start,
                verbose=s.verbose if s.chief else 0, callbacks=[*callbacks, stopper],
            )
        seconds = time.perf_counter() - began
        return (read_history(self.folder.history) if start else history), seconds

    def worker_results(self, seconds):
        """What a worker other than the chief returns (it writes only checkpoints)."""
        return {
            "export": None,
            "worker": distribute.worker_index(self.settings.strategy),
            "meta_updates": int(self.meta.meta_updates.numpy()),
            "meta_training_seconds": seconds,
        }

    # ------------------------------------------------------------ export, evaluate
    def export(self):
        """Write the initialization to `output_dir/initialization` (replacing a resumed run's)."""
        s = self.settings
        return export_initialization(
            self.parts.model,
            self.folder.export,
            overwrite=s.overwrite or s.resume,
            metadata={"learner": repr(self.parts.learner), "meta_updates": int(self.meta.meta_updates.numpy())},
        )

    def evaluate(self, history, seconds, start):
        """Evaluate the export against the baseline; write operative_config.gin, then results.json."""
        s = self.settings
        results = {
            "export": str(self.folder.export),
            "meta_updates": int(self.meta.meta_updates.numpy()),
            "meta_training_seconds": seconds,
            "resumed_from_step": start,
            "train_steps": self.total,
            "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        }
        if self.parts.evaluation is not None:
            results["evaluation"] = self.parts.evaluation(self.parts.model, self.baseline, self.heldout)
        if s.operative_config is not None:
            atomic.write_text(self.folder.operative_config, s.operative_config())
        # Last: a results.json means the run is complete (`finished`).
        atomic.write_text(self.folder.results, json.dumps(results, indent=2))
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
