"""`Finetuner` gives `finetune`'s numbers bit for bit, tracing Keras' functions once per architecture.

Reference: `finetune` itself, a fresh compile per run, on the same model in
the same process (so both pick the same kernels whatever the CPU). The runs
interleave architectures and repeat one, so a state left behind by an
earlier run (optimizer slots, its iteration count and so its learning-rate
schedule, BatchNorm statistics, the dropout generator, the per-step curves)
would show as a difference. Data: scikit-learn's real 8x8 digits.
"""

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

from tfmeta.finetune import Finetuner, finetune, random_initialization
from tfmeta.heads import with_new_head

STEPS = 30


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    return (x[:400], data.target[:400]), (x[1500:], data.target[1500:])


def body(filters, seed):
    """BatchNorm and dropout: state updated and random numbers drawn at every step."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)), layers.Conv2D(filters, 3, padding="same"), layers.MaxPooling2D(2),
        layers.BatchNormalization(momentum=0.9), layers.ReLU(), layers.Dropout(0.25), layers.Flatten(),
        layers.Dense(10),
    ])


def optimizer():
    """The many-shot meta-test's kind: Nesterov SGD, step-decayed rate, weight decay."""
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([10, 20], [0.1, 0.02, 0.004])
    return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=5e-4)


def fresh(init, classes, head_seed):
    """A new model object every time (new layer names), as the benchmark makes them.

    Its dropout generator's seed comes from the clone's seed (5), its head from `head_seed`.
    """
    copy = random_initialization(init, seed=5)
    copy.set_weights(init.get_weights())
    keras.utils.set_random_seed(head_seed)
    return with_new_head(copy, classes)


def test_finetuner_equals_finetune_bit_for_bit_across_architectures_and_repeats(digits):
    (x, y), (xt, yt) = digits
    inits = {"a": body(8, 1), "b": body(8, 2)}
    tune = Finetuner(steps=STEPS, optimizer=optimizer(), batch_size=16)
    # Another init into the same compiled copy, another head size, then back.
    runs = [("a", 10), ("b", 10), ("a", 5), ("b", 10)]
    for number, (name, classes) in enumerate(runs):
        ours, reference = fresh(inits[name], classes, number), fresh(inits[name], classes, number)
        data, test = (x, y % classes), (xt, yt % classes)
        want = finetune(reference, data, test, steps=STEPS, optimizer=optimizer(), batch_size=16,
                        seed=number)
        got = tune(ours, data, test, seed=number)
        assert got.losses == want.losses and got.errors == want.errors, (number, name, classes)
        assert (got.test_loss, got.test_error) == (want.test_loss, want.test_error)
        # The model given is fine-tuned in place, as finetune's is.
        for mine, theirs in zip(ours.get_weights(), reference.get_weights(), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    # 10 and 5 classes: two, despite new layer names in every run.
    assert tune.architectures == 2


def test_a_model_keras_cannot_clone_is_refused_with_the_fix():
    class Opaque(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

        def get_config(self):
            raise NotImplementedError

    model = Opaque()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="get_config.*finetune()"):
        Finetuner(steps=2)(model, (np.zeros((4, 4), "float32"), np.zeros(4, "int32")))


def test_finetuner_checks_steps_like_finetune():
    with pytest.raises(ValueError, match="steps=0 must be an integer >= 1"):
        Finetuner(steps=0)
    with pytest.raises(ValueError, match=r"steps=4\.5 must be an integer >= 1"):
        Finetuner(steps=4.5)
    with pytest.raises(ValueError, match="does not divide"):
        Finetuner(steps=10, steps_per_execution=3)


def test_an_optimizer_whose_config_would_drop_a_setting_is_refused():
    """`exclude_from_weight_decay` is not in an optimizer's config, which each working copy is made from."""
    model = body(4, 0)
    sgd = keras.optimizers.SGD(0.1, weight_decay=1e-3)
    sgd.exclude_from_weight_decay(var_names=["bias"])
    with pytest.raises(ValueError, match="exclude_from_weight_decay: fine-tune with finetune()"):
        Finetuner(steps=2, optimizer=sgd)(model, (np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, "int32")))
