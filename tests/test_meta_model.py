"""`MetaModel.fit` against Keras' whole executions (`steps_per_execution`).

Keras runs ceil(steps_per_epoch / steps_per_execution) executions of
`steps_per_execution` train steps each and stops early only where the data
ends. A `steps_per_epoch` that is not a multiple would run train steps (task
batches, and meta-updates) past the epoch: `fit` refuses it before any step.
The claim is checked against Keras itself on a plain model that counts its
train steps.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from tfmeta.replicas import batches_per_pass, check_whole_executions
from tfmeta.validation import ConfigError

T, B, D = 2, 3, 4  # tasks, examples per inner step, input features


class _CountingModel(keras.Model):
    """A plain Keras model whose train step only counts the train steps run."""

    def build(self, input_shape):
        self.steps = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False)

    def call(self, x):
        return x

    def train_step(self, data):
        self.steps.assign_add(1)
        return {"steps": self.steps.value}


def keras_train_steps(dataset, steps_per_execution, **fit_kwargs):
    model = _CountingModel()
    model.compile(steps_per_execution=steps_per_execution)
    model.build((None, D))
    model.fit(dataset, verbose=0, shuffle=False, **fit_kwargs)
    return int(model.steps.numpy())


def task_batches(count):
    """`count` task batches of one inner step each: x [T, 1, B, D], y [T, 1, B, 1]."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, T, 1, B, D)).astype("float32")
    y = rng.normal(size=(count, T, 1, B, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y))


def reptile(steps_per_execution):
    """Reptile with K = S = 1: every train step is one meta-update."""
    net = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)])
    meta = tfmeta.MetaModel(net)
    meta.compile(optimizer=keras.optimizers.SGD(0.5), inner_optimizer=keras.optimizers.SGD(0.1),
                 loss=keras.losses.MeanSquaredError(), learner=tfmeta.Reptile(), inner_steps=1,
                 steps_per_execution=steps_per_execution)
    return net, meta


def test_keras_runs_whole_executions_past_steps_per_epoch_unless_the_data_ends():
    stream = tf.data.Dataset.from_tensor_slices(np.zeros((10, 1, D), "float32"))
    # Past the epoch: 3 executions of 4 train steps each, every epoch.
    assert keras_train_steps(stream.repeat(), 4, steps_per_epoch=10) == 12
    assert keras_train_steps(stream.repeat(), 4, steps_per_epoch=10, epochs=2) == 24
    assert keras_train_steps(stream.repeat(3), 4, steps_per_epoch=10) == 12
    # The data ends first: exactly its batches, with or without steps_per_epoch.
    assert keras_train_steps(stream, 4) == 10
    assert keras_train_steps(stream, 4, steps_per_epoch=10, epochs=2) == 20


def test_fit_refuses_a_steps_per_epoch_keras_would_round_up_before_any_step():
    net, meta = reptile(steps_per_execution=4)
    stream = task_batches(8).repeat()
    meta.fit(stream, steps_per_epoch=4, verbose=0)  # built, one execution
    before = [v.numpy().copy() for v in meta.variables]
    assert int(meta.meta_updates.numpy()) == 4
    with pytest.raises(ConfigError) as error:
        meta.fit(stream, steps_per_epoch=10, epochs=2, verbose=0)
    assert str(error.value) == (
        "steps_per_epoch=10 is not a multiple of steps_per_execution=4: Keras runs whole "
        "executions of 4 train steps, so fit would run 12 train steps (task batches) per epoch "
        "instead of 10: more inner steps, and maybe meta-updates, than asked. Choose "
        "steps_per_epoch a multiple of 4 (e.g. 8 or 12), or compile with steps_per_execution "
        "dividing 10 (e.g. 2)."
    )
    for old, new in zip(before, meta.variables):
        np.testing.assert_array_equal(new.numpy(), old)
    # A finite stream longer than the epoch runs past it too.
    with pytest.raises(ConfigError, match="fit would run 4 train steps .* instead of 3"):
        meta.fit(task_batches(8), steps_per_epoch=3, verbose=0)
    # A multiple is what it says: 2 epochs of 12 train steps, one meta-update each.
    meta.fit(stream, steps_per_epoch=12, epochs=2, verbose=0)
    assert int(meta.meta_updates.numpy()) == 4 + 24


@pytest.mark.parametrize("steps_per_epoch", [None, 10, 11], ids=["no_steps", "equal", "more"])
def test_a_stream_that_ends_within_the_epoch_runs_exactly_its_batches(steps_per_epoch):
    _, meta = reptile(steps_per_execution=4)
    meta.fit(task_batches(10), steps_per_epoch=steps_per_epoch, verbose=0)
    assert int(meta.meta_updates.numpy()) == 10


def test_check_whole_executions_counts_as_keras_does():
    check_whole_executions(12, 4)
    check_whole_executions(10, 1)
    check_whole_executions(None, 4)
    check_whole_executions(10, 4, batches=10)  # the data ends at step 10
    with pytest.raises(ConfigError, match="fit would run 12 train steps .* instead of 10"):
        check_whole_executions(10, 4, batches=11)
    with pytest.raises(ConfigError, match=r"a multiple of 4 \(e.g. 4\).* dividing 3 \(e.g. 1\)"):
        check_whole_executions(3, 4)
    # keras.config.set_max_steps_per_epoch caps the epoch first.
    keras.config.set_max_steps_per_epoch(6)
    try:
        with pytest.raises(ConfigError, match="steps_per_epoch=6 .* run 8 train steps"):
            check_whole_executions(None, 4)
        check_whole_executions(100, 3)
    finally:
        keras.config.set_max_steps_per_epoch(None)


def test_batches_per_pass_as_keras_data_adapters_count():
    assert batches_per_pass(task_batches(7)) == 7
    assert batches_per_pass(task_batches(7).repeat()) is None
    assert batches_per_pass(task_batches(7).filter(lambda x, y: True)) is None
    arrays = np.zeros((100, T, 1, B, D), "float32")
    assert batches_per_pass(arrays, batch_size=8) == 13
    assert batches_per_pass(arrays) == 4  # Keras' default batch of 32
    assert batches_per_pass(arrays, steps_per_epoch=7) == 7
    assert batches_per_pass(x for x in range(3)) is None
