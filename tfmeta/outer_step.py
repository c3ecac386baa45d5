"""The meta-update: the finite tasks' mean meta-gradient steps phi, and tasks follow.

Three parts, in the order `MetaModel.train_step` runs them:

1. `OuterStep.contribution` (in each replica): every task's meta-gradient
   from the learner, and the sums over the replica's FINITE tasks of the
   meta-gradients and float non-trainable state (BatchNorm statistics),
   with their count. A task holding NaN or inf (a diverging inner loop, bad
   data, or a loss above `max_task_loss`) is left out (`tfmeta.divergence`).
2. `OuterStep.update` (cross-replica, through `merge_call`): when due, the
   sums are all-reduced and the outer optimizer steps phi once with the mean
   over every finite task of the meta-batch; the wrapped model's float state
   becomes their mean, its integer state (seeds) global task 0's. With no
   finite task the update is skipped and counted.
3. `OuterStep.shift` (in each replica, for schedules that shift): every
   task moves by what the update did to phi (`MetaLearner.shift`).

With a learner that leaves the heads out (`tfmeta.learners.ExcludeHeads`,
what `MetaModel(..., heads=TaskHeads(...))` uses) only the body's variables
are all-reduced and stepped: phi's head variables never move, not even by
the outer optimizer's weight decay or momentum. With `TaskHeads`, `update`
also writes every task's head into the bank, every chunk (`TaskHeads.write`).

Example (what `MetaModel.train_step` does)::

    grads, count, state, rows = outer.contribution(tasks, phi, first, task_ids)
    seed = replica_context.merge_call(outer.update, args=(due, grads, count, state, rows))
    params = outer.shift(params, phi, seed, first)
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfmeta.learners.base import MetaLearner
from tfmeta.learners.exclude import ExcludeHeads
from tfmeta.replicas import all_reduce_sum, finite_sum
from tfmeta.task_state import TaskState

__all__ = ["OuterStep"]


@dataclasses.dataclass(eq=False)
class OuterStep:
    """The meta-update of one `MetaModel`.

    Args:
        model: the wrapped model (phi: its trainable weights).
        learner: the meta-learner (`meta_gradient`, `shift`, `schedule`).
        optimizer: the outer optimizer (stateless: applied in cross-replica context).
        task_state: the replica's `TaskState`.
        global_num_tasks: T, the tasks of a whole meta-batch.
        counters: the owner's `meta_updates`, `skipped_tasks` and
            `diverged_updates` variables and its `shift_seed` generator (a dict).
        heads: the `TaskHeads` whose bank `update` writes, or None.
    """

    model: keras.Model
    learner: MetaLearner
    optimizer: keras.optimizers.Optimizer
    task_state: TaskState
    global_num_tasks: int
    counters: dict
    heads: object = None  # a bound tfmeta.TaskHeads (duck-typed: no import upwards)

    @property
    def body(self):
        """Positions of the meta-learned variables in phi (all but excluded heads)."""
        excluded = self.learner.head_indices if isinstance(self.learner, ExcludeHeads) else ()
        return [i for i in range(len(self.model.trainable_variables)) if i not in excluded]

    def contribution(self, tasks, phi, first, task_ids=None):
        """This replica's share of a meta-update, over its FINITE tasks.

        A task whose meta-gradient, parameters or float state hold a NaN or
        inf is left out. Returns the sums over this replica's finite tasks of
        their meta-gradients (of the body's variables) and of their float
        non-trainable state, their number, for integer state (seeds) the
        value of global task 0, and with `TaskHeads` this replica's share of
        the bank write (`TaskHeads.rows`; else an empty list).
        """
        params, non_trainable, _, learner_state = tasks
        floats = [i for i, v in enumerate(non_trainable) if v.dtype.is_floating]
        per_task, finite = [], []
        for t in range(self.task_state.num_tasks):
            grads = self.learner.meta_gradient(
                TaskState.task(learner_state, t), phi, TaskState.task(params, t)
            )
            values = [*grads, *(p[t] for p in params), *(non_trainable[i][t] for i in floats)]
            per_task.append(grads)
            finite.append(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values]))
        finite = tf.stack(finite)
        body = self.body
        grads = [finite_sum(tf.stack(g), finite) for i, g in enumerate(zip(*per_task)) if i in body]
        count = tf.reduce_sum(tf.cast(finite, tf.float32))
        state = [
            finite_sum(value, finite) if i in floats
            else self.task_state.first_task_state(i, value, first)
            for i, value in enumerate(non_trainable)
        ]
        rows = [] if self.heads is None else self.heads.rows(params, finite, task_ids)
        return grads, count, state, rows

    def update(self, strategy, due, grads, count, state, rows=()):
        """The meta-update of phi when `due`, in cross-replica context (via `merge_call`).

        `due` is identical on every replica. A replica context cannot hold
        this: Keras' TensorFlow optimizer and all-reduces call `merge_call`,
        which is not allowed inside a `tf.cond`, and an optimizer applied on
        every chunk is not a no-op when no update is due (Adam's moments,
        iterations). Here the optimizer runs its backend-agnostic rule on the
        averaged gradient; each variable assignment in cross-replica context
        updates every replica's copy. Returns the seed of this meta-update's
        shifts. The heads' `rows` (from `contribution`) are written to the
        bank whether or not an update is due.
        """
        if rows:
            self.heads.write(strategy, rows)
        due = strategy.experimental_local_results(due)[0]
        return tf.cond(
            due,
            lambda: self._apply(strategy, grads, count, state),
            lambda: tf.zeros((2,), "int64"),
        )

    def _apply(self, strategy, grads, count, state):
        """All-reduce the contributions and step phi's body with their mean."""
        trainable = self.model.trainable_variables
        phi_vars = [trainable[i] for i in self.body]
        variables = self.model.non_trainable_variables
        floats = [i for i, v in enumerate(variables) if "float" in v.dtype]
        zero_seed = tf.zeros((2,), "int64")
        reduced = all_reduce_sum(
            strategy,
            [(count, phi_vars[0].value)]
            + [(g, v.value) for g, v in zip(grads, phi_vars)]
            + [(state[i], variables[i].value) for i in floats],
        )
        finite, sums = reduced[0], reduced[1:]
        skipped = tf.cast(float(self.global_num_tasks) - finite, "int64")
        self.counters["skipped_tasks"].assign_add(skipped)

        def apply():
            mean = [t / tf.cast(finite, t.dtype) for t in sums]
            self.optimizer.apply(mean[: len(phi_vars)], phi_vars)
            # The initialization's non-trainable state is the task average
            # of the float state (BatchNorm statistics); integer state
            # (seeds) follows global task 0 so that random streams keep
            # advancing across trajectories.
            for i, value in zip(floats, mean[len(phi_vars):]):
                variables[i].assign(value)
            self.counters["meta_updates"].assign_add(1)
            if self.learner.schedule.shifts:
                return self.counters["shift_seed"].next()
            return zero_seed

        def skip():
            self.counters["diverged_updates"].assign_add(1)
            return zero_seed

        seed = tf.cond(finite > 0, apply, skip)
        for i, var in enumerate(variables):
            if i not in floats:
                var.assign(strategy.experimental_local_results(state[i])[0])
        return tf.cast(seed, "int64")  # the SeedGenerator's dtype

    def shift(self, params, phi, seed, first):
        """Every task's parameters moved by what the update did to phi (`MetaLearner.shift`).

        Delta is the change of phi: identical on every replica after the
        synchronized update. Task t's shift draws from `seed` folded with its
        global index `first + t`.
        """
        new_phi = [tf.convert_to_tensor(v.value) for v in self.model.trainable_variables]
        delta = [n - o for n, o in zip(new_phi, phi)]
        shifted = [
            self.learner.shift(
                TaskState.task(params, t),
                delta,
                tf.random.experimental.stateless_fold_in(seed, first + t),
            )
            for t in range(self.task_state.num_tasks)
        ]
        return [tf.stack(v) for v in zip(*shifted)]
