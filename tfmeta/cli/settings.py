"""What a training run is configured with: its parts, its checked settings, and what a resume may change.

`configure` checks every setting of `tfmeta.cli.job.train` before anything
is built, so a wrong setting costs seconds, not a run, and names the gin
binding to fix. `check_same_bindings` refuses to resume a checkpoint written
under other bindings (a changed meta learning rate or task seed would
otherwise be recorded in operative_config.gin but not run), except those in
`RESUMABLE_CHANGES`.

Example::

    settings = configure(parts, inner_steps=20, meta_updates=300, ...)   # every Settings field
    check_same_bindings(saved, fixed_bindings(ginconfig.bindings()), "runs/x/checkpoints/ckpt-000000100")
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable

from tfmeta import distribute, validation
from tfmeta.checkpoint import IncompatibleCheckpointError
from tfmeta.task_batched import check_task_shards

__all__ = ["Parts", "RESUMABLE_CHANGES", "Settings", "check_same_bindings", "configure", "fixed_bindings"]

#: Bindings a resumed run may change: how it logs, checkpoints, compiles and is
#: evaluated, and how many train steps one execution runs (`resumable_fit`
#: finishes the epoch in whole executions that divide its remaining steps,
#: `tfmeta.checkpoint.execution_size`: the steps compute the same) or how
#: many computations the tasks are split into (`task_shards`: the same to
#: float rounding, like `jit_compile`). Everything
#: else must be the run's own, its length included (other meta_updates would
#: move its epoch boundaries away from the checkpoint's).
RESUMABLE_CHANGES = (
    "train.verbose", "train.evaluation", "train.checkpoint_every", "train.checkpoint_seconds",
    "train.keep_checkpoints", "train.overwrite", "train.jit_compile", "train.deterministic",
    "train.steps_per_execution", "train.task_shards",
)
RESUMABLE_PREFIXES = ("heldout_finetuning.", "himmelblau_adaptation.", "finetune.")


@dataclasses.dataclass
class Parts:
    """The objects gin builds for a run.

    Attributes:
        tasks: a `TaskDistribution`, or a `(pretrain, heldout)` pair of them
            (the evaluation then uses the held-out tasks).
        model: the Keras model whose initialization is learned.
        learner: a meta-learner (`Leap()`, `Reptile()`, ...).
        loss: the task loss.
        meta_optimizer, inner_optimizer: Keras optimizers (default SGD 0.1).
        evaluation: `evaluate(learned, baseline, tasks) -> dict` run after
            export (see `tfmeta.evaluation`); the baseline is the model as it
            was before meta-training (its random initialization).
        heads: a `tfmeta.TaskHeads` for one head per source task, left out
            of meta-learning (the stream then carries task ids); None: the
            model's head is meta-learned.
    """

    tasks: Any
    model: Any
    learner: Any
    loss: Any
    meta_optimizer: Any = None
    inner_optimizer: Any = None
    evaluation: Callable | None = None
    heads: Any = None


@dataclasses.dataclass
class Settings:
    """A run's checked settings: the gin bindings `train.<name>`, and two from the command line.

    Attributes:
        inner_steps: K.
        meta_updates: how many meta-updates to run.
        tasks_per_batch, batch_size, steps_per_chunk: T, B and S of the task
            batches (T None: all tasks).
        epochs: the meta-updates are split into this many Keras epochs (one
            progress bar, history row and TensorBoard point each).
        steps_per_execution, vectorize_tasks, task_shards, jit_compile, max_task_loss: see
            `MetaModel.compile` (a task whose inner loss exceeds `max_task_loss`
            counts as diverged; None turns the check off).
            `steps_per_execution` is lowered to a divisor of the steps per
            epoch if needed (Keras would otherwise run extra steps;
            `tfmeta.checkpoint.execution_size`), so a resume may change it.
        overwrite: start afresh in an output folder that holds an earlier
            run: it is removed (one atomic step) when training starts.
        seed: seeds Keras, NumPy, Python and the task stream (the command
            line seeds before gin builds the model, so its init is seeded too).
        verbose: Keras verbosity (1: progress bar).
        checkpoint_every: also checkpoint every this many train steps
            (checkpoints are always written at the end of every epoch and
            every `checkpoint_seconds`); see `tfmeta.checkpoint`.
        checkpoint_seconds: checkpoint at least this often (wall clock), or None.
        keep_checkpoints: complete checkpoints kept in `checkpoints/`.
        deterministic: `tf.config.experimental.enable_op_determinism()`, so
            the same seed gives the same phi run to run (docs/resilience.md).
        resume: continue from the newest checkpoint in `checkpoints/`
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
    """

    inner_steps: int
    meta_updates: int
    tasks_per_batch: int | None
    batch_size: int
    steps_per_chunk: int
    epochs: int
    steps_per_execution: int
    vectorize_tasks: bool | str
    task_shards: int | str
    jit_compile: Any
    max_task_loss: float | None
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


def configure(parts, **options):
    """Check every setting (all `Settings` fields, by name) against `parts`, before anything is built.

    Returns `Settings`; raises a one-line ValueError naming the gin binding to fix.

    Example::

        configure(parts, **{**defaults, "inner_steps": 0})
        # ConfigError: train.inner_steps=0 must be an integer >= 1: set train.inner_steps ...
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
    _check_task_shards(options["task_shards"], options["vectorize_tasks"])
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


def _check_task_shards(shards, vectorize):
    try:
        check_task_shards(shards)
    except validation.ConfigError as error:
        raise validation.ConfigError(f"train.{error}") from None
    if shards != 1 and vectorize is False:
        raise validation.ConfigError(
            f"train.task_shards={shards!r} splits tasks that run as one computation, but "
            "train.vectorize_tasks=False runs each task as a copy of the step: set "
            "train.vectorize_tasks = True (or 'auto'), or leave train.task_shards at 1."
        )


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
    """The bindings a resumed run must share with its checkpoint (all but `RESUMABLE_CHANGES`).

    None (a run started outside the command line, a checkpoint of a tfmeta
    that saved no bindings) stays None. Applied to a checkpoint's saved
    bindings too, which an earlier tfmeta saved with bindings it now lets a
    resume change.

    Example::

        fixed_bindings({"train.verbose": "1", "train.meta_updates": "300"})   # {"train.meta_updates": "300"}
    """
    if bindings is None:
        return None
    return {
        key: value for key, value in bindings.items()
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
