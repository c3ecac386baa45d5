"""The inner loop: advance every task of a task batch by one chunk of inner steps.

One inner step of one task evaluates the task loss and its gradient at the
task's parameters, hands the step to the learner (`MetaLearner.observe`) and
lets the inner optimizer move the parameters, all on values (stateless: no
variable is touched). A chunk of S steps is a `tf.while_loop` (`unroll`
steps per iteration), so the graph does not grow with S or with K. The T
tasks run as T copies of the step, or as one computation with
`vectorize=True` or `"auto"` (`tfmeta.task_batched`: convolutions with the
tasks in the channels, per-task BatchNorm, one tape; `tf.vectorized_map` for
models it cannot walk).

A task whose loss is NaN, inf, or finite but above `max_task_loss` has
diverged: its loss and gradients become NaN, so that the NaN reaches its
parameters and `MetaModel` leaves the task out of the meta-update
(`tfmeta.divergence`), and its loss out of the logged mean.

Example (what `MetaModel` does)::

    loop = InnerLoop(model, loss, learner, inner_optimizer)
    tasks, mean_loss = loop.run(tasks, x, y, position)   # x: [T, S, B, ...]
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import tensorflow as tf

from tfmeta.heads import head_meta_learned
from tfmeta.learners.base import MetaLearner
from tfmeta.replicas import task_loss
from tfmeta.task_batched import (
    TaskBatchedStep, check_task_shards, finish_task_step, quiet_pfor, why_not_batched,
)
from tfmeta.task_state import TaskState
from tfmeta.validation import ConfigError

__all__ = ["InnerLoop", "VECTORIZE_TASKS", "check_vectorize", "mean_loss"]

#: How the T tasks of a task batch run their inner step (`vectorize`):
#: False: T copies of the step in the graph; True: one computation
#: (`tfmeta.task_batched` where the model allows it, else `tf.vectorized_map`);
#: "auto": one computation where the model allows it, else T copies.
VECTORIZE_TASKS = (False, True, "auto")


def check_vectorize(vectorize):
    """`vectorize` if it is one of `VECTORIZE_TASKS` (a ConfigError names them otherwise)."""
    if not any(vectorize is v or (isinstance(v, str) and vectorize == v) for v in VECTORIZE_TASKS):
        raise ConfigError(
            f"vectorize_tasks must be one of False, True or 'auto', got {vectorize!r}."
        )
    return vectorize


def mean_loss(loss):
    """The task loss as a `keras.losses.Loss`, i.e. reduced to the batch mean.

    `keras.losses.get("mse")` is a per-example function; its gradient would be
    that of the batch sum.
    """
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    return _BatchMean(loss)


class _BatchMean(keras.losses.Loss):
    """A per-example loss function reduced to its mean over the batch."""

    def __init__(self, fn):
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


@dataclasses.dataclass(eq=False)
class InnerLoop:
    """Inner steps of every task, on stacked task states (see `TaskState`).

    Args:
        model: the wrapped Keras model (run with `stateless_call`).
        loss: the task loss, a `keras.losses.Loss` reduced to the batch mean.
        learner: the meta-learner that observes every step.
        optimizer: the built inner optimizer, passed through `make_stateless`.
        unroll: inner steps per `tf.while_loop` iteration.
        vectorize: how the T tasks run their step, one of `VECTORIZE_TASKS`:
            True and "auto" run them as one computation
            (`tfmeta.task_batched.TaskBatchedStep`) where the model allows it
            (`why_not_batched`); otherwise True uses `tf.vectorized_map` and
            "auto" falls back to copies of the step, with a warning.
        task_shards: with the tasks as one computation, split them into this
            many computations the executor runs side by side (an int >= 1, or
            "auto"; `TaskBatchedStep`'s `shards`). 1 unless `vectorize`.
        max_task_loss: a finite loss above this (in absolute value) counts as
            diverged, like NaN or inf; `None`: only NaN and inf do.
        jit_compile: compile `run` with XLA (`tf.function(jit_compile=True)`),
            on the device of its caller: under a strategy each replica's chunk
            is one XLA computation, traced for that replica.
        heads: the `tfmeta.TaskHeads` bound to `model` (`MetaModel` passes its
            own), or None. With a schedule that keeps the inner optimizer's
            state over restarts, the heads' entries step at the heads' own
            step count (`TaskHeads.own_step_count`). A model whose head a
            TaskHeads is bound to (`tfmeta.heads.head_meta_learned` False)
            needs it: None is a ConfigError, since the heads would step at
            the body's step count.
    """

    model: keras.Model
    loss: keras.losses.Loss
    learner: MetaLearner
    optimizer: keras.optimizers.Optimizer
    unroll: int = 1
    vectorize: bool | str = False
    task_shards: int | str = 1
    max_task_loss: float | None = None
    jit_compile: bool = False
    # A tfmeta.TaskHeads, not imported: inner_loop and task_heads share a floor
    # of the import picture (docs/design.md).
    heads: object | None = None

    def __post_init__(self):
        if self.heads is None and not head_meta_learned(self.model):
            raise ConfigError(
                f"InnerLoop on {self.model.name!r}, whose head is bound to a tfmeta.TaskHeads "
                "(not meta-learned): this model's heads are TaskHeads, so pass heads=<that "
                "TaskHeads> (MetaModel does); without it they would step at the body's step count."
            )
        self.vectorize = check_vectorize(self.vectorize)
        self.task_shards = check_task_shards(self.task_shards)
        if not self.vectorize and self.task_shards != 1:
            raise ConfigError(
                f"task_shards={self.task_shards!r} splits tasks run as one computation, but "
                "vectorize_tasks=False runs every task as a copy of the step already: set "
                "vectorize_tasks=True (or 'auto') as well, or leave task_shards at 1."
            )
        self._batched = self._not_batched = None
        if self.vectorize:
            reason = self._not_batched = why_not_batched(self.model)
            if reason is None:
                self._batched = TaskBatchedStep(self, shards=self.task_shards)
            elif self.vectorize == "auto":
                # The fallback is slower, never wrong: say so once, at compile.
                self.vectorize = False
                logging.getLogger("tfmeta").warning(
                    "vectorize_tasks='auto': the tasks' inner steps run as copies of the "
                    "step, not as one computation, because %s.", reason
                )
        # Only the chunk on tensors: variables, the all-reduce and the outer
        # update stay outside XLA, in the caller (tfmeta.meta_model).
        if self.jit_compile:
            self.run = tf.function(self.run, jit_compile=True)

    def task_step(self, state, x, y, index):
        """One inner step of one task. `state` = (params, non_trainable, opt, learner)."""
        params, non_trainable, opt_vars, learner_state = state
        with tf.GradientTape() as tape:
            tape.watch(params)
            y_pred, new_non_trainable, losses = self.model.stateless_call(
                params, non_trainable, x, training=True, return_losses=True
            )
            loss = task_loss(self.loss, y, y_pred)
            if losses:
                loss = loss + tf.add_n(losses)
        grads = tape.gradient(loss, params)
        (new_params, new_opt_vars, learner_state), loss = finish_task_step(
            self, params, opt_vars, learner_state, grads, loss, index
        )
        return (new_params, list(new_non_trainable), new_opt_vars, learner_state), loss

    def step(self, tasks, x, y, index):
        """One inner step of every task (stacked in, stacked out)."""

        def step(args):
            task, x_t, y_t = args
            return self.task_step(task, x_t, y_t, index)

        if self._batched is not None:
            return self._batched.step(tasks, x, y, index)
        if self.vectorize is True:
            try:
                with quiet_pfor():
                    return tf.vectorized_map(step, (tasks, x, y), fallback_to_while_loop=False)
            except ValueError as error:
                # Only what the step does without vectorization too is the
                # step's own error; the rest is tf.vectorized_map's (pfor).
                step((TaskState.task(tasks, 0), x[0], y[0]))
                raise ConfigError(
                    "vectorize_tasks=True cannot batch this model's inner step over "
                    f"per-task weights: tfmeta.task_batched cannot walk it ({self._not_batched}) "
                    f"and tf.vectorized_map fails ({str(error).splitlines()[0]}). Compile with "
                    "vectorize_tasks='auto' or False."
                ) from error
        outputs = [step((TaskState.task(tasks, t), x[t], y[t])) for t in range(x.shape[0])]
        return tf.nest.map_structure(lambda *v: tf.stack(v), *outputs)

    def run(self, tasks, x, y, position):
        """Advance every task by the chunk's S inner steps.

        Args:
            tasks: the stacked task states.
            x, y: the chunk, `[T, S, B, ...]`.
            position: the inner steps the tasks took before this chunk.

        Returns:
            `(tasks, loss)`: the advanced states and the mean of the chunk's
            finite inner losses (NaN when every loss diverged).
        """
        steps = x.shape[1]
        dtype = tf.as_dtype(self.loss.dtype)

        def body(s, tasks, loss_sum, count):
            for u in range(self.unroll):
                tasks, losses = self.step(tasks, x[:, s + u], y[:, s + u], position + s + u)
                # The logged loss averages the finite losses: one diverged
                # task's NaN would hide every other task's progress.
                losses = tf.cast(losses, dtype)
                finite = tf.math.is_finite(losses)
                loss_sum = loss_sum + tf.reduce_sum(tf.where(finite, losses, 0.0))
                count = count + tf.reduce_sum(tf.cast(finite, dtype))
            return s + self.unroll, tasks, loss_sum, count

        zero = tf.zeros((), dtype)
        if steps == self.unroll:
            _, tasks, loss_sum, count = body(tf.constant(0), tasks, zero, zero)
        else:
            _, tasks, loss_sum, count = tf.while_loop(
                lambda s, *_: s < steps,
                body,
                (tf.constant(0), tasks, zero, zero),
                maximum_iterations=steps // self.unroll,
            )
        nan = tf.constant(float("nan"), dtype)
        return tasks, tf.math.divide_no_nan(loss_sum, count) + tf.where(count > 0, zero, nan)
