"""`finetune` with many steps per execution gives the numbers of one step per execution.

`finetune` records each step's own loss and error inside the compiled train
step, so Keras may run many steps per execution (`steps_per_execution`).
Reference: the recorder `finetune` used before, a Keras callback that resets
the metrics before every step and reads the batch logs after it, on a plain
`fit` with one step per execution. Both run the same seeded computation in
the same process, so they must agree bit for bit (whatever kernels the CPU
picks, both runs pick the same). Data: scikit-learn's real 8x8 digits.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from tfmeta.finetune import _training_dataset, area_under_curve, finetune
from tfmeta.input_options import without_autotuning

TRAIN = slice(0, 600)
TEST = slice(1400, None)
BATCH = 20


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    return x, data.target.astype("int32")


def convnet(seed):
    """BatchNorm and dropout: state updated and random numbers drawn at every step."""
    keras.utils.set_random_seed(seed)  # also seeds the dropout layer's generator
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(8, 3, padding="same"),
            layers.MaxPooling2D(2),
            layers.BatchNormalization(momentum=0.9),
            layers.ReLU(),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(10),
        ]
    )


def optimizer(steps):
    """The many-shot meta-test's kind: Nesterov SGD, step-decayed rate, weight decay."""
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [steps // 2, 3 * steps // 4], [0.1, 0.02, 0.004]
    )
    return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=5e-4)


class PreviousRecorder(keras.callbacks.Callback):
    """The per-step recorder `finetune` used before (one step per execution)."""

    def __init__(self):
        super().__init__()
        self.losses, self.errors = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.model.reset_metrics()

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        self.errors.append(1.0 - float(logs["accuracy"]))


def previous_finetune(model, train, test, steps, seed=0):
    """`finetune` as it was: plain fit, one step per execution, the callback recorder."""
    model.compile(
        optimizer=optimizer(steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    recorder = PreviousRecorder()
    model.fit(
        without_autotuning(_training_dataset(train, BATCH, seed)),
        epochs=1,
        steps_per_epoch=steps,
        shuffle=False,
        callbacks=[recorder],
        verbose=0,
    )
    test_batches = tf.data.Dataset.from_tensor_slices(test).batch(BATCH)
    scores = model.evaluate(without_autotuning(test_batches), return_dict=True, verbose=0)
    return recorder, float(scores["loss"]), 1.0 - float(scores["accuracy"])


def assert_same_weights(model, reference):
    # Weights include BatchNorm's moving statistics; the optimizer's include
    # its iteration count and momenta.
    for got, want in zip(model.weights + model.optimizer.variables,
                         reference.weights + reference.optimizer.variables, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want)), got.path


@pytest.mark.parametrize(
    "steps, execution",
    [(1000, 50), (60, 30), (97, 1)],
    ids=["1000-steps-50-per-execution", "60-steps-30-per-execution", "prime-97-steps-one-per-execution"],
)
def test_many_steps_per_execution_give_the_one_step_recorders_numbers_bit_for_bit(digits, steps, execution):
    x, y = digits
    train, test = (x[TRAIN], y[TRAIN]), (x[TEST], y[TEST])
    reference = convnet(seed=3)
    recorder, test_loss, test_error = previous_finetune(reference, train, test, steps)
    model = convnet(seed=3)

    result = finetune(model, train, test, steps=steps, optimizer=optimizer(steps), batch_size=BATCH)

    assert model.steps_per_execution == execution  # the largest divisor of steps up to 50
    assert result.steps == steps
    assert result.losses == recorder.losses
    assert result.errors == recorder.errors
    assert result.loss_auc == area_under_curve(recorder.losses)
    assert result.error_auc == area_under_curve(recorder.errors)
    assert (result.test_loss, result.test_error) == (test_loss, test_error)
    assert_same_weights(model, reference)
    # The rate schedule stepped per step (the last quarter ran at 0.004).
    assert float(model.optimizer.learning_rate) == pytest.approx(0.004)


def test_a_dataset_input_gives_the_same_numbers_under_any_execution_size(digits):
    x, y = digits
    test = tf.data.Dataset.from_tensor_slices((x[TEST], y[TEST])).batch(BATCH)
    runs = {}
    for execution in (1, 4, 40):
        model = convnet(seed=5)
        # A fresh dataset per run, made under the same global seed: iterating
        # one reshuffling dataset again draws another order.
        batches = tf.data.Dataset.from_tensor_slices((x[TRAIN], y[TRAIN])).shuffle(600, seed=1).batch(BATCH)
        runs[execution] = (finetune(model, batches, test, steps=40, optimizer=optimizer(40),
                                    steps_per_execution=execution), model)
    (one, one_model), *others = runs.values()
    assert one_model.steps_per_execution == 1
    for result, model in others:
        assert result == one  # every field of the dataclasses
        assert_same_weights(model, one_model)


class BatchLogs(keras.callbacks.Callback):
    def __init__(self, stop_after=None):
        super().__init__()
        self.losses, self.accuracies, self.stop_after = [], [], stop_after

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        self.accuracies.append(float(logs["accuracy"]))
        if self.stop_after is not None and len(self.losses) == self.stop_after:
            self.model.stop_training = True


def test_user_callbacks_see_every_steps_own_values(digits):
    x, y = digits
    train = (x[TRAIN], y[TRAIN])
    reference = convnet(seed=2)
    recorder, _, _ = previous_finetune(reference, train, (x[TEST], y[TEST]), steps=30)
    model = convnet(seed=2)
    logs = BatchLogs()

    result = finetune(model, train, steps=30, optimizer=optimizer(30), callbacks=[logs])

    assert model.steps_per_execution == 1  # the default with callbacks
    assert logs.losses == result.losses == recorder.losses
    assert [1.0 - a for a in logs.accuracies] == result.errors == recorder.errors
    assert_same_weights(model, reference)


def test_callbacks_under_an_explicit_execution_size_see_each_executions_last_step(digits):
    x, y = digits
    logs = BatchLogs()
    result = finetune(convnet(seed=2), (x[TRAIN], y[TRAIN]), steps=30, optimizer=optimizer(30),
                      callbacks=[logs], steps_per_execution=5)
    assert result.steps == 30 and len(logs.losses) == 6
    assert logs.losses == result.losses[4::5]
    assert [1.0 - a for a in logs.accuracies] == result.errors[4::5]


def test_a_callback_that_stops_training_leaves_the_curves_of_the_steps_run(digits):
    x, y = digits
    train = (x[TRAIN], y[TRAIN])
    full = finetune(convnet(seed=4), train, steps=20, optimizer=optimizer(20), steps_per_execution=1)

    stopped = finetune(convnet(seed=4), train, steps=20, optimizer=optimizer(20),
                       callbacks=[BatchLogs(stop_after=7)])

    assert stopped.steps == 7
    assert stopped.losses == full.losses[:7] and stopped.errors == full.errors[:7]
    assert stopped.loss_auc == area_under_curve(full.losses[:7])


@pytest.mark.parametrize("steps, execution",
                         [(1, 1), (7, 7), (50, 50), (51, 17), (53, 1), (100, 50), (1000, 50), (997, 1)])
def test_auto_runs_the_largest_divisor_of_steps_up_to_50_per_execution(steps, execution):
    # A single Dense layer on a few points keeps even 1000 steps quick.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    points = (np.eye(2, dtype="float32"), np.arange(2, dtype="int32"))
    result = finetune(model, points, steps=steps, batch_size=2)
    assert model.steps_per_execution == execution
    assert result.steps == steps  # Keras ran exactly `steps`, never a rounded-up count


@pytest.mark.parametrize("bad", [7, 0, -2, 2.5, True, "fast"])
def test_an_execution_size_that_does_not_divide_steps_is_refused(bad):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    points = (np.eye(2, dtype="float32"), np.arange(2, dtype="int32"))
    with pytest.raises(ValueError, match=r"steps_per_execution=.* does not divide steps=10.*divisor"):
        finetune(model, points, steps=10, steps_per_execution=bad)


def test_the_model_trains_with_plain_keras_afterwards(digits):
    # The recording train step is gone: a later fit runs the model's own step
    # (the recording one would write past the end of its 6-step curves).
    x, y = digits
    model = convnet(seed=1)
    finetune(model, (x[TRAIN], y[TRAIN]), steps=6)
    assert "train_step" not in vars(model)
    history = model.fit(x[TRAIN], y[TRAIN], batch_size=BATCH, epochs=1, steps_per_epoch=12, verbose=0)
    assert np.isfinite(history.history["loss"][0])
