"""Task distributions on real data: Omniglot alphabets, MNIST/Fashion-MNIST, sklearn digits.

Omniglot and MNIST tests use the `tfds_dir` fixture (TFDS prepared from the
real archives; skipped where the archives are absent, failing under CI). The
first Omniglot call builds the decoded-array cache (~15 s); later runs load it.
The digits tests need no fixture: scikit-learn ships the data.
"""

import hashlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmeta.prepare import DatasetNotPreparedError
from tfmeta.tasks.base import TaskDistribution
from tfmeta.tasks import random_affine
from tfmeta.tasks.classification import ClassificationTask, ClassificationTasks
from tfmeta.tasks.datasets import datasets_as_tasks
from tfmeta.tasks.digits import digits_tasks
from tfmeta.tasks.omniglot import omniglot_alphabets, omniglot_arrays

# Alphabets of TFDS omniglot 3.0.0 (train + test = 50) with >= 20 characters,
# counted from the data: character counts range from 14 to 55, and four
# alphabets have fewer than 20 (14, 14, 16, 17).
ELIGIBLE_ALPHABETS = 46


def take(stream, n):
    return [(x.numpy(), y.numpy()) for x, y in stream.take(n)]


def digest(image):
    """Identity of a float image in [0, 1] as its uint8 bytes."""
    return hashlib.sha1(np.round(image * 255).astype(np.uint8).tobytes()).hexdigest()


def members(task):
    """{image digest: label} of a task's train set."""
    return {digest(x.astype(np.float32) / 255): int(y) for x, y in zip(task.x_train, task.y_train)}


# ---------------------------------------------------------------- Omniglot
@pytest.fixture(scope="module")
def omniglot(tfds_dir):
    return omniglot_alphabets(num_pretrain=None, num_heldout=10, seed=0, data_dir=tfds_dir)


@pytest.mark.data
def test_omniglot_alphabet_counts(tfds_dir, omniglot):
    arrays = omniglot_arrays(data_dir=tfds_dir)
    assert arrays["image"].shape == (32460, 28, 28, 1) and arrays["image"].dtype == np.uint8
    assert len(arrays["alphabet_names"]) == 50
    assert len(np.unique(arrays["label"])) == 1623
    counts = [len(np.unique(arrays["label"][arrays["alphabet"] == a])) for a in range(50)]
    assert sum(c >= 20 for c in counts) == ELIGIBLE_ALPHABETS
    # Inverted: strokes bright on a dark background.
    assert np.median(arrays["image"]) == 0

    pretrain, heldout = omniglot
    assert isinstance(pretrain, TaskDistribution)
    assert (pretrain.num_tasks, heldout.num_tasks) == (ELIGIBLE_ALPHABETS - 10, 10)
    assert not set(pretrain.task_names) & set(heldout.task_names)
    assert len(set(pretrain.task_names)) == pretrain.num_tasks

    small, small_heldout = omniglot_alphabets(num_pretrain=5, seed=0, data_dir=tfds_dir)
    # Held-out alphabets do not depend on num_pretrain; pretraining sets are nested.
    assert small_heldout.task_names == heldout.task_names
    assert small.task_names == pretrain.task_names[:5]
    with pytest.raises(ValueError, match="at most 36"):
        omniglot_alphabets(num_pretrain=37, data_dir=tfds_dir)


@pytest.mark.data
def test_omniglot_tasks_shapes_labels_and_splits(omniglot):
    pretrain, heldout = omniglot
    for family in (pretrain, heldout):
        assert family.input_shape == (28, 28, 1) and family.num_classes == 20
        for i in range(family.num_tasks):
            task = family.task(i)
            assert task.x_train.shape == (300, 28, 28, 1) and task.x_test.shape == (100, 28, 28, 1)
            assert task.x_train.dtype == np.uint8
            # 20 characters, labels 0..19, 15 train / 5 test drawings each.
            assert np.array_equal(np.bincount(task.y_train, minlength=20), np.full(20, 15))
            assert np.array_equal(np.bincount(task.y_test, minlength=20), np.full(20, 5))
    # Train and test drawings of a task are different images.
    task = heldout.task(0)
    train = {x.tobytes() for x in task.x_train}
    assert not any(x.tobytes() in train for x in task.x_test)


@pytest.mark.data
def test_omniglot_is_deterministic_under_its_seed(tfds_dir, omniglot):
    pretrain, _ = omniglot
    again, _ = omniglot_alphabets(num_pretrain=None, seed=0, data_dir=tfds_dir)
    other, _ = omniglot_alphabets(num_pretrain=None, seed=1, data_dir=tfds_dir)
    assert again.task_names == pretrain.task_names
    assert np.array_equal(again.task(3).x_train, pretrain.task(3).x_train)
    assert np.array_equal(again.task(3).y_test, pretrain.task(3).y_test)
    assert other.task_names != pretrain.task_names


@pytest.mark.data
def test_omniglot_stream_format_determinism_and_trajectories(omniglot):
    pretrain, _ = omniglot
    T, K, B, S = 3, 4, 5, 2
    stream = pretrain.as_dataset(tasks_per_batch=T, inner_steps=K, batch_size=B,
                                 steps_per_chunk=S, seed=7)
    x_spec, y_spec = stream.element_spec
    assert x_spec.shape == (T, S, B, 28, 28, 1) and x_spec.dtype == tf.float32
    assert y_spec.shape == (T, S, B) and y_spec.dtype == tf.int32

    chunks = take(stream, 3 * K // S)  # three trajectories
    keras.utils.set_random_seed(123)   # the stream ignores global seeds
    same = take(pretrain.as_dataset(tasks_per_batch=T, inner_steps=K, batch_size=B,
                                    steps_per_chunk=S, seed=7), 3 * K // S)
    other = take(pretrain.as_dataset(tasks_per_batch=T, inner_steps=K, batch_size=B,
                                     steps_per_chunk=S, seed=8), 3 * K // S)
    for (x, y), (x2, y2) in zip(chunks, same):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert any(not np.array_equal(x, x2) for (x, _), (x2, _) in zip(chunks, other))

    for x, y in chunks:
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5
        assert y.min() >= 0 and y.max() < 20

    # Every chunk of trajectory m holds the tasks task_ids(m), in order: each
    # image is one of that task's train images, with that image's label.
    stores = {}
    drawn = []
    for m in range(3):
        ids = pretrain.task_ids(m, T, seed=7)
        assert len(set(ids)) == T
        drawn.append(tuple(ids))
        for x, y in chunks[m * K // S:(m + 1) * K // S]:
            for t, task in enumerate(ids):
                store = stores.setdefault(task, members(pretrain.task(task)))
                for image, label in zip(x[t].reshape(-1, 28, 28, 1), y[t].reshape(-1)):
                    assert store[digest(image)] == label
    assert len(set(drawn)) > 1  # new tasks per meta-batch


@pytest.mark.data
def test_omniglot_augmentation(omniglot):
    pretrain, _ = omniglot
    kwargs = dict(tasks_per_batch=2, inner_steps=2, batch_size=8, steps_per_chunk=2, seed=3)
    (plain_x, plain_y), = take(pretrain.as_dataset(**kwargs), 1)
    (aug_x, aug_y), = take(pretrain.as_dataset(augment=random_affine(), **kwargs), 1)
    (aug_x2, aug_y2), = take(pretrain.as_dataset(augment=random_affine(), **kwargs), 1)
    (seed_x, _), = take(pretrain.as_dataset(augment=random_affine(), **{**kwargs, "seed": 4}), 1)
    assert np.array_equal(plain_y, aug_y)               # same examples, same labels
    assert np.abs(plain_x - aug_x).mean() > 0.05         # images transformed
    assert np.array_equal(aug_x, aug_x2) and np.array_equal(aug_y, aug_y2)
    assert not np.array_equal(aug_x, seed_x)
    assert aug_x.min() >= 0.0 and aug_x.max() <= 1.0
    # Ink is moved around, not destroyed (zoom range 0.8-1.2).
    ratio = aug_x.sum(axis=(-3, -2, -1)) / plain_x.sum(axis=(-3, -2, -1))
    assert 0.5 < ratio.mean() < 1.6


@pytest.mark.data
def test_omniglot_finetune_data(omniglot):
    _, heldout = omniglot
    train = take(heldout.finetune_data(2, batch_size=20, seed=0), 16)  # > 1 epoch of 300
    assert all(x.shape == (20, 28, 28, 1) and y.shape == (20,) for x, y in train)
    first_epoch = np.concatenate([x for x, _ in train])[:300]
    assert len({digest(image) for image in first_epoch}) == 300
    test = take(heldout.finetune_data(2, "test", batch_size=32), 100)
    assert [len(y) for _, y in test] == [32, 32, 32, 4]
    assert np.array_equal(np.concatenate([y for _, y in test]), heldout.task(2).y_test)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST
@pytest.mark.data
def test_mnist_and_fashion_as_tasks(tfds_dir):
    tasks = datasets_as_tasks(("mnist", "fashion_mnist"), train_examples=2000,
                              test_examples=500, data_dir=tfds_dir)
    assert tasks.num_tasks == 2 and tasks.num_classes == 10
    assert tasks.task_names == ["mnist", "fashion_mnist"] and tasks.input_shape == (28, 28, 1)
    mnist, fashion = tasks.task(0), tasks.task(1)
    for task in (mnist, fashion):
        assert task.x_train.shape == (2000, 28, 28, 1) and task.x_test.shape == (500, 28, 28, 1)
        assert set(np.unique(task.y_train)) == set(range(10))
    # Different datasets (a shared extraction folder once built Fashion from MNIST).
    assert np.abs(mnist.x_train.astype(float).mean(0) - fashion.x_train.astype(float).mean(0)).mean() > 10
    (x, y), = take(tasks.as_dataset(tasks_per_batch=2, inner_steps=3, batch_size=4,
                                    steps_per_chunk=3), 1)
    assert x.shape == (2, 3, 4, 28, 28, 1) and y.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="tasks_per_batch=3 exceeds the 2 tasks"):
        tasks.as_dataset(tasks_per_batch=3, inner_steps=3, batch_size=4)


def test_unprepared_dataset_names_the_fix(tmp_path):
    with pytest.raises(DatasetNotPreparedError, match="prepare_data.py"):
        datasets_as_tasks(("mnist",), data_dir=tmp_path / "tfds")


# ---------------------------------------------------------------- sklearn digits
def test_digits_family_shapes_and_counts():
    pretrain, heldout = digits_tasks(seed=0)
    assert (pretrain.num_tasks, heldout.num_tasks) == (100, 20)
    assert pretrain.input_shape == (8, 8, 1) and pretrain.num_classes == 5
    task = heldout.task(0)
    assert task.x_train.shape == (100, 8, 8, 1) and task.x_test.shape == (50, 8, 8, 1)
    assert np.array_equal(np.bincount(task.y_train), np.full(5, 20))
    # Held-out tasks use images never used by pretraining tasks.
    seen = {x.tobytes() for i in range(pretrain.num_tasks) for x in pretrain.task(i).x_train}
    held = {x.tobytes() for i in range(heldout.num_tasks) for x in heldout.task(i).x_train}
    assert len(held - seen) > 0.9 * len(held)  # a few digits are pixel-identical duplicates
    # Label orders are shuffled per task.
    assert len({name.split("_")[1] for name in pretrain.task_names}) == 10
    again, _ = digits_tasks(seed=0)
    assert again.task_names == pretrain.task_names
    assert digits_tasks(seed=1)[0].task_names != pretrain.task_names
    (x, y), = take(pretrain.as_dataset(tasks_per_batch=5, inner_steps=4, batch_size=10,
                                       steps_per_chunk=4), 1)
    assert x.shape == (5, 4, 10, 8, 8, 1) and x.dtype == np.float32 and y.shape == (5, 4, 10)


def test_digits_meta_learned_init_beats_random_init():
    import tfmeta
    from tfmeta.finetune import finetune, random_initialization

    pretrain, heldout = digits_tasks(seed=0)

    def mlp():
        return keras.Sequential([
            keras.Input((8, 8, 1)), keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"), keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(5),
        ])

    model = mlp()
    meta = tfmeta.MetaModel(model)
    meta.compile(optimizer=keras.optimizers.SGD(1.0), inner_optimizer=keras.optimizers.SGD(0.1),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 learner=tfmeta.Reptile(), inner_steps=20, vectorize_tasks=True,
                 steps_per_execution=20)
    stream = pretrain.as_dataset(tasks_per_batch=5, inner_steps=20, batch_size=10, seed=0)
    meta.fit(stream, steps_per_epoch=meta.steps_for(150, steps_per_chunk=1), verbose=0)

    def auc(make_model):
        return np.mean([
            finetune(make_model(i), heldout.finetune_data(i, batch_size=10, seed=i),
                     steps=20).loss_auc
            for i in range(4)
        ])

    weights = model.get_weights()

    def learned(i):
        clone = mlp()
        clone.set_weights(weights)
        return clone

    meta_auc = auc(learned)
    random_auc = auc(lambda i: random_initialization(model, seed=i))
    assert meta_auc < 0.7 * random_auc, (meta_auc, random_auc)


# ---------------------------------------------------------------- mechanics (synthetic)
def numbered_tasks(sizes):
    """Tasks whose images encode their global index, so examples can be traced."""
    tasks, start = [], 0
    for n in sizes:
        index = np.arange(start, start + n)
        x = np.zeros((n, 2, 2, 1), np.uint8)
        x[:, 0, 0, 0], x[:, 0, 1, 0] = index % 256, index // 256
        tasks.append(ClassificationTask(f"n{n}", x, index % 3, x[:2], np.arange(2)))
        start += n
    return ClassificationTasks(tasks)


def decode(x):
    x = np.round(x * 255).astype(int)
    return x[..., 0, 0, 0] + 256 * x[..., 0, 1, 0]


def test_examples_are_epoch_shuffled_within_a_trajectory():
    tasks = numbered_tasks([7, 13, 30])
    K, B, S = 12, 4, 3
    chunks = take(tasks.as_dataset(tasks_per_batch=3, inner_steps=K, batch_size=B,
                                   steps_per_chunk=S, seed=5), K // S)
    ids = tasks.task_ids(0, 3, seed=5)
    for t, task in enumerate(ids):
        seq = np.concatenate([decode(x[t]).reshape(-1) for x, _ in chunks])
        n = tasks._sizes[task]
        start = tasks._offsets[task]
        assert ((seq >= start) & (seq < start + n)).all()
        for epoch in range(len(seq) // n):  # every full epoch is a permutation
            assert sorted(seq[epoch * n:(epoch + 1) * n]) == list(range(start, start + n))


def test_invalid_configurations_name_the_fix():
    tasks = numbered_tasks([5, 6])
    with pytest.raises(ValueError, match="tasks_per_batch<=2"):
        tasks.as_dataset(tasks_per_batch=3, inner_steps=4, batch_size=2)
    with pytest.raises(ValueError, match="divide"):
        tasks.as_dataset(tasks_per_batch=2, inner_steps=4, batch_size=2, steps_per_chunk=3)
    with pytest.raises(TypeError, match="uint8"):
        ClassificationTask("f", np.zeros((3, 2, 2, 1), np.float32), np.zeros(3, int),
                           np.zeros((0, 2, 2, 1), np.uint8), np.zeros(0, int))
