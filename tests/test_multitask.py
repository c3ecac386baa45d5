"""`MultiTaskModel.fit` against Keras' whole executions (`steps_per_execution`).

Keras runs ceil(steps_per_epoch / steps_per_execution) executions of
`steps_per_execution` train steps and stops early only where the data ends,
so a `steps_per_epoch` that is not a multiple runs multi-task steps past
the epoch (Keras' own `fit` is the reference: it counts them in
`optimizer.iterations`). `MultiTaskModel.fit` refuses it before any step,
with the check `MetaModel.fit` uses (`tfmeta.replicas.check_whole_executions`):
tests/test_meta_model.py runs the tests of what both fits refuse on both
(`multi_task` and `task_batches` here are its multi-task side).
"""

import keras
import numpy as np
import tensorflow as tf

from tfmeta.multitask import MultiTaskModel

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


def test_fit_on_a_task_stream_does_not_warn_about_shuffle():
    """Keras warns that `shuffle=True` (its default) is ignored for a dataset; task streams never shuffle."""
    import warnings

    model = multi_task(steps_per_execution=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(task_batches(4), steps_per_epoch=4, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4
    assert not [w for w in caught if "shuffle" in str(w.message)], [str(w.message) for w in caught]
