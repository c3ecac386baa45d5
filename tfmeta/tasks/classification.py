"""`ClassificationTasks`: a family of in-memory image classification tasks.

Each task has its own train and test images (uint8 `[N, H, W, C]`) and integer
labels in `0..n_t - 1`. `ClassificationTasks.as_dataset` turns the family into
the stream `MetaModel.fit` consumes (see `tfmeta.tasks.base`):

* elements `(x, y)`, `x` float32 `[T, S, B, H, W, C]` in [0, 1], `y` int32
  `[T, S, B]`, with static shapes;
* meta-batch m holds T distinct tasks drawn with stateless random ops keyed
  by `(seed, m)`, so a seed always yields the same stream, independently of
  TensorFlow's global seed and of how far other streams were consumed;
* a task's K*B examples of one trajectory are the first K*B entries of a
  concatenation of seeded permutations of its train set ("epochs"), so every
  example is seen once before any is seen twice;
* only example *indices* are drawn per trajectory (T*K*B int32); images are
  gathered, converted to float and augmented per chunk, so memory holds one
  chunk of images at a time, not a trajectory's K x T x B;
* a task's example order is keyed by its position t in the meta-batch, and
  a chunk's augmentation by one seed over its T*S*B images (task-major), so
  `as_dataset(..., task_shard=(i, n))` (one worker's share) yields exactly
  tasks `[i T/n, (i+1) T/n)` of the whole stream and gathers and augments
  only their images (an augment callable that takes `rows=(offset, total)`,
  as `random_affine` does, transforms just those rows).

Images stay uint8 in memory (4x smaller than float32) and are converted per
chunk. `tfmeta.tasks.augment.random_affine` is the seeded augmentation of
Leap's Omniglot setup.

Example::

    tasks = ClassificationTasks(
        [ClassificationTask("a", xa, ya, xa_test, ya_test),
         ClassificationTask("b", xb, yb, xb_test, yb_test)],
        augment=random_affine(rotation=180.0))
    stream = tasks.as_dataset(tasks_per_batch=2, inner_steps=100,
                              batch_size=20, steps_per_chunk=10, seed=0)
    x, y = next(iter(stream))          # x: [2, 10, 20, H, W, C], y: [2, 10, 20]
    finetune(model, tasks.finetune_data(0), tasks.finetune_data(0, "test"))
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfmeta.distribute import task_sharded
from tfmeta.tasks.augment import RandomAffine, random_affine
from tfmeta.tasks.base import TaskDistribution
from tfmeta.validation import check_flag, check_positive_int, check_seed, mark_inner_steps

__all__ = ["ClassificationTask", "ClassificationTasks"]

# Philox explicitly: "auto_select" may pick a different generator on another
# device, and a seed must mean the same stream everywhere.
_ALG = "philox"

# Constants folded into a meta-batch's key to derive independent sub-streams.
_TASKS, _EXAMPLES, _AUGMENT = 0, 1, 2


def _key(seed) -> tf.Tensor:
    """The stateless seed pair of an integer seed."""
    return tf.constant([check_seed(seed), 0x5EED], tf.int64)


def _fold(key, value) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64), alg=_ALG)


def _permutations(key, n, count) -> tf.Tensor:
    """The first `count` entries of a concatenation of seeded permutations of `range(n)`.

    Full-range int64 sort keys, not floats: float32 uniforms tie often for
    tens of thousands of examples, which would bias the permutation.
    """
    n = tf.cast(n, tf.int32)
    epochs = (count + n - 1) // n
    keys = tf.random.stateless_uniform(
        tf.stack([epochs, n]), key, minval=None, maxval=None, dtype=tf.int64, alg=_ALG
    )
    order = tf.argsort(keys, axis=1, stable=True)
    return tf.reshape(order, [-1])[:count]


def _image_dtype_problem(name, split, x):
    """The message for images that are not uint8, naming the conversion that fits them."""
    start = f"task {name!r}: x_{split} must be uint8 images (kept as bytes in memory), got {x.dtype}"
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            return (
                f"{start} with {bad} NaN or infinite values: repair or drop those images, then "
                "convert with np.round(x * 255).astype('uint8') for images in [0, 1]."
            )
    return f"{start}; convert with np.round(x * 255).astype('uint8') for images in [0, 1]."


def _label_dtype_problem(name, split, y):
    """The message for labels that are not integers, naming the conversion if one is exact."""
    start = f"task {name!r}: y_{split} must hold integer class labels 0..n-1, got {y.dtype}"
    whole = np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y) & (y == np.round(y))))
    if whole:
        return f"{start} (whole numbers): convert them with y.astype('int32')."
    return f"{start}: map each class to an integer 0..n-1 (e.g. np.unique(y, return_inverse=True)[1])."


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationTask:
    """One classification task: train and test images with labels in 0..num_classes-1.

    Attributes:
        name: a readable name (an alphabet, a dataset).
        x_train: uint8 `[N, H, W, C]` train images.
        y_train: int `[N]` train labels.
        x_test: uint8 `[M, H, W, C]` test images (M may be 0).
        y_test: int `[M]` test labels.
        num_classes: the task's number of classes (default: max label + 1).

    Example::

        task = ClassificationTask("toy", x, y, x_test, y_test)
        task.num_classes
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None = None

    def __post_init__(self):
        for split in ("train", "test"):
            x = np.asarray(getattr(self, f"x_{split}"))
            y = np.asarray(getattr(self, f"y_{split}"))
            if x.dtype != np.uint8:
                raise TypeError(_image_dtype_problem(self.name, split, x))
            if x.ndim != 4:
                raise ValueError(
                    f"task {self.name!r}: x_{split} must be [N, H, W, C], got shape {x.shape} "
                    "(add a channel axis with x[..., None] for grey images)."
                )
            if y.shape != (len(x),):
                raise ValueError(
                    f"task {self.name!r}: y_{split} has shape {y.shape}, expected ({len(x)},)."
                )
            if not np.issubdtype(y.dtype, np.integer):
                raise TypeError(_label_dtype_problem(self.name, split, y))
            object.__setattr__(self, f"x_{split}", x)
            object.__setattr__(self, f"y_{split}", y.astype(np.int32))
        if len(self.x_train) == 0:
            raise ValueError(f"task {self.name!r} has no train examples.")
        if self.x_test.shape[1:] != self.x_train.shape[1:] and len(self.x_test):
            raise ValueError(
                f"task {self.name!r}: test images {self.x_test.shape[1:]} differ from "
                f"train images {self.x_train.shape[1:]}."
            )
        labels = np.concatenate([self.y_train, self.y_test])
        inferred = int(labels.max()) + 1
        num_classes = inferred if self.num_classes is None else int(self.num_classes)
        if labels.min() < 0 or inferred > num_classes:
            raise ValueError(
                f"task {self.name!r}: labels must lie in 0..{num_classes - 1}, "
                f"got {labels.min()}..{labels.max()}."
            )
        object.__setattr__(self, "num_classes", num_classes)

    @property
    def input_shape(self):
        return tuple(int(d) for d in self.x_train.shape[1:])


def _checked_augment(augment):
    """`augment` if it is an augmentation (a callable(images, seed)), else a TypeError naming
    the fix: the factory or class itself (gin's `@random_affine` for `@random_affine()`)
    would fail deep inside tf.data's tracing."""
    if augment is random_affine or augment is RandomAffine or inspect.isclass(augment):
        name = getattr(augment, "__name__", repr(augment))
        raise TypeError(
            f"augment is {name} itself, not an augmentation: call it, augment={name}() "
            f"(in gin, @{name}() rather than @{name})."
        )
    if not callable(augment):
        raise TypeError(f"augment must be a callable(images, seed), None or False; got {augment!r}.")
    return augment


def _augments_rows(augment):
    """Whether a worker's share of the tasks can be augmented alone (see `RandomAffine`).

    An augmentation keyed per chunk can be split across workers only if it
    takes `rows=(offset, total)`; other callables keep the whole-stream path,
    where every worker augments all T tasks and keeps its own.
    """
    if augment is None:
        return True
    try:
        return "rows" in inspect.signature(augment).parameters
    except (TypeError, ValueError):
        return False


def _as_task(task, index, name):
    if isinstance(task, ClassificationTask):
        return task
    if isinstance(task, dict):
        return ClassificationTask(name=task.get("name", name or f"task_{index}"),
                                  **{k: v for k, v in task.items() if k != "name"})
    x_train, y_train, x_test, y_test = task
    return ClassificationTask(name or f"task_{index}", x_train, y_train, x_test, y_test)


class ClassificationTasks(TaskDistribution):
    """A family of in-memory image classification tasks, as task-batch streams.

    Args:
        tasks: `ClassificationTask`s, or tuples `(x_train, y_train, x_test,
            y_test)` / dicts of those fields. All tasks share one image shape.
        names: task names for tuple tasks (default `task_<i>`).
        augment: default augmentation of train images, a callable
            `augment(images, seed)` on float `[N, H, W, C]` images with a `[2]`
            integer seed (e.g. `random_affine()`); None for none. Assignable.

    Attributes:
        num_tasks: number of tasks.
        num_classes: the largest task's number of classes: the width of a
            shared output head (tasks with fewer classes simply never use the
            extra logits).
        input_shape: `(H, W, C)`.
        task_names: the tasks' names, by index.

    Example::

        tasks = ClassificationTasks([(x0, y0, x0t, y0t), (x1, y1, x1t, y1t)])
        stream = tasks.as_dataset(tasks_per_batch=2, inner_steps=100, batch_size=20,
                                  steps_per_chunk=10)
        meta.fit(stream, steps_per_epoch=meta.steps_for(100, steps_per_chunk=10))
        finetune(model, tasks.finetune_data(1), tasks.finetune_data(1, "test"))
    """

    def __init__(self, tasks: Sequence, names: Sequence[str] | None = None,
                 augment: Callable | None = None):
        tasks = list(tasks)
        if not tasks:
            raise ValueError(
                "ClassificationTasks got an empty list of tasks: pass at least one task "
                "(and at least tasks_per_batch of them to meta-train)."
            )
        if names is not None and len(names) != len(tasks):
            raise ValueError(f"got {len(names)} names for {len(tasks)} tasks.")
        tasks = [_as_task(t, i, names[i] if names else None) for i, t in enumerate(tasks)]
        shapes = {t.input_shape for t in tasks}
        if len(shapes) != 1:
            raise ValueError(
                f"all tasks must share one image shape, got {sorted(shapes)}; resize them "
                "first (tfmeta.tasks.datasets resizes TFDS datasets to a common shape)."
            )
        self.input_shape = shapes.pop()
        self.num_tasks = len(tasks)
        self.task_names = [t.name for t in tasks]
        self.task_classes = [t.num_classes for t in tasks]
        self.num_classes = max(self.task_classes)
        self.augment = None if augment is None else _checked_augment(augment)
        # One flat uint8 array of every task's train images: a chunk is then a
        # single gather of global indices, whatever the tasks' sizes.
        self._sizes = np.array([len(t.x_train) for t in tasks], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)[:-1]]).astype(np.int64)
        self._x_train = np.concatenate([t.x_train for t in tasks])
        self._y_train = np.concatenate([t.y_train for t in tasks])
        self._test = [(t.x_test, t.y_test) for t in tasks]
        self._tensors = None

    def __repr__(self):
        return (
            f"ClassificationTasks({self.num_tasks} tasks, {self.num_classes} classes, "
            f"input_shape={self.input_shape}, train examples={len(self._x_train)})"
        )

    # ------------------------------------------------------------ access
    def task(self, i: int) -> ClassificationTask:
        """The i-th task's data (train arrays are views of the shared store)."""
        i = self._check_index(i)
        lo, hi = self._offsets[i], self._offsets[i] + self._sizes[i]
        x_test, y_test = self._test[i]
        return ClassificationTask(
            self.task_names[i], self._x_train[lo:hi], self._y_train[lo:hi], x_test, y_test,
            self.task_classes[i],
        )

    def subset(self, indices: Sequence[int]) -> "ClassificationTasks":
        """A new family with the tasks at `indices`, in that order (same augment)."""
        return ClassificationTasks([self.task(i) for i in indices], augment=self.augment)

    def _check_index(self, i):
        i = int(i)
        if not 0 <= i < self.num_tasks:
            raise IndexError(f"task index {i} out of range for {self.num_tasks} tasks.")
        return i

    def _stores(self):
        # Eager tensors created once (outside any tf.function) and captured by
        # reference by every dataset built from this family.
        if self._tensors is None:
            with tf.init_scope():
                self._tensors = (
                    tf.constant(self._x_train),
                    tf.constant(self._y_train),
                    tf.constant(self._sizes),
                    tf.constant(self._offsets),
                )
        return self._tensors

    def _resolve_augment(self, augment, default):
        if augment is None:
            return self.augment if default else None
        if augment is False:
            return None
        return _checked_augment(augment)

    # ------------------------------------------------------------ meta-training stream
    def task_ids(self, meta_batch: int, tasks_per_batch: int, seed: int = 0) -> np.ndarray:
        """The task indices of meta-batch `meta_batch` in `as_dataset(..., seed=seed)`.

        Example::

            tasks.task_ids(0, tasks_per_batch=5)   # tasks of the first trajectory
        """
        self._check_tasks_per_batch(tasks_per_batch)
        return self._draw_tasks(_fold(_key(seed), meta_batch), tasks_per_batch).numpy()

    def _draw_tasks(self, key, tasks_per_batch):
        keys = tf.random.stateless_uniform(
            [self.num_tasks], _fold(key, _TASKS), minval=None, maxval=None,
            dtype=tf.int64, alg=_ALG,
        )
        return tf.argsort(keys, stable=True)[:tasks_per_batch]

    def _check_tasks_per_batch(self, tasks_per_batch):
        if tasks_per_batch < 1:
            raise ValueError(f"tasks_per_batch must be >= 1, got {tasks_per_batch}.")
        if tasks_per_batch > self.num_tasks:
            raise ValueError(
                f"tasks_per_batch={tasks_per_batch} exceeds the {self.num_tasks} tasks of "
                f"this distribution (a meta-batch holds distinct tasks): use "
                f"tasks_per_batch<={self.num_tasks}, or build the distribution with more "
                "tasks (e.g. more pretraining alphabets)."
            )

    def as_dataset(self, *, tasks_per_batch, inner_steps, batch_size, steps_per_chunk=1, seed=0,
                   augment=None, start=0, task_shard=None, with_task_ids=False):
        """The infinite stream of task-batch chunks for `MetaModel.fit`.

        Args:
            tasks_per_batch: T distinct tasks per meta-batch (<= num_tasks).
            inner_steps: K; a meta-batch's tasks are kept for K / S chunks.
            batch_size: B examples per inner step.
            steps_per_chunk: S inner steps per element.
            seed: seed of the task draws, example order and augmentation.
            augment: None for the family's `augment`, False for none, or a
                callable `augment(images, seed)`.
            start: index of the first chunk to yield: the stream equals
                `as_dataset(...)` without its first `start` elements, but
                costs nothing to skip (meta-batch `start // (K / S)` is keyed
                directly; within it only index tensors are skipped). A
                resumed run passes the number of train steps done.
            task_shard: None for all T tasks, or `(index, count)`: only the
                tasks `[index * T / count, (index + 1) * T / count)` of every
                meta-batch, the same values as those tasks of the whole
                stream, and only their images are gathered and augmented
                (one worker's share, see `tfmeta.distribute`).
            with_task_ids: also yield each slot's task index (for per-task
                heads): elements become `(x, y, task_ids)`.

        Returns:
            An endless `tf.data.Dataset` (its cardinality is
            `tf.data.INFINITE_CARDINALITY`) of `(x, y)`: x float32 `[T, S, B, H, W, C]` in
            [0, 1], y int32 `[T, S, B]` (T / count tasks with a `task_shard`);
            with `with_task_ids`, `(x, y, task_ids)` with task_ids int32 `[T]`,
            `task_ids[t]` the index (in this family) of the task in slot t,
            the same for every chunk of a trajectory (`task_ids(m, T, seed)`
            of meta-batch m). The ids ride third, where Keras puts sample
            weights, so x stays the task batch's first element (what
            `tfmeta.distribute` reads its task count from), the per-replica
            split cuts them with x and y along the task axis, and a learner
            that does not use them ignores them.
            It makes its own shards for `MetaModel.fit` on several workers
            (`tfmeta.distribute.task_sharded`).

        Example::

            stream = tasks.as_dataset(tasks_per_batch=20, inner_steps=100, batch_size=20,
                                      steps_per_chunk=10, seed=0)
        """
        # Not int(): 2.7 tasks or 4.9 steps would quietly become 2 and 4.
        T, K, B, S = (check_positive_int(name, value) for name, value in (
            ("tasks_per_batch", tasks_per_batch), ("inner_steps", inner_steps),
            ("batch_size", batch_size), ("steps_per_chunk", steps_per_chunk)))
        self._check_tasks_per_batch(T)
        self.check_chunking(K, S)
        start = self.check_start(start)
        first, last = self.check_task_shard(task_shard, T)
        augment = self._resolve_augment(augment, default=True)
        if task_shard is not None and not _augments_rows(augment):
            raise TypeError(
                f"augment {augment!r} cannot augment a shard of the tasks: give its "
                "__call__ a rows=(offset, total) argument (see tfmeta.tasks.augment."
                "RandomAffine), or read the whole stream (task_shard=None)."
            )
        images, labels, sizes, offsets = self._stores()
        chunks = K // S
        base = _key(seed)
        shape = self.input_shape
        local = last - first  # the tasks this stream holds, global indices first..last-1

        def trajectory(m):
            # Per meta-batch only indices are drawn: [local, K*B] int64. All T
            # task ids are drawn (T integers) so a shard holds the same tasks.
            key = _fold(base, m)
            ids = self._draw_tasks(key, T)
            example_key = _fold(key, _EXAMPLES)

            def slot(t):  # t: the task's global position in the meta-batch
                task = ids[t]
                order = _permutations(_fold(example_key, t), sizes[task], K * B)
                return tf.cast(order, tf.int64) + offsets[task]

            index = tf.map_fn(slot, tf.range(first, last),
                              fn_output_signature=tf.TensorSpec([K * B], tf.int64))
            per_chunk = tf.transpose(tf.reshape(index, [local, chunks, S * B]), [1, 0, 2])
            return tf.data.Dataset.zip((
                tf.data.Dataset.from_tensors(m).repeat(chunks),
                tf.data.Dataset.range(chunks),
                tf.data.Dataset.from_tensor_slices(per_chunk),
                tf.data.Dataset.from_tensors(tf.cast(ids[first:last], tf.int32)).repeat(chunks),
            ))

        def chunk(m, c, index, task_ids):
            x = tf.gather(images, tf.reshape(index, [-1]))
            x = tf.cast(x, tf.float32) / 255.0
            if augment is not None:
                # One seed for the chunk's T * S * B images, task-major; a shard
                # augments its rows of them exactly as the whole stream does.
                key = _fold(_fold(_fold(base, m), _AUGMENT), c)
                if task_shard is None:
                    x = augment(x, key)
                else:
                    x = augment(x, key, rows=(first * S * B, T * S * B))
            x = tf.reshape(x, [local, S, B, *shape])
            y = tf.reshape(tf.gather(labels, index), [local, S, B])
            return (x, y, task_ids) if with_task_ids else (x, y)

        # The stream is a function of (seed, meta-batch m, chunk c): starting
        # at chunk `start` = starting at meta-batch start // chunks and
        # skipping the first start % chunks chunks' indices (before any image
        # is gathered).
        first_batch, skip = divmod(start, chunks)
        stream = (
            tf.data.Dataset.counter(start=first_batch)
            .flat_map(trajectory)
            .skip(skip)
            # flat_map leaves the length unknown; saying it is endless lets
            # MetaModel.fit tell exactly what a steps_per_epoch would run.
            .apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
            .map(chunk, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )
        if task_shard is not None or not _augments_rows(augment):
            return mark_inner_steps(stream, K)
        return mark_inner_steps(task_sharded(stream, lambda shard: self.as_dataset(
            tasks_per_batch=T, inner_steps=K, batch_size=B, steps_per_chunk=S, seed=seed,
            augment=False if augment is None else augment, start=start, task_shard=shard,
            with_task_ids=with_task_ids,
        )), K)

    # ------------------------------------------------------------ fine-tuning
    def finetune_data(self, i: int, split: str = "train", batch_size: int = 20, seed: int = 0,
                      augment=None, repeat: bool | None = None) -> tf.data.Dataset:
        """Batches `(x float32 [b, H, W, C], y int32 [b])` of task i for plain Keras.

        Train (default): an infinite stream of full batches in epoch-style
        seeded order (every example once before any repeats, batches run
        across epoch boundaries, as in `as_dataset`), augmented with the
        family's `augment`; give `fit` a `steps_per_epoch`. Test: one pass in
        stored order, last batch partial, no augmentation: for `evaluate`.

        Args:
            i: task index.
            split: "train" or "test".
            batch_size: examples per batch.
            seed: seed of the order and augmentation.
            augment: None for the default above, False for none, or a
                callable `augment(images, seed)`. (Leap's code augments its
                held-out evaluation too; pass `augment=tasks.augment` for that.)
            repeat: override the default (True for train, False for test).
                A single train pass is shuffled and keeps its partial batch.

        Example::

            from tfmeta.finetune import finetune
            result = finetune(model, tasks.finetune_data(3), tasks.finetune_data(3, "test"),
                              steps=100)
        """
        i = self._check_index(i)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        batch_size = check_positive_int("batch_size", batch_size)
        train = split == "train"
        repeat = train if repeat is None else check_flag("repeat", repeat)
        augment = self._resolve_augment(augment, default=train)
        task = self.task(i)
        x_np, y_np = (task.x_train, task.y_train) if train else (task.x_test, task.y_test)
        if len(x_np) == 0:
            raise ValueError(f"task {task.name!r} has no {split} examples.")
        with tf.init_scope():
            images, labels = tf.constant(x_np), tf.constant(y_np)
        n = len(x_np)
        key = _fold(_fold(_key(seed), i), _EXAMPLES)

        if train:
            def epoch(e):
                order = _permutations(_fold(key, e), n, n)
                return tf.data.Dataset.from_tensor_slices(tf.cast(order, tf.int64))

            epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
            # flat_map leaves the length unknown: say it, so that Keras and
            # tfmeta's checks (an endless test_data) see what the stream is.
            order = epochs.flat_map(epoch).apply(tf.data.experimental.assert_cardinality(
                tf.data.INFINITE_CARDINALITY if repeat else n))
        else:
            order = tf.data.Dataset.range(n)
            if repeat:
                order = order.repeat()
        # Infinite streams drop nothing (every batch is full); a finite pass
        # keeps its last partial batch so evaluate sees every example.
        batches = order.batch(batch_size, drop_remainder=repeat).enumerate()
        augment_key = _fold(_fold(_key(seed), i), _AUGMENT)

        def gather(b, index):
            x = tf.cast(tf.gather(images, index), tf.float32) / 255.0
            if augment is not None:
                x = augment(x, _fold(augment_key, b))
            return x, tf.gather(labels, index)

        return batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
            tf.data.AUTOTUNE
        )
