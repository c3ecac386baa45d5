"""Named dataset-level tasks: whole datasets and fixed domain transforms of them.

The CTS paper's large-scale setting and Leap's Multi-CV meta-learn over
*datasets*: each task is a whole dataset with its own label space, trained
for many steps. This module is that family at 28x28x1, a catalogue of named
tasks in the style of TFDS (`load_task("mnist/rot90")` like
`tfds.load("mnist")`):

* sources, each with its own train/test split: `"mnist"` and
  `"fashion_mnist"` (TFDS's splits), `"digits"` (scikit-learn's 1797 digits,
  no download, resized to 28x28 and split per class by a seed), and 17
  Omniglot tasks, `"omniglot/background_a"`..`"_j"` and
  `"omniglot/evaluation_a"`..`"_g"`: the 30 background (20 evaluation)
  alphabets packed into 10 (7) groups of 81-98 characters, each group one
  task with every character a class and 15 train / 5 test drawings of each
  (the 5 chosen per character by a seed);
* transforms that change the input statistics the way a new dataset does,
  written `"<source>/<transform>"` for mnist, fashion_mnist and digits:
  `inverted` (`1 - x`, Achille et al.'s "ifashion"), `rot90`, `rot180`,
  `rot270` (counter-clockwise, `np.rot90`), `permuted` (one fixed pixel
  permutation, `pixel_permutation()`), `blur` (5x5 binomial filter) and
  `contrast` (halved contrast on a grey ground).

`NAMES` lists every task. All images are 28x28x1, uint8 in memory and float32
in [0, 1] in every stream, with int32 labels `0..num_classes - 1`. Transforms
are exact integer arithmetic on the uint8 images, applied once when a task is
loaded (a fraction of a second for MNIST), so they add no float rounding
that could differ between CPUs. The sources' decoded arrays come from
`tfmeta.tasks.datasets.image_arrays` and `tfmeta.tasks.omniglot.omniglot_arrays`
(cached as `.npz` beside the TFDS data_dir, outside the repository); prepare
the TFDS datasets once with `python tools/prepare_data.py --from ../shared/data`.

`task_family(names)` makes a `ClassificationTasks` of the named tasks, task
index = position in `names`; its `as_dataset(..., with_task_ids=True)` stream
yields `(x, y, task_ids)` (see `ClassificationTasks.as_dataset`).

Example::

    task = load_task("fashion_mnist/inverted")
    task.num_classes, task.num_examples     # 10, {'train': 60000, 'test': 10000}
    family = task_family(["mnist", "mnist/rot90", "omniglot/background_a"])
    stream = family.as_dataset(tasks_per_batch=2, inner_steps=1000, batch_size=32,
                               steps_per_chunk=10, with_task_ids=True)
    x, y, task_ids = next(iter(stream))      # [2, 10, 32, 28, 28, 1], [2, 10, 32], [2]
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfmeta.tasks.classification import ClassificationTask, ClassificationTasks
from tfmeta.tasks.datasets import image_arrays
from tfmeta.tasks.digits import digits_arrays
from tfmeta.tasks.omniglot import DRAWINGS_PER_CHARACTER, omniglot_arrays

__all__ = [
    "DatasetTask",
    "NAMES",
    "TRANSFORMS",
    "load_task",
    "load_tasks",
    "omniglot_groups",
    "pixel_permutation",
    "task_family",
]

IMAGE_SIZE = 28
#: Seed of the fixed pixel permutation of the `permuted` tasks.
PERMUTATION_SEED = 0
#: Seed of the digits train/test split and of Omniglot's test drawings.
SPLIT_SEED = 0
#: Share of each digit's images in the digits test split.
DIGITS_TEST_FRACTION = 0.3
#: Test drawings per Omniglot character (of 20; Leap's split).
OMNIGLOT_TEST_DRAWINGS = 5
#: Omniglot groups per alphabet set. TFDS labels 0..963 are the characters of
#: the 30 background alphabets, 964..1622 those of the 20 evaluation ones.
OMNIGLOT_GROUPS = {"background": 10, "evaluation": 7}
BACKGROUND_CHARACTERS = 964


# ---------------------------------------------------------------- transforms
# uint8 [N, 28, 28, 1] -> uint8, integer arithmetic only (no float rounding
# that could depend on the CPU's kernels).
def pixel_permutation(seed: int = PERMUTATION_SEED, size: int = IMAGE_SIZE * IMAGE_SIZE) -> np.ndarray:
    """The fixed bijection of the `permuted` tasks: output pixel i is input pixel `perm[i]`.

    Example::

        perm = pixel_permutation()
        sorted(perm) == list(range(784))     # True
    """
    return np.random.default_rng(seed).permutation(size)


def _permute(images):
    flat = images.reshape(len(images), -1)
    return flat[:, pixel_permutation(size=flat.shape[1])].reshape(images.shape)


_BINOMIAL = (1, 4, 6, 4, 1)  # sums to 16; the separable 2-D kernel to 256
_BLUR_CHUNK = 8192           # images per pass: bounds the uint16 temporaries


def _binomial_pass(x, axis):
    """[1 4 6 4 1] filter along `axis`, zero padding, unnormalized (integer sums)."""
    width = x.shape[axis]
    pad = [(2, 2) if a == axis else (0, 0) for a in range(x.ndim)]
    padded = np.pad(x, pad)
    cut = [slice(None)] * x.ndim
    total = np.zeros_like(x)
    for offset, weight in enumerate(_BINOMIAL):
        cut[axis] = slice(offset, offset + width)
        total += weight * padded[tuple(cut)]
    return total


def _blur(images):
    out = np.empty_like(images)
    for start in range(0, len(images), _BLUR_CHUNK):
        # uint16 is exact: at most 255 * 16 * 16 + 128 = 65408.
        x = images[start:start + _BLUR_CHUNK].astype(np.uint16)
        x = _binomial_pass(_binomial_pass(x, 1), 2)
        out[start:start + _BLUR_CHUNK] = (x + 128) >> 8
    return out


def _rotate(quarter_turns):
    return lambda images: np.ascontiguousarray(np.rot90(images, quarter_turns, axes=(1, 2)))


#: Transform name -> uint8 image function; "<source>/<name>" applies it to
#: both splits of the source.
TRANSFORMS = {
    "inverted": lambda images: 255 - images,
    "rot90": _rotate(1),
    "rot180": _rotate(2),
    "rot270": _rotate(3),
    "permuted": _permute,
    "blur": _blur,
    # [0, 255] -> [64, 192]: half the contrast around mid-grey, rounded half up.
    "contrast": lambda images: (64 + (images.astype(np.uint16) + 1) // 2).astype(np.uint8),
}


# ---------------------------------------------------------------- sources
def _tfds_arrays(name):
    def load(data_dir):
        splits = [image_arrays(name, split, image_size=IMAGE_SIZE, channels=1, data_dir=data_dir)
                  for split in ("train", "test")]
        return tuple(a for split in splits for a in (split["image"], split["label"]))
    return load


def _digits_split(arrays):
    """Seeded per-digit split: `DIGITS_TEST_FRACTION` of each digit's images to test."""
    images, labels = arrays
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), bool)
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test[members[:int(round(len(members) * DIGITS_TEST_FRACTION))]] = True
    return images[~test], labels[~test], images[test], labels[test]


def omniglot_groups(arrays, part: str) -> list[np.ndarray]:
    """The alphabet indices of each Omniglot group of `part` ("background"/"evaluation").

    Alphabets are dealt, largest first (ties by name), to the group with the
    fewest characters so far (ties to the first group): a deterministic,
    balanced packing (background: 95-98, evaluation: 81-98 characters).

    Example::

        groups = omniglot_groups(omniglot_arrays(), "evaluation")   # 7 arrays
    """
    labels, alphabets, names = arrays["label"], arrays["alphabet"], arrays["alphabet_names"]
    in_part = (labels < BACKGROUND_CHARACTERS) == (part == "background")
    counts = {int(a): len(np.unique(labels[in_part & (alphabets == a)]))
              for a in np.unique(alphabets[in_part])}
    groups = [[] for _ in range(OMNIGLOT_GROUPS[part])]
    sizes = [0] * len(groups)
    for a in sorted(counts, key=lambda a: (-counts[a], str(names[a]))):
        g = sizes.index(min(sizes))
        groups[g].append(a)
        sizes[g] += counts[a]
    return [np.array(sorted(g)) for g in groups]


def _omniglot_group(part, index):
    def select(arrays):
        labels = arrays["label"]
        members = omniglot_groups(arrays, part)[index]
        characters = np.unique(labels[np.isin(arrays["alphabet"], members)])
        by_label = np.argsort(labels, kind="stable")  # drawings in TFDS's fixed order
        first = np.searchsorted(labels[by_label], characters)
        drawings = by_label[first[:, None] + np.arange(DRAWINGS_PER_CHARACTER)]
        if not np.all(labels[drawings] == characters[:, None]):
            raise ValueError(
                f"an Omniglot character of omniglot/{part} has fewer than "
                f"{DRAWINGS_PER_CHARACTER} drawings: delete the cached arrays "
                "(tfmeta.tasks.datasets.array_cache_dir()) to rebuild them."
            )
        held = np.zeros(drawings.shape, bool)
        for row, character in enumerate(characters):
            rng = np.random.default_rng([SPLIT_SEED, int(character)])
            held[row, rng.choice(DRAWINGS_PER_CHARACTER, OMNIGLOT_TEST_DRAWINGS, replace=False)] = True
        new_labels = np.broadcast_to(np.arange(len(characters))[:, None], drawings.shape)
        images = arrays["image"]
        return (images[drawings[~held]], new_labels[~held],
                images[drawings[held]], new_labels[held])
    return select


def _identity(arrays):
    return arrays


# Archive loaders (data_dir -> arrays), read once per `load_tasks` call.
_ARCHIVES = {
    "mnist": _tfds_arrays("mnist"),
    "fashion_mnist": _tfds_arrays("fashion_mnist"),
    "digits": lambda data_dir: digits_arrays(IMAGE_SIZE),
    "omniglot": lambda data_dir: omniglot_arrays(IMAGE_SIZE, data_dir),
}
# Source name -> (archive, arrays -> (x_train, y_train, x_test, y_test)).
_SOURCES = {
    "mnist": ("mnist", _identity),
    "fashion_mnist": ("fashion_mnist", _identity),
    "digits": ("digits", _digits_split),
    **{f"omniglot/{part}_{chr(ord('a') + i)}": ("omniglot", _omniglot_group(part, i))
       for part, count in OMNIGLOT_GROUPS.items() for i in range(count)},
}
_TRANSFORMED_SOURCES = ("mnist", "fashion_mnist", "digits")

#: Every task name, in catalogue order.
NAMES = tuple(
    [f"{source}{suffix}" for source in _TRANSFORMED_SOURCES
     for suffix in ("", *(f"/{t}" for t in TRANSFORMS))]
    + [source for source in _SOURCES if source.startswith("omniglot/")]
)


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetTask(ClassificationTask):
    """One dataset-level task: a whole dataset with its own train/test split and labels.

    Attributes (besides `ClassificationTask`'s name, x_train, y_train, x_test,
    y_test, num_classes):
        source: the source dataset's name ("mnist", "omniglot/background_a").
        transform: the transform's name in `TRANSFORMS`, "" for none.

    Example::

        task = load_task("mnist/rot90")
        x, y = task.train                     # uint8 [60000, 28, 28, 1], int32 [60000]
        task.as_dataset("test").batch(100)    # (float32 [0, 1] images, int32 labels)
    """

    source: str = ""
    transform: str = ""

    @property
    def num_examples(self) -> dict:
        """`{"train": n, "test": m}`."""
        return {"train": len(self.x_train), "test": len(self.x_test)}

    @property
    def train(self):
        """`(x_train, y_train)`: uint8 `[N, 28, 28, 1]` images and int32 labels."""
        return self.x_train, self.y_train

    @property
    def test(self):
        """`(x_test, y_test)`: uint8 `[M, 28, 28, 1]` images and int32 labels."""
        return self.x_test, self.y_test

    def as_dataset(self, split: str = "train") -> tf.data.Dataset:
        """The split as unbatched `(image float32 [28, 28, 1] in [0, 1], label int32)` pairs.

        In stored order (as `tfds.load(..., as_supervised=True, shuffle_files=False)`);
        shuffle and batch it yourself, or use `task_family(...).finetune_data`.

        Example::

            task.as_dataset("train").shuffle(10000, seed=0).batch(32)
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        images, labels = getattr(self, split)
        return tf.data.Dataset.from_tensor_slices((images, labels)).map(
            lambda image, label: (tf.cast(image, tf.float32) / 255.0, label)
        )


def _parse(name):
    if name in _SOURCES:
        return name, ""
    source, _, transform = str(name).rpartition("/")
    if source in _TRANSFORMED_SOURCES and transform in TRANSFORMS:
        return source, transform
    close = difflib.get_close_matches(str(name), NAMES, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown dataset task {name!r}.{hint} Tasks are a source ({', '.join(_TRANSFORMED_SOURCES)}, "
        f"omniglot/background_a..j, omniglot/evaluation_a..g) or '<mnist|fashion_mnist|digits>/"
        f"<transform>' with a transform in {sorted(TRANSFORMS)}; tfmeta.tasks.domains.NAMES "
        "lists them all."
    )


def load_tasks(names: Sequence[str], data_dir=None) -> list[DatasetTask]:
    """The named tasks, each archive read once.

    Args:
        names: task names from `NAMES`.
        data_dir: TFDS data_dir (default `tfmeta.prepare.default_data_dir()`).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
        DatasetNotPreparedError: a TFDS dataset is not prepared; the message
            names the command that prepares it.

    Example::

        mnist, inverted = load_tasks(["mnist", "mnist/inverted"])
    """
    if isinstance(names, str):
        names = [names]
    specs = [_parse(name) for name in names]  # every name checked before any load
    archives, tasks = {}, []
    for name, (source, transform) in zip(names, specs):
        archive, select = _SOURCES[source]
        if archive not in archives:
            archives[archive] = _ARCHIVES[archive](data_dir)
        x_train, y_train, x_test, y_test = select(archives[archive])
        if transform:
            x_train, x_test = TRANSFORMS[transform](x_train), TRANSFORMS[transform](x_test)
        tasks.append(DatasetTask(name, x_train, y_train, x_test, y_test,
                                 source=source, transform=transform))
    return tasks


def load_task(name: str, data_dir=None) -> DatasetTask:
    """One named task (see `load_tasks`).

    Example::

        task = load_task("omniglot/evaluation_c")
        task.num_classes, task.num_examples["train"]
    """
    return load_tasks([name], data_dir)[0]


def task_family(names: Sequence[str], data_dir=None, augment=None) -> ClassificationTasks:
    """The named tasks as one task distribution; task index = position in `names`.

    Each task keeps its own label space; a shared head needs
    `family.num_classes` (the largest task's) outputs, and
    `as_dataset(..., with_task_ids=True)` tells which task each slot holds
    (for per-task heads).

    Args:
        names: task names from `NAMES` (distinct).
        data_dir: TFDS data_dir (default `tfmeta.prepare.default_data_dir()`).
        augment: default augmentation of the family (see `ClassificationTasks`).

    Example::

        sources = task_family(["mnist", "mnist/blur", "digits", "omniglot/background_b"])
        sources.task_names, sources.task_classes, sources.num_classes
    """
    names = [names] if isinstance(names, str) else list(names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"task names must be distinct, got {repeated} more than once.")
    return ClassificationTasks(load_tasks(names, data_dir), augment=augment)
