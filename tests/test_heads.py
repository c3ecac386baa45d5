"""`tfmeta.heads.with_new_head`: the new model is called as the old one is, without warnings."""

import warnings

import keras
import numpy as np
import pytest

from tfmeta.heads import with_new_head


def _functional(as_list):
    inputs = keras.Input((4,), name="pixels")
    hidden = keras.layers.Dense(6, activation="relu", name="trunk")(inputs)
    outputs = keras.layers.Dense(3, name="head")(hidden)
    return keras.Model([inputs] if as_list else inputs, outputs)


def _sequential():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu", name="trunk"),
                             keras.layers.Dense(3, name="head")])


@pytest.mark.parametrize("make, call_with_list", [
    (lambda: _functional(as_list=False), False),
    (lambda: _functional(as_list=True), True),
    (_sequential, False),
], ids=["functional", "functional_list", "sequential"])
def test_a_model_with_a_new_head_takes_the_old_inputs_without_warnings(make, call_with_list):
    keras.utils.set_random_seed(0)
    model = make()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    new = with_new_head(model, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = new([x] if call_with_list else x).numpy()
        model([x] if call_with_list else x)
    assert [str(w.message) for w in caught] == []
    # NumPy: the old trunk, then the new head.
    kernel, bias = model.get_layer("trunk").get_weights()
    w, b = new.layers[-1].get_weights()
    assert w.shape == (6, 7)
    np.testing.assert_allclose(out, np.maximum(x @ kernel + bias, 0.0) @ w + b, rtol=1e-5, atol=1e-5)
