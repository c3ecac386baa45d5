"""`TaskDistribution`: where `MetaModel`'s task batches come from.

A task distribution turns tasks into the stream `MetaModel.fit` consumes:
elements `(x, y)` with `x.shape == [T, S, B, *input_shape]` and
`y.shape == [T, S, B, *label_shape]` (T tasks of a meta-batch, S inner steps
per chunk, B examples per inner step). A meta-batch's T tasks keep their
order for the K inner steps of a trajectory, i.e. for K / S consecutive
chunks; then the next meta-batch of tasks is drawn.
"""


class TaskDistribution:
    """Base class of task distributions.

    Subclasses implement `as_dataset`. Task distributions are plain Python
    objects configurable with gin.
    """

    #: Number of tasks in this distribution (of its split).
    num_tasks: int

    def as_dataset(self, *, tasks_per_batch, inner_steps, batch_size, steps_per_chunk=1, seed=0,
                   start=0):
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
        """
        raise NotImplementedError

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
