"""`MetaModel.fit` (and `MultiTaskModel.fit`) against Keras' whole executions (`steps_per_execution`).

Keras runs ceil(steps_per_epoch / steps_per_execution) executions of
`steps_per_execution` train steps each and stops early only where the data
ends. A `steps_per_epoch` that is not a multiple would run train steps (task
batches, and meta-updates) past the epoch: `fit` refuses it before any step.
The claim is checked against Keras itself on a plain model that counts its
train steps. Both fits share the check, so the tests of what they refuse
run on both.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_multitask import multi_task
from test_multitask import task_batches as multi_task_batches

import tfmeta
import tfmeta.checkpoint
from tfmeta import replicas
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


def _meta_model(steps_per_execution):
    """Reptile with K = S = 1, its task batches, its train-step count and its overrun words."""
    _, meta = reptile(steps_per_execution)
    return (meta, task_batches, lambda: int(meta.meta_updates.numpy()),
            "more inner steps, and maybe meta-updates, than asked")


def _multi_task(steps_per_execution):
    model = multi_task(steps_per_execution)
    return (model, multi_task_batches, lambda: int(model.optimizer.iterations.numpy()),
            "more multi-task steps (T task-steps each) than asked")


both_fits = pytest.mark.parametrize("make", [_meta_model, _multi_task], ids=["meta_model", "multi_task"])


@both_fits
def test_fit_refuses_a_steps_per_epoch_keras_would_round_up_before_any_step(make):
    model, batches, steps_run, overrun = make(steps_per_execution=4)
    stream = batches(8).repeat()
    model.fit(stream, steps_per_epoch=4, verbose=0)  # built, one execution
    before = [v.numpy().copy() for v in model.variables]
    assert steps_run() == 4
    with pytest.raises(ConfigError) as error:
        model.fit(stream, steps_per_epoch=10, epochs=2, verbose=0)
    assert str(error.value) == (
        "steps_per_epoch=10 is not a multiple of steps_per_execution=4: Keras runs whole "
        "executions of 4 train steps, so fit would run 12 train steps (task batches) per epoch "
        f"instead of 10: {overrun}. Choose "
        "steps_per_epoch a multiple of 4 (e.g. 8 or 12), or compile with steps_per_execution "
        "dividing 10 (e.g. 2)."
    )
    for old, new in zip(before, model.variables):
        np.testing.assert_array_equal(new.numpy(), old)
    # A finite stream longer than the epoch runs past it too.
    with pytest.raises(ConfigError, match="fit would run 4 train steps .* instead of 3"):
        model.fit(batches(8), steps_per_epoch=3, verbose=0)
    # Positional arguments count as named ones (x, y, batch_size, epochs, verbose, callbacks,
    # validation_split, validation_data, shuffle, class_weight, sample_weight, initial_epoch,
    # steps_per_epoch).
    positional = [None, None, 1, 0, None, 0.0, None, False, None, None, 0]
    with pytest.raises(ConfigError, match="fit would run 12 train steps .* instead of 10"):
        model.fit(stream, *positional, 10)
    # A multiple is what it says: 2 epochs of 12 train steps, one meta-update each.
    model.fit(stream, steps_per_epoch=12, epochs=2, verbose=0)
    assert steps_run() == 4 + 24
    model.fit(stream, *positional, 12)
    assert steps_run() == 4 + 24 + 12


@both_fits
@pytest.mark.parametrize("steps_per_epoch", [None, 10, 11], ids=["no_steps", "equal", "more"])
def test_a_stream_that_ends_within_the_epoch_runs_exactly_its_batches(make, steps_per_epoch):
    model, batches, steps_run, _ = make(steps_per_execution=4)
    model.fit(batches(10), steps_per_epoch=steps_per_epoch, verbose=0)
    assert steps_run() == 10


def test_keras_runs_a_stream_of_unknown_length_exactly_if_it_ends_within_the_epoch():
    """The reference for the refusal below: an unknown length may end first (10) or not (12)."""
    stream = tf.data.Dataset.from_tensor_slices(np.zeros((10, 1, D), "float32"))
    filtered = stream.filter(lambda x: True)
    endless = tf.data.Dataset.counter().flat_map(lambda _: stream)
    assert int(filtered.cardinality()) == int(endless.cardinality()) == tf.data.UNKNOWN_CARDINALITY
    assert keras_train_steps(filtered, 4, steps_per_epoch=10) == 10
    assert keras_train_steps(endless, 4, steps_per_epoch=10) == 12


@both_fits
def test_a_stream_of_unknown_length_is_refused_naming_its_length_as_a_fix(make):
    model, batches, steps_run, overrun = make(steps_per_execution=4)
    filtered = batches(10).filter(lambda *batch: True)
    with pytest.raises(ConfigError) as error:
        model.fit(filtered, steps_per_epoch=10, verbose=0)
    assert str(error.value) == (
        "steps_per_epoch=10 is not a multiple of steps_per_execution=4 and the stream's length "
        "is unknown (e.g. after filter, flat_map or from_generator): Keras runs whole executions "
        "of 4 train steps, so on a stream longer than the epoch fit would run up to 12 train "
        f"steps (task batches) per epoch instead of 10: {overrun}. If the stream ends within "
        "the epoch, give it its length (n <= 10 task batches: "
        "ds.apply(tf.data.experimental.assert_cardinality(n))); otherwise choose "
        "steps_per_epoch a multiple of 4 (e.g. 8 or 12), or compile with steps_per_execution "
        "dividing 10 (e.g. 2)."
    )
    # The first fix: the stream with its length runs exactly its 10 batches, as Keras does.
    model.fit(filtered.apply(tf.data.experimental.assert_cardinality(10)), steps_per_epoch=10,
              verbose=0)
    assert steps_run() == 10
    # A multiple of steps_per_execution needs no length.
    model.fit(filtered, steps_per_epoch=8, verbose=0)
    assert steps_run() == 18


@pytest.mark.parametrize("batches, steps, per_call", [(11, 10, 4), (20, 10, 4), (5, 3, 4), (11, 10, 3)])
def test_the_refusal_counts_the_train_steps_keras_runs(batches, steps, per_call):
    stream = tf.data.Dataset.from_tensor_slices(np.zeros((batches, 1, D), "float32"))
    runs = keras_train_steps(stream, per_call, steps_per_epoch=steps)
    assert runs > steps
    with pytest.raises(ConfigError, match=f"fit would run {runs} train steps .* instead of {steps}:"):
        check_whole_executions(steps, per_call, batches=batches)


@pytest.mark.parametrize("name, value", [
    ("y", np.zeros((8, T, 1, B, 1), "float32")), ("batch_size", 8),
    ("sample_weight", np.ones((8, T), "float32")), ("class_weight", {0: 1.0}),
])
def test_fit_refuses_arguments_a_task_stream_makes_meaningless_before_any_step(name, value):
    _, meta = reptile(steps_per_execution=1)
    stream = task_batches(8)
    meta.fit(stream, steps_per_epoch=2, verbose=0)
    before = [v.numpy().copy() for v in meta.variables]
    with pytest.raises(ConfigError, match=f"MetaModel.fit got {name}= with a stream of task "
                                          f"batches, .* Leave {name} out."):
        meta.fit(stream, **{name: value}, verbose=0)
    for old, new in zip(before, meta.variables):
        np.testing.assert_array_equal(new.numpy(), old)


def test_import_tfmeta_survives_a_keras_without_its_dataset_adapter():
    # Run apart: a Keras whose TFDatasetAdapter moved (its module blocked
    # after Keras is imported). The adapter is needed only by a finite
    # stream under a strategy, and its absence is then one ConfigError.
    script = (
        "import sys, keras\n"
        "sys.modules['keras.src.trainers.data_adapters.tf_dataset_adapter'] = None\n"
        "import tfmeta.meta_model, tfmeta.replicas as r\n"
        "try:\n"
        "    r._known_length_adapter()\n"
        "except r.ConfigError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"which Keras {keras.__version__} lacks" in done.stdout
    assert "install Keras 3.15" in done.stdout


def test_check_whole_executions_counts_as_keras_does():
    check_whole_executions(12, 4)
    check_whole_executions(10, 1)
    check_whole_executions(None, 4)
    check_whole_executions(10, 4, batches=10)  # the data ends at step 10
    # Keras runs 11 (test_the_refusal_counts_the_train_steps_keras_runs): the data ends first.
    with pytest.raises(ConfigError, match="fit would run 11 train steps .* instead of 10"):
        check_whole_executions(10, 4, batches=11)
    with pytest.raises(ConfigError, match="fit would run 12 train steps .* instead of 10"):
        check_whole_executions(10, 4, batches=tf.data.INFINITE_CARDINALITY)
    with pytest.raises(ConfigError, match="length is unknown.* up to 12 train steps"):
        check_whole_executions(10, 4, batches=tf.data.UNKNOWN_CARDINALITY)
    # The divisor suggested is the execution resumable_fit would run (execution_size).
    with pytest.raises(ConfigError, match=r"a multiple of 4 \(e.g. 4\).* dividing 3 \(e.g. 3\)\.$"):
        check_whole_executions(3, 4)
    with pytest.raises(ConfigError, match=r"a multiple of 5 \(e.g. 10 or 15\).* dividing 12 \(e.g. 4\)\.$"):
        check_whole_executions(12, 5)
    assert replicas.execution_size(12, 5) == tfmeta.checkpoint.execution_size(12, 5) == 4
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
