"""`resumable_fit`: `fit` a run resumed in the middle of an epoch so its epochs fall where they did.

Example::

    from tfmeta.checkpoint import MetaCheckpoint, resumable_fit

    checkpoint = MetaCheckpoint("runs/x/checkpoints", every_steps=100)
    start = checkpoint.restore(meta, x_shape)
    history = resumable_fit(meta, lambda begin: tasks.as_dataset(..., start=begin),
                            total_steps=1000, epochs=10, start=start, callbacks=[checkpoint])
"""

from __future__ import annotations

from tfmeta.checkpoint.errors import IncompatibleCheckpointError

__all__ = ["resumable_fit"]


def resumable_fit(meta, make_dataset, *, total_steps, epochs, start=0, callbacks=(), **fit_kwargs):
    """`meta.fit` over train steps `start..total_steps`, split into `epochs` epochs.

    `make_dataset(start)` returns the task stream from chunk `start` on. A
    run resumed in the middle of epoch e first finishes that epoch (a fit of
    the remaining steps with `initial_epoch=e`), then runs the later epochs,
    so epoch boundaries, and hence logs, fall where the uninterrupted run's
    do. Returns the merged `history.history` dict.
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
