"""Diverging tasks: left out of the meta-update, counted, and fatal only when all diverge.

`MetaModel` tracks, for every task of a meta-batch, whether its inner
trajectory stayed finite (loss, gradients, parameters, meta-gradient). At a
meta-update the meta-gradient is the mean over the finite tasks only, so one
task with a NaN input or an exploding inner loop cannot turn phi into NaN;
each left-out task adds 1 to the `skipped_tasks` log. When *every* task of a
meta-update diverged, the update is skipped (phi keeps its last finite
value) and `DivergenceGuard`, which `MetaModel.fit` adds to the callbacks,
stops training with `DivergenceError` naming the likely cause.

Example::

    meta.fit(stream, steps_per_epoch=100)   # logs: loss, meta_updates, skipped_tasks
    # DivergenceError: every task's inner loop diverged (NaN/inf loss or gradients) ...
"""

from __future__ import annotations

import keras
import numpy as np

__all__ = ["DivergenceError", "DivergenceGuard"]


class DivergenceError(FloatingPointError):
    """Every task of a meta-update diverged (NaN or inf): meta-training cannot go on."""


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
    return (
        f"every task's inner loop diverged (NaN/inf loss or gradients) at meta-update "
        f"{update}, so it was skipped and phi kept its last finite value: the inner "
        f"learning rate ({shown}) is most likely too high for this model and loss; lower "
        f"it (e.g. {lower}) or clip the inner gradients (clipnorm=1.0), and check the "
        "task data for NaN/inf."
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
