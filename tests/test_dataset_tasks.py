"""Dataset-level tasks (`tfmeta.tasks.domains`) on the real archives.

Shown: every named task is a whole dataset (>= 1000 train images, >= 10
classes, every class in both splits, no test image equal to a train image);
each transform is what its name says, against an independent formula
(index arithmetic, SciPy's convolution, float arithmetic); loading and
streams are deterministic; the task-batch stream carries each slot's task
index; and a family is meta-trainable end to end: two Reptile meta-updates
with a shared 100-way head equal a float64 NumPy re-derivation.

Uses the `tfds_dir` fixture (skips where the archives are absent, fails under
CI). Loads all 41 tasks once per module (~10 s from the array cache).
"""

import hashlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.signal import convolve2d

import tfmeta
from tfmeta.distribute import worker_task_batches
from tfmeta.tasks import DatasetTask, load_task, load_tasks, task_family
from tfmeta.tasks.domains import NAMES, TRANSFORMS, omniglot_groups, pixel_permutation
from tfmeta.tasks.omniglot import omniglot_arrays

pytestmark = pytest.mark.data

SOURCES = ("mnist", "fashion_mnist", "digits")
# sha256 of pixel_permutation() as little-endian int64, computed once in another
# process: the permutation is the same in every process and on every machine.
PERMUTATION_SHA256 = "3aa79b80c498bc4ee33c62762c6895443a58f28229ef2110a17c016a0653f9d5"
FAMILY = ("mnist", "mnist/rot90", "fashion_mnist/inverted", "digits/blur",
          "omniglot/background_a", "omniglot/evaluation_g")


@pytest.fixture(scope="module")
def tasks(tfds_dir):
    return {task.name: task for task in load_tasks(NAMES, data_dir=tfds_dir)}


@pytest.fixture(scope="module")
def family(tfds_dir):
    return task_family(FAMILY, data_dir=tfds_dir)


def row_hashes(images):
    """A 64-bit hash of each image's bytes (equal images, equal hashes)."""
    weights = np.random.default_rng(0).integers(1, 2**62, images[0].size, dtype=np.uint64)
    return images.reshape(len(images), -1).astype(np.uint64) @ weights


# ---------------------------------------------------------------- the catalogue
def test_every_task_is_a_whole_dataset_with_its_own_test_split(tasks):
    assert len(NAMES) == len(set(NAMES)) == 41 and list(tasks) == list(NAMES)
    for name, task in tasks.items():
        assert isinstance(task, DatasetTask) and task.name == name
        assert task.x_train.shape[1:] == (28, 28, 1) and task.x_train.dtype == np.uint8
        assert task.num_examples == {"train": len(task.x_train), "test": len(task.x_test)}
        assert task.num_examples["train"] >= 1000 and task.num_classes >= 10, name
        # Every class in both splits, labels 0..n-1.
        for labels in (task.y_train, task.y_test):
            assert set(np.unique(labels)) == set(range(task.num_classes)), name
        # No test image is (byte for byte) a train image.
        assert not np.isin(row_hashes(task.x_test), row_hashes(task.x_train)).any(), name
    counts = {name: (t.num_classes, *t.num_examples.values()) for name, t in tasks.items()}
    for source in SOURCES:
        for transform in TRANSFORMS:  # a transform keeps its source's examples and labels
            derived = tasks[f"{source}/{transform}"]
            assert counts[derived.name] == counts[source]
            assert np.array_equal(derived.y_train, tasks[source].y_train)
    assert counts["mnist"] == counts["fashion_mnist"] == (10, 60000, 10000)
    assert counts["digits"] == (10, 1258, 539)  # 1797 images, 30% of each digit to test


def test_omniglot_groups_partition_the_alphabets(tfds_dir, tasks):
    arrays = omniglot_arrays(data_dir=tfds_dir)
    seen = []
    for part, alphabets, characters in (("background", 30, 964), ("evaluation", 20, 659)):
        groups = omniglot_groups(arrays, part)
        members = np.concatenate(groups)
        assert len(members) == len(set(members)) == alphabets
        names = [f"omniglot/{part}_{chr(ord('a') + i)}" for i in range(len(groups))]
        sizes = [tasks[n].num_classes for n in names]
        assert sum(sizes) == characters and 80 <= min(sizes) and max(sizes) <= 100
        for name, group in zip(names, groups):
            task = tasks[name]
            # 15 train and 5 test drawings of each of the group's characters.
            assert np.array_equal(np.bincount(task.y_train), np.full(task.num_classes, 15))
            assert np.array_equal(np.bincount(task.y_test), np.full(task.num_classes, 5))
            in_group = np.isin(arrays["alphabet"], group)
            assert task.num_classes == len(np.unique(arrays["label"][in_group]))
            seen.append(set(row_hashes(task.x_train)))
    assert sum(map(len, seen)) == len(set().union(*seen))  # no image in two groups


# ---------------------------------------------------------------- transforms
def quarter_turn(images):
    """Counter-clockwise by index arithmetic: output pixel (r, c) is input pixel (c, 27 - r)."""
    r, c = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    return images[:, c, 27 - r]


def test_rotations_are_quarter_turns_counter_clockwise(tasks):
    source = tasks["mnist"].x_test[:200, :, :, 0]
    expected = source
    for k, name in ((1, "mnist/rot90"), (2, "mnist/rot180"), (3, "mnist/rot270")):
        rotated = tasks[name].x_test[:200, :, :, 0]
        for image, out in zip(source[:20], rotated):
            assert np.array_equal(out, np.rot90(image, k))
        expected = quarter_turn(expected)
        assert np.array_equal(rotated, expected)
    assert np.array_equal(quarter_turn(expected), source)  # four turns: the identity
    assert np.array_equal(tasks["digits/rot270"].x_train[..., 0],
                          np.rot90(tasks["digits"].x_train[..., 0], 3, axes=(1, 2)))


def test_inversion_is_one_minus_x(tasks):
    for source in SOURCES:
        plain, inverted = tasks[source], tasks[f"{source}/inverted"]
        assert np.all(inverted.x_train.astype(np.int16) + plain.x_train == 255)
    plain = np.stack([x for x, _ in tasks["fashion_mnist"].as_dataset("test").take(64).as_numpy_iterator()])
    inverted = np.stack([x for x, _ in tasks["fashion_mnist/inverted"].as_dataset("test").take(64)
                         .as_numpy_iterator()])
    assert plain.dtype == np.float32 and plain.min() >= 0.0 and plain.max() <= 1.0
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)


def test_pixel_permutation_is_one_fixed_bijection(tasks):
    perm = pixel_permutation()
    assert np.array_equal(np.sort(perm), np.arange(784))
    assert np.array_equal(perm, pixel_permutation())
    assert hashlib.sha256(perm.astype("<i8").tobytes()).hexdigest() == PERMUTATION_SHA256
    for source in SOURCES:
        plain = tasks[source].x_train.reshape(-1, 784)
        permuted = tasks[f"{source}/permuted"].x_train.reshape(-1, 784)
        for i in (0, 1, 400, 783):  # output pixel i is input pixel perm[i]
            assert np.array_equal(permuted[:, i], plain[:, perm[i]])
        assert np.array_equal(np.sort(permuted[:1000], axis=1), np.sort(plain[:1000], axis=1))


def test_blur_and_contrast_against_independent_formulas(tasks):
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])
    for source in SOURCES:
        plain = tasks[source].x_test[:100, :, :, 0].astype(np.int64)
        blurred = tasks[f"{source}/blur"].x_test[:100, :, :, 0]
        for image, out in zip(plain, blurred):
            # Zero-padded 5x5 binomial filter, normalized by 256, rounded half up.
            expected = (convolve2d(image, kernel, mode="same") + 128) // 256
            assert np.array_equal(out, expected)
        contrast = tasks[f"{source}/contrast"].x_test[:100, :, :, 0]
        assert np.array_equal(contrast, np.floor(64 + plain / 2 + 0.5))
        assert contrast.min() >= 64 and contrast.max() <= 192


# ---------------------------------------------------------------- determinism and errors
def test_loading_is_deterministic(tfds_dir, tasks):
    again = load_tasks(["digits", "omniglot/evaluation_c", "mnist/permuted"], data_dir=tfds_dir)
    for task in again:
        for split in ("train", "test"):
            for a, b in zip(getattr(task, split), getattr(tasks[task.name], split)):
                assert np.array_equal(a, b)
    single = load_task("digits/contrast", data_dir=tfds_dir)
    assert single.source == "digits" and single.transform == "contrast"
    assert np.array_equal(single.x_test, tasks["digits/contrast"].x_test)


def test_bad_names_name_the_fix(tfds_dir):
    with pytest.raises(ValueError, match=r"unknown dataset task 'mnist/rot45'.*'mnist/rot90'"):
        load_tasks(["mnist", "mnist/rot45"], data_dir=tfds_dir)
    with pytest.raises(ValueError, match="omniglot/background_a..j"):
        load_task("omniglot/background_z", data_dir=tfds_dir)
    with pytest.raises(ValueError, match=r"distinct.*\['digits'\]"):
        task_family(["digits", "digits"], data_dir=tfds_dir)


def test_gin_builds_a_family(tfds_dir, tasks):
    import gin

    import tfmeta.configurables  # noqa: F401  (the project's gin registrations)

    gin.clear_config()
    try:
        gin.parse_config(f"""
            tfmeta.tasks.task_family.names = ["digits/rot90", "omniglot/evaluation_b"]
            tfmeta.tasks.task_family.data_dir = "{tfds_dir}"
        """)
        built = gin.get_configurable("tfmeta.tasks.task_family")()
    finally:
        gin.clear_config()
    assert built.task_names == ["digits/rot90", "omniglot/evaluation_b"]
    assert np.array_equal(built.task(1).x_test, tasks["omniglot/evaluation_b"].x_test)


# ---------------------------------------------------------------- the task-batch stream
T, K, B, S, SEED = 3, 4, 5, 2, 11


def stream(family, **kwargs):
    return family.as_dataset(tasks_per_batch=T, inner_steps=K, batch_size=B, steps_per_chunk=S,
                             seed=SEED, **kwargs)


def test_stream_carries_task_ids(family):
    x_spec, y_spec, id_spec = stream(family, with_task_ids=True).element_spec
    assert x_spec.shape == (T, S, B, 28, 28, 1) and x_spec.dtype == tf.float32
    assert y_spec.shape == (T, S, B) and id_spec.shape == (T,) and id_spec.dtype == tf.int32
    assert family.task_names == list(FAMILY) and family.task_classes == [10, 10, 10, 10, 95, 81]
    assert family.num_classes == 95  # the widest task's: a shared head's width

    trajectories = 4
    chunks = list(stream(family, with_task_ids=True).take(trajectories * K // S).as_numpy_iterator())
    plain = list(stream(family).take(len(chunks)).as_numpy_iterator())
    keras.utils.set_random_seed(5)  # the stream ignores global seeds
    again = list(stream(family, with_task_ids=True).take(len(chunks)).as_numpy_iterator())
    stores = {}
    for c, ((x, y, ids), (x0, y0), repeat) in enumerate(zip(chunks, plain, again)):
        assert np.array_equal(x, x0) and np.array_equal(y, y0)  # ids only add to the element
        assert all(np.array_equal(a, b) for a, b in zip((x, y, ids), repeat))
        assert np.array_equal(ids, family.task_ids(c // (K // S), T, seed=SEED))
        for t, task_id in enumerate(ids):  # slot t holds task ids[t]'s images and labels
            task = family.task(task_id)
            if task_id not in stores:
                stores[task_id] = dict(zip(row_hashes(task.x_train), task.y_train))
            images = np.round(x[t].reshape(-1, 28, 28, 1) * 255).astype(np.uint8)
            for image, label in zip(row_hashes(images), y[t].reshape(-1)):
                assert stores[task_id][image] == label < family.task_classes[task_id]
    assert len({tuple(ids) for _, _, ids in chunks}) > 1
    other = next(iter(family.as_dataset(tasks_per_batch=T, inner_steps=K, batch_size=B,
                                        steps_per_chunk=S, seed=SEED + 1)))
    assert not np.array_equal(other[0].numpy(), chunks[0][0])

    # A worker's shard and a replica's split keep each task's id with its images.
    shard = list(family.as_dataset(tasks_per_batch=4, inner_steps=K, batch_size=B, steps_per_chunk=S,
                                   seed=SEED, with_task_ids=True, task_shard=(1, 2))
                 .take(2).as_numpy_iterator())
    whole = list(family.as_dataset(tasks_per_batch=4, inner_steps=K, batch_size=B, steps_per_chunk=S,
                                   seed=SEED, with_task_ids=True).take(2).as_numpy_iterator())
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=2)
    split = list(worker_task_batches(
        family.as_dataset(tasks_per_batch=4, inner_steps=K, batch_size=B, steps_per_chunk=S,
                          seed=SEED, with_task_ids=True), context).take(4).as_numpy_iterator())
    for i, element in enumerate(whole):
        for part, (lo, hi) in ((shard[i], (2, 4)), (split[2 * i], (0, 2)), (split[2 * i + 1], (2, 4))):
            for a, b in zip(part, element):
                assert np.array_equal(a, b[lo:hi])


# ---------------------------------------------------------------- end to end
def softmax_step(w, b, x, y, lr):
    """One SGD step on mean softmax cross-entropy, float64, hand-derived gradient."""
    z = x @ w + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = (p - np.eye(w.shape[1])[y]) / len(x)
    return w - lr * x.T @ dz, b - lr * dz.sum(0)


def test_reptile_meta_trains_on_the_family_with_a_shared_100_way_head(family):
    inner_lr, outer_lr, updates = 0.5, 0.5, 2
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(100)])
    phi = [v.astype(np.float64) for v in model.get_weights()]
    start = model.get_weights()[0]
    meta = tfmeta.MetaModel(model)
    meta.compile(optimizer=keras.optimizers.SGD(outer_lr), inner_optimizer=keras.optimizers.SGD(inner_lr),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 learner=tfmeta.Reptile(), inner_steps=K)
    steps = meta.steps_for(updates, steps_per_chunk=S)
    meta.fit(stream(family, with_task_ids=True), steps_per_epoch=steps, epochs=1, verbose=0)
    assert int(meta.meta_updates.numpy()) == updates

    # Reference: phi <- phi + beta * mean_t(theta_K - phi), theta_K by K SGD steps
    # on exactly the stream's batches.
    chunks = list(stream(family).take(steps).as_numpy_iterator())
    for m in range(updates):
        x = np.concatenate([c[0] for c in chunks[m * K // S:(m + 1) * K // S]], axis=1)
        y = np.concatenate([c[1] for c in chunks[m * K // S:(m + 1) * K // S]], axis=1)
        ends = []
        for t in range(T):
            w, b = phi
            for k in range(K):
                w, b = softmax_step(w, b, x[t, k].reshape(B, -1).astype(np.float64), y[t, k], inner_lr)
            ends.append((w, b))
        phi = [p + outer_lr * np.mean([e[i] - p for e in ends], axis=0) for i, p in enumerate(phi)]
    for got, want in zip(model.get_weights(), phi):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(model.get_weights()[0] - start).max() > 1e-3  # phi moved
