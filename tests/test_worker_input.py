"""Multi-worker input sharded by task: each worker makes only its own tasks' streams.

A task distribution's `as_dataset(..., task_shard=(index, count))` yields tasks
`[index * T / count, (index + 1) * T / count)` of every meta-batch. What is shown:
- the shards, concatenated along the task axis, are the whole stream element by
  element (bit for bit), for `ClassificationTasks` with augmentation (also from
  a resumed `start`) and for `RotatedHimmelblau` (against its descriptors in NumPy);
- a shard does T / count of the input work: its elements hold T / count tasks and
  the augmentation (which takes the gathered images) sees only those tasks' images;
- `tfmeta.distribute.worker_task_batches` gives each worker's replicas the same
  task batches from the worker's shard as from the whole stream, uses the shard
  only with several workers, and reads unmarked streams whole;
- bad shards fail with one error naming the fix.
The phi of two workers against one is in tests/test_distribute.py.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfmeta import distribute
from tfmeta.distribute import task_sharded, worker_task_batches
from tfmeta.input_options import without_autotuning
from tfmeta.tasks import ClassificationTasks, RotatedHimmelblau, random_affine
from tfmeta.tasks.base import TaskDistribution

T, K, B, S = 4, 4, 3, 2
CHUNKS = 5  # more than one trajectory (K / S = 2 chunks each)


def family(augment=None):
    """Six tasks of different sizes (so example orders differ by task), 8x8 uint8 images."""
    rng = np.random.default_rng(0)
    tasks = [
        (rng.integers(0, 256, (20 + 3 * i, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 20 + 3 * i),
         np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int64))
        for i in range(6)
    ]
    return ClassificationTasks(tasks, augment=augment)


def stream_kwargs(**overrides):
    return {**dict(tasks_per_batch=T, inner_steps=K, batch_size=B, steps_per_chunk=S, seed=5),
            **overrides}


def elements(stream, n=CHUNKS):
    return [tuple(v.numpy() for v in element) for element in stream.take(n)]


def assert_shards_make_the_stream(full, shards):
    assert len(full) == CHUNKS and all(len(s) == CHUNKS for s in shards)
    for i, whole in enumerate(full):
        for part, value in enumerate(whole):  # x, then y
            np.testing.assert_array_equal(
                np.concatenate([s[i][part] for s in shards]), value, err_msg=f"chunk {i}"
            )


# ---------------------------------------------------------------- shards equal the whole stream
@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("start", [0, 1, 3])
def test_classification_shards_concatenate_to_the_stream(count, start):
    tasks = family(augment=random_affine())
    kwargs = stream_kwargs(start=start)
    full = elements(tasks.as_dataset(**kwargs))
    shards = [elements(tasks.as_dataset(**kwargs, task_shard=(i, count))) for i in range(count)]
    assert_shards_make_the_stream(full, shards)
    # not vacuous: augmentation moved the images, and the tasks differ
    plain = elements(tasks.as_dataset(**kwargs, augment=False))
    assert np.abs(plain[0][0] - full[0][0]).mean() > 0.05
    np.testing.assert_array_equal(plain[0][1], full[0][1])  # same examples, same labels
    assert not np.array_equal(full[0][0][0], full[0][0][1])


def test_classification_shard_holds_the_drawn_tasks_of_its_range():
    """Each shard's images are train images of task_ids(m)[first:last] (no augmentation)."""
    tasks = family()
    for index in range(2):
        shard = elements(tasks.as_dataset(**stream_kwargs(), task_shard=(index, 2)))
        for c, (x, y) in enumerate(shard):
            ids = tasks.task_ids(c // (K // S), T, seed=5)[2 * index:2 * index + 2]
            for t, task_id in enumerate(ids):
                task = tasks.task(task_id)
                train = {image.tobytes(): label for image, label in zip(task.x_train, task.y_train)}
                for image, label in zip(x[t].reshape(-1, 8, 8, 1), y[t].reshape(-1)):
                    key = np.round(image * 255).astype(np.uint8).tobytes()
                    assert train[key] == label


def test_himmelblau_shards_are_slices_of_its_descriptors():
    tasks = RotatedHimmelblau(num_tasks=8)
    kwargs = dict(inner_steps=K, batch_size=B, steps_per_chunk=S)
    full = elements(tasks.as_dataset(**kwargs))
    shards = [elements(tasks.as_dataset(**kwargs, task_shard=(i, 4))) for i in range(4)]
    assert_shards_make_the_stream(full, shards)
    x, y = shards[3][0]
    expected = np.broadcast_to(tasks.descriptors[6:8, None, None, :], (2, S, B, 4))
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, np.zeros((2, S, B), "float32"))


# ---------------------------------------------------------------- T / count of the work
class RecordingAugment:
    """An augmentation that records the images it is given (the gathered images) and adds 0."""

    def __init__(self):
        self.batches = []

    def __call__(self, images, seed, rows=None):
        self.batches.append((tuple(images.shape), rows))
        return images + 0.0 * tf.cast(seed[0], images.dtype)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_a_shard_gathers_and_augments_only_its_tasks(count):
    augment = RecordingAugment()
    stream = family().as_dataset(**stream_kwargs(augment=augment), task_shard=(count - 1, count))
    x_spec, y_spec = stream.element_spec
    assert x_spec.shape == (T // count, S, B, 8, 8, 1) and y_spec.shape == (T // count, S, B)
    # The chunk function is traced once: one augmentation call on the shard's
    # gathered images, told which rows of the whole chunk they are.
    local = T // count
    assert augment.batches == [((local * S * B, 8, 8, 1), ((count - 1) * local * S * B, T * S * B))]


def test_an_augmentation_without_rows_keeps_the_whole_stream():
    """A callable that cannot augment a share alone is refused for a shard, and not sharded."""

    def plain(images, seed):
        return images

    with pytest.raises(TypeError, match="rows=\\(offset, total\\)"):
        family().as_dataset(**stream_kwargs(augment=plain), task_shard=(0, 2))
    stream = family().as_dataset(**stream_kwargs(augment=plain))
    assert not hasattr(stream, distribute._SHARD_MAKER)


# ---------------------------------------------------------------- the worker's stream
def context(workers, worker, replicas):
    return tf.distribute.InputContext(
        num_input_pipelines=workers, input_pipeline_id=worker, num_replicas_in_sync=replicas
    )


@pytest.mark.parametrize("workers, replicas", [(2, 2), (2, 4), (4, 4)])
def test_worker_stream_from_the_shard_equals_the_split_whole_stream(workers, replicas):
    tasks = family(augment=random_affine())
    kwargs = stream_kwargs(start=1)
    shardable = tasks.as_dataset(**kwargs)
    whole = shardable.map(lambda x, y: (x, y))  # a transformed stream drops the mark
    local = replicas // workers
    for worker in range(workers):
        sharded = elements(worker_task_batches(shardable, context(workers, worker, replicas)),
                           CHUNKS * local)
        split = elements(worker_task_batches(whole, context(workers, worker, replicas)),
                         CHUNKS * local)
        assert all(x.shape[0] == T // replicas for x, _ in sharded)
        for a, b in zip(sharded, split, strict=True):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
    # and the split whole stream is replica r's tasks [r T / R, (r + 1) T / R)
    full = elements(shardable)
    worker = workers - 1
    last = elements(worker_task_batches(whole, context(workers, worker, replicas)), CHUNKS * local)
    for i, (x, _) in enumerate(last):
        replica = worker * local + i % local
        per = T // replicas
        np.testing.assert_array_equal(x, full[i // local][0][replica * per:(replica + 1) * per])


def test_the_shard_is_made_only_with_several_workers():
    made = []
    full = tf.data.Dataset.from_tensors((np.arange(4.0)[:, None], np.zeros((4, 1)))).repeat()

    def make_shard(shard):
        made.append(shard)
        index, count = shard
        per = 4 // count
        x = np.arange(4.0)[index * per:(index + 1) * per, None]
        return tf.data.Dataset.from_tensors((x, np.zeros((per, 1)))).repeat()

    stream = task_sharded(full, make_shard)
    assert without_autotuning(stream) is stream  # MetaModel.fit keeps the mark
    one_worker = elements(worker_task_batches(stream, context(1, 0, 2)), 2)  # MirroredStrategy
    assert made == []
    assert [x.ravel().tolist() for x, _ in one_worker] == [[0.0, 1.0], [2.0, 3.0]]
    second = elements(worker_task_batches(stream, context(2, 1, 2)), 2)
    assert made == [(1, 2)]
    assert [x.ravel().tolist() for x, _ in second] == [[2.0, 3.0]] * 2


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("shard, message", [
    ((2, 2), r"task_shard=\(2, 2\) must be \(index, count\) with integers 0 <= index < count"),
    ((-1, 2), r"0 <= index < count"),
    ((0, 0), r"0 <= index < count"),
    ((0.0, 2), r"integers"),
    ((True, 2), r"integers"),
    ("ab", r"must be \(index, count\)"),
    (3, r"must be \(index, count\)"),
])
def test_bad_task_shard_names_the_fix(shard, message):
    with pytest.raises(ValueError, match=message):
        family().as_dataset(**stream_kwargs(), task_shard=shard)
    with pytest.raises(ValueError, match=message):
        RotatedHimmelblau(num_tasks=8).as_dataset(inner_steps=K, steps_per_chunk=S, task_shard=shard)


def test_tasks_that_do_not_split_over_the_shards_name_the_fix():
    with pytest.raises(ValueError, match=r"4 tasks per meta-batch do not split evenly over 3 "
                                         r"shards: choose tasks_per_batch a multiple of 3 \(e\.g\. 6\)"):
        family().as_dataset(**stream_kwargs(), task_shard=(0, 3))
    with pytest.raises(ValueError, match=r"8 tasks per meta-batch .* multiple of 3 \(e\.g\. 9\)"):
        RotatedHimmelblau(num_tasks=8).as_dataset(inner_steps=K, steps_per_chunk=S, task_shard=(2, 3))


def test_check_task_shard_ranges():
    assert TaskDistribution.check_task_shard(None, 8) == (0, 8)
    assert TaskDistribution.check_task_shard((1, 2), 8) == (4, 8)
    assert TaskDistribution.check_task_shard((np.int64(3), 4), 8) == (6, 8)
