"""`tfmeta.inner_loop` pieces shared with `tfmeta.task_batched`."""

import logging

import pytest
import tensorflow as tf

from tfmeta import inner_loop, task_batched


def test_one_quiet_pfor_silences_tensorflow_and_restores_it_on_error():
    # The vectorize_tasks=True path of InnerLoop.step and task_batched's
    # probe of what pfor can batch share one implementation.
    assert inner_loop.quiet_pfor is task_batched.quiet_pfor
    assert not hasattr(inner_loop, "_quiet_pfor")
    logger = tf.get_logger()
    assert logger.isEnabledFor(logging.ERROR)
    with pytest.raises(ValueError, match="pfor failed"):
        with inner_loop.quiet_pfor():
            assert not logger.isEnabledFor(logging.CRITICAL)
            raise ValueError("pfor failed")
    assert logger.isEnabledFor(logging.ERROR)
