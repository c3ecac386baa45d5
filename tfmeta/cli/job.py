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
import time

import keras
import numpy as np

from tfmeta import atomic, distribute, validation
from tfmeta.checkpoint import MetaCheckpoint, latest_checkpoint, resumable_fit
from tfmeta.cli.history import keep_epochs_before, read_history
from tfmeta.cli.interrupt import StopOnInterrupt, stopping_on_interrupt
from tfmeta.cli.rundir import RunDir
from tfmeta.cli.settings import Parts, Settings, check_same_bindings, configure, fixed_bindings
from tfmeta.divergence import DEFAULT_MAX_TASK_LOSS
from tfmeta.export import export_initialization
from tfmeta.meta_model import MetaModel

__all__ = ["Parts", "Settings", "TrainingJob", "configure", "train"]


def train(
    output_dir, tasks, model, learner, loss, inner_steps, meta_updates, tasks_per_batch=None,
    batch_size=1, steps_per_chunk=1, meta_optimizer=None, inner_optimizer=None, epochs=1,
    steps_per_execution=1, vectorize_tasks=False, task_shards=1, jit_compile="auto", max_task_loss=DEFAULT_MAX_TASK_LOSS,
    evaluation=None, heads=None,
    overwrite=False, seed=0, verbose=1, checkpoint_every=None, checkpoint_seconds=300.0,
    keep_checkpoints=2, deterministic=True, resume=False, strategy="default", bindings=None,
    operative_config=None,
):
    """Meta-train `model`'s initialization on `tasks`, export it, evaluate it.

    `tasks` is a `TaskDistribution` or a `(pretrain, heldout)` pair (the
    evaluation then uses the held-out tasks); `model`, `learner`, `loss`,
    the optimizers and `evaluation` are the run's `Parts`, every other
    argument a `Settings` field (each documented there). `output_dir` holds
    the run (`tfmeta.cli.rundir`).

    Returns:
        A dict with the export path, the history and the evaluation
        (`"complete": True` when `--resume` found the run already finished).

    Example::

        results = train("runs/x", digits_tasks(), mlp(5, input_shape=(8, 8, 1)), Leap(),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True), inner_steps=20, meta_updates=300)
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
        """Seed, compile the `MetaModel`, check the task stream and evaluation against it, plan the epochs."""
        s, parts = self.settings, self.parts
        keras.utils.set_random_seed(s.seed)
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
            self.meta = MetaModel(parts.model, heads=parts.heads)
            self.meta.compile(
                optimizer=parts.meta_optimizer or keras.optimizers.SGD(0.1),
                inner_optimizer=parts.inner_optimizer or keras.optimizers.SGD(0.1),
                loss=parts.loss, learner=parts.learner, inner_steps=s.inner_steps,
                steps_per_execution=s.steps_per_execution, vectorize_tasks=s.vectorize_tasks,
                task_shards=s.task_shards, jit_compile=s.jit_compile, max_task_loss=s.max_task_loss,
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
            **({} if self.parts.heads is None else {"with_task_ids": True}),
        )

    def _check_stream(self):
        """The task batches and their labels against the model, before any train step."""
        first = self.dataset(0)
        x_spec, y_spec = first.element_spec[:2]
        validation.check_task_batch(self.parts.model, x_spec.shape, y_spec.shape)
        classes = getattr(self.pretrain, "num_classes", None)
        y0 = next(iter(first.take(1)))[1]
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
        # Each fit runs in whole executions that divide its steps (`resumable_fit`).
        self.per_epoch = self.total // s.epochs

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
            unchecked_metadata=("bindings",),  # checked first by resume, with RESUMABLE_CHANGES
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
        # Saved bindings go through fixed_bindings too: an earlier tfmeta saved
        # some that a resume may now change (train.steps_per_execution).
        saved = fixed_bindings(manifest.get("metadata", {}).get("bindings"))
        check_same_bindings(saved, fixed_bindings(s.bindings or None), path)
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
