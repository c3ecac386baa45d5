"""Every task's inner state between train steps, kept in variables stacked over tasks.

A task's state is four lists of tensors, `(params, non_trainable, optimizer,
learner)`: its parameters theta, its non-trainable state (BatchNorm
statistics, seed-generator states), its inner optimizer's variables
(momentum, Adam moments, iterations) and its learner's accumulators. Each
list element is one variable of shape `[tasks, ...]` (this replica's tasks),
so `steps_per_execution` can fuse chunks and checkpoints capture an in-flight
trajectory. `TaskState.read` gives the stacked values, restarted from phi
where a trajectory begins; `TaskState.write` stores them back. With per-task
heads (`tfmeta.TaskHeads`) a restart takes each task's head from the bank
row of its source task instead of phi.

Example (what `MetaModel.train_step` does)::

    state = TaskState(owner, model, inner_optimizer, learner, num_tasks=4)
    tasks = state.read(restart=position == 0, first=0)   # 4 tasks, from phi
    # with TaskHeads: state.read(..., task_ids=ids), heads from bank[ids]
    tasks, loss = run_chunk(tasks, x, y)                  # inner steps
    state.write(tasks)
"""

from __future__ import annotations

import tensorflow as tf

from tfmeta.replicas import local_variable

__all__ = ["TaskState"]


def _is_seed_state(variable):
    return variable.path.endswith("seed_generator_state")


def _seed_offset(index):
    """The offset of task `index`'s seed state: `[index, 0]` (stacked if a vector)."""
    index = tf.convert_to_tensor(index)
    return tf.stack([index, tf.zeros_like(index)], axis=-1)


class TaskState:
    """The stacked per-task state of one replica's `num_tasks` tasks.

    Args:
        owner: the layer whose (per-replica) variables these are; their
            paths are `<owner>/task_state/params_<i>`, `non_trainable_<i>`,
            `inner_optimizer_<i>` and `learner_<i>`.
        model: the wrapped model; its trainable weights are phi.
        inner_optimizer: the built, stateless inner optimizer.
        learner: the meta-learner (its `init_state` and `schedule`).
        num_tasks: this replica's tasks.
        heads: a bound `tfmeta.TaskHeads`, or None. Its bank is created on
            `owner`; restarts read each task's head from it, and the heads'
            inner optimizer slots always restart (a task's slot may hold
            another source next trajectory).

    Attributes:
        params, non_trainable, optimizer, learner_state: the variables, one
            per model weight / optimizer variable / learner accumulator.
    """

    def __init__(self, owner, model, inner_optimizer, learner, num_tasks, heads=None):
        self.model = model
        self.learner = learner
        self.num_tasks = num_tasks
        self.heads = heads
        if heads is not None:
            heads.build(owner)
        self._head_slots = [] if heads is None else heads.optimizer_slots(inner_optimizer)
        phi = model.trainable_variables
        self._learner_structure = learner.init_state([v.value for v in phi])

        def stacked(name, value):
            value = tf.convert_to_tensor(value)
            return local_variable(
                owner,
                name,
                (num_tasks, *value.shape),
                value.dtype.name,
                lambda shape, dtype: tf.stack([value] * num_tasks),
                scope="task_state",
            )

        self.params = [stacked(f"params_{i}", v.value) for i, v in enumerate(phi)]
        self.non_trainable = [
            stacked(f"non_trainable_{i}", v.value)
            for i, v in enumerate(model.non_trainable_variables)
        ]
        self.optimizer = [
            stacked(f"inner_optimizer_{i}", v.value)
            for i, v in enumerate(inner_optimizer.variables)
        ]
        self.learner_state = [
            stacked(f"learner_{i}", t)
            for i, t in enumerate(tf.nest.flatten(self._learner_structure))
        ]
        self._initial_optimizer_state = [
            tf.convert_to_tensor(v.value) for v in inner_optimizer.variables
        ]

    @property
    def variables(self):
        """Every variable, in the order of `read`'s flattened structure."""
        return self.params + self.non_trainable + self.optimizer + self.learner_state

    def read(self, restart, first, task_ids=None):
        """The stacked task states, restarted from phi where `restart` is true.

        Every leaf has a leading task axis (this replica's tasks, the first of
        which has the global index `first`). A restart sets the parameters,
        non-trainable state and learner accumulators from the wrapped model,
        and the inner optimizer's state too when the schedule resets it.
        With `TaskHeads`, `task_ids` (int32 `[num_tasks]`, this replica's
        tasks' source indices) is required, and a restart sets each task's
        head from `bank[task_id]`; without, `task_ids` is not used.
        """
        phi = [v.value for v in self.model.trainable_variables]
        fresh_params = phi
        if self.heads is not None:
            fresh_params = self.heads.restart_params(phi, task_ids, self.num_tasks)
        fresh_learner = tf.nest.flatten(self.learner.init_state(phi))
        reset_opt = self.learner.schedule.reset_optimizer

        def read(variables, fresh, reset=True):
            values = []
            for var, value in zip(variables, fresh):
                stored = tf.convert_to_tensor(var.value)
                if reset:
                    value = tf.cast(value, stored.dtype)
                    if value.shape.rank < stored.shape.rank:
                        value = value[None]
                    stored = tf.where(restart, tf.broadcast_to(value, tf.shape(stored)), stored)
                values.append(stored)
            return values

        params = read(self.params, fresh_params)
        non_trainable = read(self.non_trainable, self._fresh_non_trainable(first))
        initial = self._initial_optimizer_state
        opt_vars = read(self.optimizer, initial, reset_opt)
        if not reset_opt:
            opt_vars = self._reset_diverged(opt_vars, restart)
            # The heads' slots restart even so: this task slot may hold
            # another source's head in the new trajectory.
            slots = self._head_slots
            restarted = read([self.optimizer[j] for j in slots], [initial[j] for j in slots])
            for j, value in zip(slots, restarted):
                opt_vars[j] = value
        learner = read(self.learner_state, fresh_learner)
        learner = tf.nest.pack_sequence_as(self._learner_structure, learner)
        return (params, non_trainable, opt_vars, learner)

    def write(self, tasks):
        """Store `tasks` (the structure `read` returns) in the variables."""
        for var, value in zip(self.variables, tf.nest.flatten(tasks)):
            var.assign(value)

    @staticmethod
    def task(tasks, t):
        """Task `t`'s state out of the stacked `tasks`."""
        return tf.nest.map_structure(lambda v: v[t], tasks)

    def first_task_state(self, i, stacked, first):
        """Non-trainable state `i` of GLOBAL task 0, from this replica's first task's.

        Seed states are task 0's plus the task's offset (see
        `_fresh_non_trainable`), so every replica recovers task 0's from its
        own first task; other state is this replica's first task's.
        """
        value = stacked[0]
        if _is_seed_state(self.model.non_trainable_variables[i]):
            value = value - tf.cast(_seed_offset(first), value.dtype)
        return value

    def _reset_diverged(self, stored, restart):
        """Inner optimizer states kept across a restart, except a diverged task's.

        Without `reset_optimizer` (CTS without hard_reset) a task keeps its
        slots (momentum, moments) when it restarts from phi; a task that
        diverged holds NaN/inf there and would diverge again at once, so its
        state restarts too (`tfmeta.divergence`).
        """
        if not stored:
            return stored
        finite = tf.reduce_all(
            tf.stack([
                tf.reduce_all(tf.reshape(_is_finite(v), [self.num_tasks, -1]), axis=1)
                for v in stored
            ]),
            axis=0,
        )
        diverged = tf.logical_and(restart, tf.logical_not(finite))
        values = []
        for value, initial in zip(stored, self._initial_optimizer_state):
            mask = tf.reshape(diverged, [-1] + [1] * (value.shape.rank - 1))
            initial = tf.broadcast_to(tf.cast(initial, value.dtype)[None], tf.shape(value))
            values.append(tf.where(mask, initial, value))
        return values

    def _fresh_non_trainable(self, first):
        """The model's non-trainable state for a restart, with one random stream per task.

        Every task gets the model's seed-generator states offset by its GLOBAL
        index (`first` + its index on this replica) in the first component, so
        the T tasks of a meta-batch draw different dropout masks (and each keeps
        advancing its own stream), whatever the number of replicas.
        """
        offsets = first + tf.range(self.num_tasks)
        values = []
        for var in self.model.non_trainable_variables:
            value = tf.convert_to_tensor(var.value)
            tiled = tf.broadcast_to(value[None], (self.num_tasks, *value.shape))
            if _is_seed_state(var):
                tiled = tiled + tf.cast(_seed_offset(offsets), tiled.dtype)
            values.append(tiled)
        return values


def _is_finite(value):
    """Elementwise finiteness in `value`'s own dtype (integers always are)."""
    value = tf.convert_to_tensor(value)
    if value.dtype.is_floating:
        return tf.math.is_finite(value)
    return tf.ones_like(value, tf.bool)
