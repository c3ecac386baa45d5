"""Wrong setups are named for what they are, before any step; absurd losses count as diverged.

- A misspelt loss, MSE on class labels, a model without trainable weights, a
  model whose output is not a vector, a float32 loss on a float64 model:
  each a one-line `ConfigError` naming the fix, raised in `MetaModel`'s
  `__init__`, `compile` or `fit` before any train step, whether or not the
  tasks are vectorized. Only what `tf.vectorized_map` cannot do is blamed
  on `vectorize_tasks`.
- A task whose inner loss is finite but above `max_task_loss` is left out of
  the meta-update and of the logged loss, like a NaN one (checked against a
  NumPy Reptile step over the other tasks).
- Mixed precision meta-trains (phi close to the float32 run's), and
  `auto_scale_loss=True` is refused.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from tfmeta.divergence import DivergenceError
from tfmeta.inner_loop import InnerLoop, mean_loss
from tfmeta.inner_optimizer import make_stateless
from tfmeta.validation import ConfigError

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def dense(units=3, input_shape=(4,)):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(input_shape), keras.layers.Dense(units)])


def batches(x_shape=(4,), labels="classes", tasks=2, steps=2, batch=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(tasks, steps, batch, *x_shape)).astype("float32")
    if labels == "classes":
        y = rng.integers(0, 3, (tasks, steps, batch)).astype("int32")
    else:
        y = rng.normal(size=(tasks, steps, batch, labels)).astype("float32")
    return tf.data.Dataset.from_tensors((x, y)).repeat(2)


def compiled(model, loss=SCE, learner=None, vectorize=False, **kwargs):
    meta = tfmeta.MetaModel(model)
    meta.compile(optimizer=keras.optimizers.SGD(0.5), inner_optimizer=keras.optimizers.SGD(0.1),
                 loss=loss, learner=learner or tfmeta.Reptile(), inner_steps=2,
                 vectorize_tasks=vectorize, **kwargs)
    return meta


def frozen():
    model = dense()
    model.trainable = False
    return model


# ------------------------------------------------------------ wrong setups
CASES = {
    "misspelt_loss": (lambda v: compiled(dense(), "sparse_categorical_crossentropyy", vectorize=v),
                      r"unknown loss 'sparse_categorical_crossentropyy': did you mean "
                      r"'sparse_categorical_crossentropy'\?"),
    "mse_on_class_labels": (lambda v: compiled(dense(), "mse", vectorize=v).fit(batches(), verbose=0),
                            r"integer class indices .* mean_squared_error compares them elementwise"
                            r".*use keras\.losses\.SparseCategoricalCrossentropy"),
    "no_trainable_weights": (lambda v: compiled(frozen(), vectorize=v),
                             r"has no trainable weights.*unfreeze it"),
    "output_not_a_vector": (lambda v: compiled(dense(input_shape=(4, 4, 1)), vectorize=v).fit(
                                batches((4, 4, 1)), verbose=0),
                            r"output is not a vector per example: it is \(4, 4, 3\).*Flatten\(\)"),
    "float_labels_of_another_shape": (lambda v: compiled(dense(), "mse", vectorize=v).fit(
                                          batches(labels=2), verbose=0),
                                      r"labels of shape \(2,\) .*outputs of shape \(3,\).*head"),
    "float32_loss_on_float64_model": (
        lambda v: compiled(keras.Sequential([keras.Input((4,), dtype="float64"),
                                             keras.layers.Dense(3, dtype="float64")]), vectorize=v),
        r"loss computes in float32 but the model's weights are float64.*dtype='float64'"),
    "bad_max_task_loss": (lambda v: compiled(dense(), vectorize=v, max_task_loss=0),
                          r"max_task_loss=0 must be a number > 0"),
}


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vectorized"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_setups_are_named_before_any_step(case, vectorize):
    make, message = CASES[case]
    with pytest.raises(ConfigError, match=message) as raised:
        make(vectorize)
    text = str(raised.value)
    assert len(text.splitlines()) == 1, text
    assert "vectorize" not in text


class _SubclassedConv(keras.Model):
    """A model tfmeta.task_batched cannot walk (subclassed) around an op pfor cannot batch."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(2, 3)
        self.flatten = keras.layers.Flatten()
        self.head = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.head(self.flatten(self.conv(x)))


def _subclassed_conv():
    model = _SubclassedConv()
    model(np.zeros((1, 4, 4, 1), "float32"))  # built by a call: its layers get their weights
    return model


def test_a_real_pfor_failure_is_blamed_on_vectorization():
    meta = compiled(_subclassed_conv(), vectorize=True)
    with pytest.raises(ConfigError, match=r"vectorize_tasks=True cannot batch .*subclassed.*"
                                          r"Compile with vectorize_tasks='auto' or False"):
        meta.fit(batches((4, 4, 1)), verbose=0)
    # the same model runs task by task
    compiled(_subclassed_conv()).fit(batches((4, 4, 1)), verbose=0)


def test_vectorize_auto_falls_back_to_copies_with_the_reason(caplog):
    with caplog.at_level("WARNING", logger="tfmeta"):
        meta = compiled(_subclassed_conv(), vectorize="auto")
    assert meta.inner_loop.vectorize is False
    assert "runs as copies" not in caplog.text and "run as copies of the step" in caplog.text
    assert "_SubclassedConv" in caplog.text
    meta.fit(batches((4, 4, 1)), verbose=0)


def test_a_convnet_runs_its_tasks_as_one_computation():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    meta = compiled(model, vectorize=True)
    assert meta.inner_loop._batched is not None
    meta.fit(batches((4, 4, 1)), verbose=0)
    with pytest.raises(ConfigError, match="vectorize_tasks must be one of False, True or 'auto'"):
        compiled(dense(), vectorize="yes")


def test_an_error_of_the_step_itself_is_not_blamed_on_vectorization():
    class Broken(keras.losses.Loss):
        def call(self, y_true, y_pred):
            raise ValueError("this loss is broken")

    model = dense()
    optimizer = make_stateless(keras.optimizers.SGD(0.1))
    optimizer.build(model.trainable_variables)
    loop = InnerLoop(model, mean_loss(Broken()), tfmeta.Reptile(), optimizer, vectorize=True)
    params = [tf.stack([v.value] * 2) for v in model.trainable_variables]
    tasks = (params, [], [tf.stack([v.value] * 2) for v in optimizer.variables], {})
    x, y = tf.zeros((2, 4, 4)), tf.zeros((2, 4), "int32")
    with pytest.raises(ValueError, match="this loss is broken") as raised:
        tf.function(lambda: loop.step(tasks, x, y, tf.constant(0)))()
    # TF's message quotes the traced source (tf.vectorized_map lines included),
    # but the error is the loss's own, not tfmeta's advice about vectorize_tasks.
    assert not isinstance(raised.value, ConfigError)
    assert "vectorize_tasks" not in str(raised.value)


# ------------------------------------------------------------ absurd losses
def _regression(scale):
    """3 tasks, 1 inner step; task 1's targets scaled by `scale` (a finite, absurd loss)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 1, 4, 3)).astype("float32")
    y = rng.normal(size=(3, 1, 4, 2)).astype("float32")
    y[1] *= scale
    return x, y


def _reptile(max_task_loss, x, y):
    model = dense(units=2, input_shape=(3,))
    phi0 = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    meta = tfmeta.MetaModel(model)
    meta.compile(optimizer=keras.optimizers.SGD(0.5), inner_optimizer=keras.optimizers.SGD(0.1),
                 loss=keras.losses.MeanSquaredError(), learner=tfmeta.Reptile(), inner_steps=1,
                 max_task_loss=max_task_loss)
    history = meta.fit(tf.data.Dataset.from_tensors((x, y)), verbose=0)
    phi = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    return meta, phi0, phi, history.history["loss"][0]


def _numpy_reptile(phi0, x, y, tasks):
    """phi0 - beta * mean_t (phi0 - theta_1^t) over `tasks`; their losses at phi0."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    w, b = phi0
    moved, losses = [], []
    for t in tasks:
        r = x[t, 0] @ w + b - y[t, 0]
        losses.append(np.mean(r**2))
        grads = [2.0 / r.size * x[t, 0].T @ r, 2.0 / r.size * r.sum(0)]
        moved.append([np.float32(0.1) * g for g in grads])  # phi0 - theta_1 = lr * g
    return [p - 0.5 * np.mean(m, axis=0) for p, m in zip(phi0, zip(*moved))], np.mean(losses)


def test_a_finite_but_absurd_loss_is_left_out_like_a_nan_one():
    x, y = _regression(scale=1e12)  # task 1's loss ~1e24: finite in float32
    meta, phi0, phi, logged = _reptile(1e10, x, y)
    expected, loss = _numpy_reptile(phi0, x, y, tasks=[0, 2])
    for a, e in zip(phi, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logged, loss, rtol=1e-5)
    assert int(meta.skipped_tasks.numpy()) == 1 and int(meta.meta_updates.numpy()) == 1
    # without the limit the absurd task drags phi by ~1e10: the limit is what keeps it out
    _, _, unguarded, unguarded_loss = _reptile(None, x, y)
    assert max(np.max(np.abs(p)) for p in unguarded) > 1e9
    assert unguarded_loss > 1e20


def test_every_task_absurd_stops_naming_max_task_loss():
    x, y = _regression(scale=1.0)
    with pytest.raises(DivergenceError, match=r"or a loss above max_task_loss=1e-06\)") as raised:
        _reptile(1e-6, x, y)
    assert len(str(raised.value).splitlines()) == 1


# ------------------------------------------------------------ mixed precision
@pytest.fixture
def policy():
    previous = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(previous)


def _meta_train(learner, steps_per_chunk=2):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(3)])
    meta = compiled(model, learner=learner)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 2, steps_per_chunk, 5, 4)).astype("float32")
    y = rng.integers(0, 3, (4, 2, steps_per_chunk, 5)).astype("int32")
    meta.fit(tf.data.Dataset.from_tensor_slices((x, y)), verbose=0)
    return [v.numpy() for v in model.trainable_variables], meta


@pytest.mark.parametrize(
    "learner, steps_per_chunk",
    [(tfmeta.Leap, 2), (tfmeta.Reptile, 2), (lambda: tfmeta.FOMAML("all"), 2),
     (lambda: tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile()), 1)],
    ids=["leap", "reptile", "fomaml_all", "cts"],
)
@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_meta_trains_close_to_float32(policy, name, learner, steps_per_chunk):
    start = _initial_phi()
    reference, _ = _meta_train(learner(), steps_per_chunk)
    policy(name)
    mixed, meta = _meta_train(learner(), steps_per_chunk)
    assert type(meta.optimizer).__name__ == "SGD"  # never a LossScaleOptimizer
    moved = max(np.max(np.abs(r - p)) for r, p in zip(reference, start))
    assert moved > 1e-2
    # Measured: within 0.1% (float16, 11 mantissa bits) and 0.6% (bfloat16,
    # 8 bits) of phi's move; the bounds leave ten times that.
    share = {"mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}[name]
    for r, m in zip(reference, mixed):
        np.testing.assert_allclose(m, r, atol=share * moved)


def _initial_phi():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(3)])
    return [v.numpy() for v in model.trainable_variables]


def test_auto_scale_loss_is_refused():
    with pytest.raises(ConfigError, match=r"auto_scale_loss=True.*leave auto_scale_loss out"):
        compiled(dense(), auto_scale_loss=True)
