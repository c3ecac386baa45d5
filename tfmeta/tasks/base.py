"""`TaskDistribution`: where `MetaModel`'s task batches come from.

A task distribution turns tasks into the stream `MetaModel.fit` consumes:
elements `(x, y)` with `x.shape == [T, S, B, *input_shape]` and
`y.shape == [T, S, B, *label_shape]` (T tasks of a meta-batch, S inner steps
per chunk, B examples per inner step). A meta-batch's T tasks keep their
order for the K inner steps of a trajectory, i.e. for K / S consecutive
chunks; then the next meta-batch of tasks is drawn.
"""

import numbers


class TaskDistribution:
    """Base class of task distributions.

    Subclasses implement `as_dataset`. Task distributions are plain Python
    objects configurable with gin.
    """

    #: Number of tasks in this distribution (of its split).
    num_tasks: int

    def as_dataset(self, *, tasks_per_batch, inner_steps, batch_size, steps_per_chunk=1, seed=0,
                   start=0, task_shard=None):
        """The infinite stream of task-batch chunks for `MetaModel.fit`.

        The stream is a deterministic function of `(seed, chunk index)`:
        `as_dataset(..., start=n)` yields exactly the elements `n, n + 1, ...`
        of `as_dataset(..., start=0)`, without producing the first `n` (this
        is how a resumed run continues its task stream, see
        `tfmeta.checkpoint`).

        Args:
            tasks_per_batch: T, tasks per meta-batch.
            inner_steps: K, inner steps per trajectory (the tasks of a
                meta-batch are kept for K / steps_per_chunk chunks).
            batch_size: B, examples per inner step.
            steps_per_chunk: S, inner steps per chunk (one `train_step`).
            seed: seed of the task and example sampling.
            start: index of the first chunk (train step) to yield.
            task_shard: None, or `(index, count)`: only the tasks
                `[index * T / count, (index + 1) * T / count)` of every
                element, equal to those tasks of the whole stream and costing
                only their input work (one worker's share; see
                `check_task_shard` and `tfmeta.distribute.task_sharded`).

        Returns the stream marked with K (`tfmeta.validation.mark_inner_steps`),
        so that `MetaModel.fit` refuses it under another `inner_steps`.
        """
        raise NotImplementedError

    @staticmethod
    def check_task_shard(task_shard, tasks_per_batch):
        """The global task range `(first, last)` of `task_shard`, or a ValueError naming the fix.

        Example::

            TaskDistribution.check_task_shard((1, 2), 8)   # (4, 8): the second half
            TaskDistribution.check_task_shard(None, 8)     # (0, 8): every task
        """
        tasks = int(tasks_per_batch)
        if task_shard is None:
            return 0, tasks
        try:
            index, count = task_shard
        except (TypeError, ValueError):
            index = count = None
        whole = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (index, count))
        if not whole or count < 1 or not 0 <= index < count:
            raise ValueError(
                f"task_shard={task_shard!r} must be (index, count) with integers "
                "0 <= index < count (this worker's index and the number of workers)."
            )
        if tasks % count:
            raise ValueError(
                f"task_shard={task_shard!r}: {tasks} tasks per meta-batch do not split evenly "
                f"over {count} shards: choose tasks_per_batch a multiple of {count} (e.g. "
                f"{-(-tasks // count) * count})."
            )
        per_shard = tasks // count
        return index * per_shard, (index + 1) * per_shard

    @staticmethod
    def check_start(start):
        """`start` as an int, or a ValueError naming the fix."""
        if isinstance(start, bool) or int(start) != start or start < 0:
            raise ValueError(
                f"start={start!r} must be a chunk index >= 0 (the number of train steps "
                "already done)."
            )
        return int(start)

    def check_chunking(self, inner_steps, steps_per_chunk):
        if steps_per_chunk < 1 or inner_steps % steps_per_chunk:
            raise ValueError(
                f"steps_per_chunk={steps_per_chunk} must be >= 1 and divide "
                f"inner_steps={inner_steps}."
            )
