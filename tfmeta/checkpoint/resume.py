"""`resumable_fit`: `fit` a run resumed in the middle of an epoch so its epochs fall where they did.

Example::

    from tfmeta.checkpoint import MetaCheckpoint, resumable_fit

    checkpoint = MetaCheckpoint("runs/x/checkpoints", every_steps=100)
    start = checkpoint.restore(meta, x_shape)
    history = resumable_fit(meta, lambda begin: tasks.as_dataset(..., start=begin),
                            total_steps=1000, epochs=10, start=start, callbacks=[checkpoint])
"""

from __future__ import annotations

import contextlib

from tfmeta.checkpoint.errors import IncompatibleCheckpointError
from tfmeta.checkpoint.store import log
from tfmeta.replicas import execution_size

__all__ = ["execution_size", "resumable_fit"]


def resumable_fit(meta, make_dataset, *, total_steps, epochs, start=0, callbacks=(), **fit_kwargs):
    """`meta.fit` over train steps `start..total_steps`, split into `epochs` epochs.

    `make_dataset(start)` returns the task stream from chunk `start` on. A
    run resumed in the middle of epoch e first finishes that epoch (a fit of
    the remaining steps with `initial_epoch=e`), then runs the later epochs,
    so epoch boundaries, and hence logs, fall where the uninterrupted run's
    do. Each fit runs in whole executions of `execution_size(steps,
    meta.steps_per_execution)` train steps, so a checkpoint written under
    any `steps_per_execution` resumes under any other (the execution size
    changes how many train steps one call runs, not what they compute); a
    size below the compiled one is logged (one line, `tfmeta.checkpoint`
    logger, INFO), and `meta.steps_per_execution` is the compiled one again
    afterwards.
    Returns the merged `history.history` dict.
    """
    if total_steps % epochs:
        raise ValueError(f"total_steps={total_steps} does not split into epochs={epochs}.")
    per_epoch = total_steps // epochs
    if start > total_steps:
        raise IncompatibleCheckpointError(
            f"the checkpoint has {start} train steps done but the run has only "
            f"{total_steps}: fit at least {start} train steps, or start a new run."
        )
    epoch, done = divmod(start, per_epoch)
    merged: dict = {}

    def fit(steps, first, last, begin):
        size = execution_size(steps, getattr(meta, "steps_per_execution", 1))
        with _executions_of(meta, size, steps):
            history = meta.fit(
                make_dataset(begin),
                steps_per_epoch=steps,
                initial_epoch=first,
                epochs=last,
                callbacks=list(callbacks),
                **fit_kwargs,
            )
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(values)

    if done:
        fit(per_epoch - done, epoch, epoch + 1, start)
        epoch += 1
    if epoch < epochs:
        fit(per_epoch, epoch, epochs, epoch * per_epoch)
    return merged


@contextlib.contextmanager
def _executions_of(meta, size, steps):
    """`meta.steps_per_execution = size` within the block (a fit of `steps` per epoch), the compiled value again after it."""
    compiled = getattr(meta, "steps_per_execution", 1)
    if size == compiled:
        yield
        return
    log.info(
        "steps_per_execution=%d does not divide this fit's %d train steps per epoch: "
        "running executions of %d instead.", compiled, steps, size,
    )
    # Keras traces steps_per_execution into its train function and reuses that
    # function in every later fit: drop it whenever the size changes.
    meta.steps_per_execution, meta.train_function = size, None
    try:
        yield
    finally:
        meta.steps_per_execution, meta.train_function = compiled, None
