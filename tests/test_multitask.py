"""`MultiTaskModel.fit` against Keras' whole executions (`steps_per_execution`).

Keras runs ceil(steps_per_epoch / steps_per_execution) executions of
`steps_per_execution` train steps and stops early only where the data ends,
so a `steps_per_epoch` that is not a multiple runs multi-task steps past
the epoch (Keras' own `fit` is the reference: it counts them in
`optimizer.iterations`). `MultiTaskModel.fit` refuses it before any step,
with the check `MetaModel.fit` uses (`tfmeta.replicas.check_whole_executions`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmeta.multitask import MultiTaskModel
from tfmeta.validation import ConfigError

T, B, D = 2, 3, 4  # tasks, examples per task and step, input features


def multi_task(steps_per_execution):
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((D,)), keras.layers.Dense(3, activation="tanh"),
                            keras.layers.Dense(2, name="head")])
    model = MultiTaskModel(net, num_classes=[2, 2], seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), steps_per_execution=steps_per_execution)
    return model


def task_batches(count):
    """`count` multi-task batches: x [T, 1, B, D], y [T, 1, B], task ids [T]."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, T, 1, B, D)).astype("float32")
    y = rng.integers(0, 2, size=(count, T, 1, B)).astype("int32")
    ids = np.tile(np.arange(T, dtype="int32"), (count, 1))
    return tf.data.Dataset.from_tensor_slices((x, y, ids))


def test_keras_itself_runs_whole_executions_past_the_epoch():
    """The reference: Keras' own fit runs 12 steps for steps_per_epoch=10 at 4 per execution."""
    model = multi_task(steps_per_execution=4)
    keras.Model.fit(model, task_batches(4).repeat(), steps_per_epoch=10, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 12


def test_fit_refuses_a_steps_per_epoch_keras_would_round_up():
    model = multi_task(steps_per_execution=4)
    stream = task_batches(4).repeat()
    model.fit(stream, steps_per_epoch=4, verbose=0)  # builds the model and the optimizer
    before = [v.numpy() for v in model.variables]
    with pytest.raises(ConfigError) as error:
        model.fit(stream, steps_per_epoch=10, epochs=2, verbose=0)
    assert str(error.value) == (
        "steps_per_epoch=10 is not a multiple of steps_per_execution=4: Keras runs whole "
        "executions of 4 train steps, so fit would run 12 train steps (task batches) per epoch "
        "instead of 10: more multi-task steps (T task-steps each) than asked. Choose "
        "steps_per_epoch a multiple of 4 (e.g. 8 or 12), or compile with steps_per_execution "
        "dividing 10 (e.g. 2)."
    )
    for old, new in zip(before, model.variables):
        np.testing.assert_array_equal(new.numpy(), old)
    # A finite stream longer than the epoch runs past it too.
    with pytest.raises(ConfigError, match="fit would run 4 train steps .* instead of 3"):
        model.fit(task_batches(8), steps_per_epoch=3, verbose=0)
    # A multiple runs what it says: 2 epochs of 12 steps.
    model.fit(stream, steps_per_epoch=12, epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4 + 24


@pytest.mark.parametrize("steps_per_epoch", [None, 10, 11], ids=["no_steps", "equal", "more"])
def test_a_stream_that_ends_within_the_epoch_runs_exactly_its_batches(steps_per_epoch):
    model = multi_task(steps_per_execution=4)
    model.fit(task_batches(10), steps_per_epoch=steps_per_epoch, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 10
