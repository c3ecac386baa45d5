"""Every stream tfmeta hands to Keras has tf.data autotuning off (issue 15).

With autotuning on, a `fit` call can stall after its last step until the
autotuner's next tick (docs/performance.md). Whether a given call stalls
depends on thread scheduling, so these tests check the cause (the option on
the streams Keras receives), not wall time.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from tfmeta.finetune import finetune
from tfmeta.input_options import without_autotuning


def _autotune(dataset):
    return dataset.options().autotune.enabled


def test_without_autotuning_sets_the_option_and_keeps_explicit_choices():
    plain = tf.data.Dataset.range(4)
    assert _autotune(plain) is None
    assert _autotune(without_autotuning(plain)) is False
    assert list(without_autotuning(plain).as_numpy_iterator()) == [0, 1, 2, 3]
    chosen = tf.data.Options()
    chosen.autotune.enabled = True
    explicit = plain.with_options(chosen)
    assert _autotune(without_autotuning(explicit)) is True
    arrays = np.zeros(3)
    assert without_autotuning(arrays) is arrays


@pytest.fixture
def seen_by_keras(monkeypatch):
    """The `x` of every `keras.Model.fit` / `evaluate` call, in order."""
    seen = []
    for name in ("fit", "evaluate"):
        original = getattr(keras.Model, name)

        def spy(self, x=None, *args, _original=original, **kwargs):
            seen.append(x)
            return _original(self, x, *args, **kwargs)

        monkeypatch.setattr(keras.Model, name, spy)
    return seen


def _classifier():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def test_finetune_feeds_fit_and_evaluate_without_autotuning(seen_by_keras):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 3, 40)
    finetune(_classifier(), (x, y), (x, y), steps=3, batch_size=8)
    assert len(seen_by_keras) == 2
    assert all(_autotune(stream) is False for stream in seen_by_keras)


def test_meta_model_fit_feeds_keras_without_autotuning(seen_by_keras):
    meta = tfmeta.MetaModel(_classifier())
    meta.compile(
        optimizer=keras.optimizers.SGD(0.1),
        inner_optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        learner=tfmeta.Reptile(),
        inner_steps=2,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 1, 5, 4)).astype("float32")
    y = rng.integers(0, 3, (2, 1, 5))
    meta.fit(tf.data.Dataset.from_tensors((x, y)).repeat(), steps_per_epoch=2, verbose=0)
    assert _autotune(seen_by_keras[0]) is False



def test_fit_arguments_bind_by_keras_own_signature_even_under_a_wrapper(monkeypatch):
    """A spy on `keras.Model.fit` in place when tfmeta.replicas is first imported must not leak in.

    (`tfmeta` imports replicas lazily, so that import can come after the spy:
    the spy's `(x, *args, **kwargs)` gave fit a `kwargs=` argument.)
    """
    from tfmeta import replicas

    def spy(self, x=None, *args, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(keras.Model, "fit", spy)
    signature = replicas._keras_fit_signature()
    assert "kwargs" not in signature.parameters
    bound = signature.bind(object(), "stream", None, None, 3, steps_per_epoch=2).arguments
    assert {k: v for k, v in bound.items() if k != "self"} == {
        "x": "stream", "y": None, "batch_size": None, "epochs": 3, "steps_per_epoch": 2}
