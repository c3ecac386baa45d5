"""Ctrl-C during training: stop at the next step boundary with a checkpoint, then say how to resume.

`StopOnInterrupt` is a Keras callback; inside `stopping_on_interrupt()` the
first SIGINT only sets a flag (a second one aborts at once, as usual). At
the end of the train step in flight the callback makes sure a checkpoint of
that step exists and raises `Interrupted`, which the command line turns
into one line with the command that resumes the run. At an epoch's last
step it waits for the epoch's end, after `CSVLogger` has written the
epoch's row and `MetaCheckpoint` its checkpoint (list it after both).

Example::

    stopper = StopOnInterrupt(checkpoint)
    with stopping_on_interrupt(stopper):
        meta.fit(..., callbacks=[csv_logger, checkpoint, stopper])
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import keras

from tfmeta.cli.errors import Interrupted

__all__ = ["Interrupted", "StopOnInterrupt", "stopping_on_interrupt"]


class StopOnInterrupt(keras.callbacks.Callback):
    """Raise `Interrupted` at the first step boundary after `request()`, with a checkpoint there."""

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.requested = False

    def request(self):
        self.requested = True

    def on_train_batch_end(self, batch, logs=None):
        steps = (self.params or {}).get("steps")
        if not self.requested or (steps and batch + 1 >= steps):
            return  # an epoch's last step: stop in on_epoch_end, after its row and checkpoint
        self.checkpoint.save(epoch_complete=False)
        raise Interrupted(self.checkpoint.step, self.checkpoint.directory)

    def on_epoch_end(self, epoch, logs=None):
        if self.requested:
            self.checkpoint.save()
            raise Interrupted(self.checkpoint.step, self.checkpoint.directory)


@contextlib.contextmanager
def stopping_on_interrupt(stopper, prog="tfmeta-train"):
    """Within the block, the first SIGINT asks `stopper` to stop; the next one raises as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        signal.signal(signal.SIGINT, previous)
        print(
            f"\n{prog}: stopping after the current train step, with a checkpoint "
            "(Ctrl-C again to abort without one)...",
            file=sys.stderr,
            flush=True,
        )
        stopper.request()

    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # set outside Python: restore Python's default instead
        previous = signal.default_int_handler
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
