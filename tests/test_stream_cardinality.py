"""A task distribution's endless stream says it is endless: its cardinality is INFINITE.

`ClassificationTasks.as_dataset` is built with `flat_map`, whose length tf.data
cannot know; `MetaModel.fit` then had to say "the stream's length is unknown"
where it can say exactly how many train steps a `steps_per_epoch` would run.
What is shown: the stream and its task shards are INFINITE, their elements are
bit for bit those of the same stream built without saying so (the reference:
`assert_cardinality` replaced by the identity while building it), and `fit`'s
refusal is the definite one.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from tfmeta import distribute
from tfmeta.tasks import ClassificationTasks, random_affine
from tfmeta.validation import ConfigError

T, K, B, S = 4, 4, 3, 2
N = 7  # elements compared: more than three trajectories (K / S = 2 chunks each)


def family():
    """Six tasks of different sizes, 8x8 uint8 images, Leap's augmentation."""
    rng = np.random.default_rng(0)
    tasks = [
        (rng.integers(0, 256, (20 + 3 * i, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 20 + 3 * i),
         np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int64))
        for i in range(6)
    ]
    return ClassificationTasks(tasks, augment=random_affine())


def stream(**overrides):
    return family().as_dataset(**{**dict(tasks_per_batch=T, inner_steps=K, batch_size=B,
                                         steps_per_chunk=S, seed=5), **overrides})


def elements(dataset):
    return [tuple(v.numpy() for v in element) for element in dataset.take(N)]


@pytest.mark.parametrize("overrides", [{}, dict(start=3, with_task_ids=True), dict(task_shard=(1, 2))],
                         ids=["plain", "resumed_with_task_ids", "task_shard"])
def test_the_task_stream_is_infinite_and_unchanged_by_saying_so(overrides, monkeypatch):
    endless = stream(**overrides)
    assert int(endless.cardinality()) == tf.data.INFINITE_CARDINALITY
    with monkeypatch.context() as patch:
        patch.setattr(tf.data.experimental, "assert_cardinality", lambda n: lambda dataset: dataset)
        unsaid = stream(**overrides)
    assert int(unsaid.cardinality()) == tf.data.UNKNOWN_CARDINALITY  # what flat_map leaves
    got, want = elements(endless), elements(unsaid)
    assert len(got) == len(want) == N
    for i, (a, b) in enumerate(zip(got, want)):
        assert len(a) == len(b) == (3 if "with_task_ids" in overrides else 2)
        for part, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_array_equal(x, y, err_msg=f"element {i}, part {part}")


def test_the_shards_a_worker_makes_are_infinite_too():
    make_shard = getattr(stream(), distribute._SHARD_MAKER)
    for shard in ((0, 2), (1, 2), (3, 4)):
        assert int(make_shard(shard).cardinality()) == tf.data.INFINITE_CARDINALITY


def test_fit_on_the_task_stream_says_how_many_train_steps_it_would_run():
    """Not "the stream's length is unknown ... if it ends within the epoch": it never ends."""
    net = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    meta = tfmeta.MetaModel(net)
    meta.compile(optimizer=keras.optimizers.SGD(0.1), inner_optimizer=keras.optimizers.SGD(0.1),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 learner=tfmeta.Reptile(), inner_steps=K, steps_per_execution=4)
    before = [w.numpy().copy() for w in net.weights]
    with pytest.raises(ConfigError) as error:
        meta.fit(stream(), steps_per_epoch=10, verbose=0)
    assert str(error.value) == (
        "steps_per_epoch=10 is not a multiple of steps_per_execution=4: Keras runs whole "
        "executions of 4 train steps, so fit would run 12 train steps (task batches) per epoch "
        "instead of 10: more inner steps, and maybe meta-updates, than asked. Choose "
        "steps_per_epoch a multiple of 4 (e.g. 8 or 12), or compile with steps_per_execution "
        "dividing 10 (e.g. 2)."
    )
    # Without steps_per_epoch, Keras' cap on the epoch is what is checked.
    keras.config.set_max_steps_per_epoch(6)
    try:
        with pytest.raises(ConfigError, match=r"^steps_per_epoch=6 .*: Keras runs whole executions of 4 "
                                              r"train steps, so fit would run 8 train steps"):
            meta.fit(stream(), verbose=0)
    finally:
        keras.config.set_max_steps_per_epoch(None)
    for old, new in zip(before, net.weights):  # refused before any step
        np.testing.assert_array_equal(new.numpy(), old)
