"""Diverging tasks: left out of the meta-update, counted, and fatal only when all diverge.

`MetaModel` tracks, for every task of a meta-batch, whether its inner
trajectory stayed finite (loss, gradients, parameters, meta-gradient). At a
meta-update the meta-gradient is the mean over the finite tasks only, so one
task with a NaN input or an exploding inner loop cannot turn phi into NaN;
each left-out task adds 1 to the `skipped_tasks` log. When *every* task of a
meta-update diverged, the update is skipped (phi keeps its last finite
value) and `DivergenceGuard`, which `MetaModel.fit` adds to the callbacks,
stops training with `DivergenceError` naming the likely cause.

A loss that is finite but absurd is as bad as a NaN one: an inner loss
above `max_task_loss` in absolute value (`MetaModel.compile`, default
`DEFAULT_MAX_TASK_LOSS` = 1e10: far above any loss of normalized data, far
below float32's overflow) makes that step's loss, the parameters it
reaches and their inner optimizer state NaN (`diverged_as_nan`), so the
task diverges like any other: left out of the logged loss and of the
meta-update, counted in `skipped_tasks`, and fatal only when every task of
a meta-update is. A NaN or inf loss is treated the same way, even where
the gradients stayed finite.

Example::

    meta.fit(stream, steps_per_epoch=100)   # logs: loss, meta_updates, skipped_tasks
    # DivergenceError: every task's inner loop diverged (NaN/inf loss or gradients,
    # or a loss above max_task_loss=1e+10) at meta-update 1, ...
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

__all__ = ["DEFAULT_MAX_TASK_LOSS", "DivergenceError", "DivergenceGuard", "diverged_as_nan"]

#: Inner losses above this (in absolute value) count as diverged.
DEFAULT_MAX_TASK_LOSS = 1e10


class DivergenceError(FloatingPointError):
    """Every task of a meta-update diverged (NaN, inf or an absurd loss): training cannot go on."""


def diverged_as_nan(loss, values, max_task_loss=None):
    """`(loss, values)`, float leaves all NaN when the loss is NaN, inf or above `max_task_loss`.

    `values` is any structure of tensors (a task's new parameters and
    optimizer state); integer leaves (step counts) are kept.

    Example:
        >>> loss, params = diverged_as_nan(tf.constant(1e27), [tf.ones(2)], max_task_loss=1e10)
        >>> float(loss), params[0].numpy()
        (nan, array([nan, nan], dtype=float32))
    """
    if max_task_loss is None:
        diverged = tf.logical_not(tf.math.is_finite(loss))
    else:
        diverged = tf.logical_not(tf.abs(loss) <= tf.cast(max_task_loss, loss.dtype))

    def poison(value):
        if not value.dtype.is_floating:
            return value
        return tf.where(diverged, tf.constant(float("nan"), value.dtype), value)

    return poison(loss), tf.nest.map_structure(poison, values)


def _learning_rate(optimizer):
    try:
        return float(np.asarray(optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):
        return None


def divergence_message(meta):
    """The one-line explanation of a meta-update where every task diverged."""
    optimizer = getattr(meta, "inner_optimizer", None)
    name = type(optimizer).__name__ if optimizer is not None else "inner optimizer"
    rate = _learning_rate(optimizer) if optimizer is not None else None
    shown = f"{name} learning_rate={rate:g}" if rate is not None else name
    lower = f"inner/{name}.learning_rate = {rate / 10:g}" if rate else "a smaller learning rate"
    update = int(np.asarray(meta.meta_updates.numpy())) + 1
    limit = getattr(meta, "max_task_loss", None)
    cause = "NaN/inf loss or gradients" + (f", or a loss above max_task_loss={limit:g}" if limit else "")
    expected = (
        f" (or, if losses above {limit:g} are expected, raise max_task_loss: "
        "MetaModel.compile(max_task_loss=...), train.max_task_loss in gin)"
    ) if limit else ""
    return (
        f"every task's inner loop diverged ({cause}) at meta-update "
        f"{update}, so it was skipped and phi kept its last finite value: the inner "
        f"learning rate ({shown}) is most likely too high for this model and loss; lower "
        f"it (e.g. {lower}) or clip the inner gradients (clipnorm=1.0), and check the "
        f"task data for NaN/inf and its scale{expected}."
    )


class DivergenceGuard(keras.callbacks.Callback):
    """Stop `fit` with `DivergenceError` once a meta-update had no finite task.

    `MetaModel.fit` adds one unless the callbacks already hold one.
    """

    def __init__(self):
        super().__init__()
        self._seen = None

    def _count(self):
        variable = getattr(self.model, "diverged_updates", None)
        return None if variable is None else int(np.asarray(variable.numpy()))

    def on_train_begin(self, logs=None):
        self._seen = self._count()

    def on_train_batch_end(self, batch, logs=None):
        count = self._count()
        if self._seen is None:  # built lazily, on the first train step
            self._seen = 0
        if count is not None and count > self._seen:
            self._seen = count
            self.model.stop_training = True
            raise DivergenceError(divergence_message(self.model))
