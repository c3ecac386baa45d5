"""Whole TFDS image classification datasets as tasks (Leap's Multi-CV, CTS's large-scale setting).

`datasets_as_tasks(("mnist", "fashion_mnist"))` makes one task per dataset:
the dataset's train split is the task's train set, its test split the task's
test set. Images are resized to a common `image_size` and channel count, so
one network takes them all.

Heads. Tasks with different label sets need some output layer per task, or a
shared one:

* the CTS reference code gives each source dataset its own classifier head
  and excludes the head's parameters (named "fc") from meta-learning; only
  the body is the meta-learned initialization, and a fresh head is trained
  at meta-test;
* Leap's Omniglot code uses one shared 20-way head for all (20-way) tasks,
  and its multi-headed *pretraining* baseline one head per alphabet;
* tfmeta's task batches carry no task identity, so we use one shared head
  with `num_classes = max(task classes)` outputs: a task with fewer classes
  never has labels on the extra logits, whose logits its loss pushes down.
  Omniglot as one dataset uses its character label, so such a shared head
  needs 1623 outputs. To reproduce "new head at meta-test", replace or
  re-initialize the head before fine-tuning (its meta-learned value is then
  simply unused).

Decoded, resized arrays are cached as compressed `.npz` files in
`array_cache_dir(data_dir)` (the `arrays/` folder beside the TFDS data_dir,
outside the repository), so the decode and resize happen once per machine.

Example::

    tasks = datasets_as_tasks(("mnist", "fashion_mnist"), train_examples=10000)
    tasks.num_tasks, tasks.num_classes      # (2, 10)
    stream = tasks.as_dataset(tasks_per_batch=2, inner_steps=1000, batch_size=128,
                              steps_per_chunk=50)
"""

from __future__ import annotations

import os
import pathlib
import re
import zipfile
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfmeta import atomic
from tfmeta.prepare import load, resolve_data_dir
from tfmeta.tasks.classification import ClassificationTask, ClassificationTasks

__all__ = ["array_cache_dir", "cached_arrays", "datasets_as_tasks", "image_arrays"]

# Bump when the conversion below changes, so stale caches are not reused.
CACHE_FORMAT = 1


def array_cache_dir(data_dir=None) -> pathlib.Path:
    """Folder of cached decoded arrays: `arrays/` beside the TFDS data_dir.

    With the default data_dir that is `~/.cache/tfmeta/arrays/`.

    Example::

        array_cache_dir()  # PosixPath('/home/me/.cache/tfmeta/arrays')
    """
    return resolve_data_dir(data_dir).parent / "arrays"


def cached_arrays(path, build: Callable[[], dict]) -> dict:
    """Load the arrays saved at `path` (.npz), or `build()` them and save them.

    The file is written atomically (`tfmeta.atomic.open_atomic`: a hidden
    temporary file renamed into place), so concurrent builders and crashes
    never leave a half-written cache (the last builder wins, with identical
    content). An unreadable cache is rebuilt.

    Example::

        arrays = cached_arrays(array_cache_dir() / "toy.npz", lambda: {"x": np.zeros(3)})
    """
    path = pathlib.Path(path)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            pass  # Truncated or foreign file: rebuild below.
    arrays = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_atomic(path) as handle:
        np.savez_compressed(handle, **arrays)
    return arrays


def _convert(image, image_size, channels, method, invert):
    """uint8 [h, w, c] -> uint8 [size, size, channels]."""
    have = image.shape[-1]
    image = tf.cast(image, tf.float32)
    if have == 4:  # RGBA: drop alpha
        image, have = image[..., :3], 3
    if have != channels:
        if have == 3 and channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        elif have == 1 and channels == 3:
            image = tf.tile(image, [1, 1, 3])
        else:
            raise ValueError(f"cannot convert {have}-channel images to {channels} channels.")
    size = (image_size, image_size)
    if tuple(image.shape[:2]) != size:
        # Antialiasing: downscaling (e.g. Omniglot's 105 px to 28) must average,
        # not sample, or thin strokes break up.
        image = tf.image.resize(image, size, method=method, antialias=True)
    if invert:
        image = 255.0 - image
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def _cache_name(name, version, split, image_size, channels, method, invert):
    split = re.sub(r"[^A-Za-z0-9_.+-]", "_", split)
    inverted = "-inv" if invert else ""
    return (
        f"{name}-{version}-{split}-{image_size}x{image_size}x{channels}-{method}{inverted}"
        f"-f{CACHE_FORMAT}.npz"
    )


def image_arrays(name: str, split: str, *, image_size: int, channels: int, data_dir=None,
                 features: Sequence[str] | None = None, image_key: str = "image",
                 method: str = "bilinear", invert: bool = False, cache: bool = True) -> dict:
    """A prepared TFDS split as numpy arrays: resized uint8 images and labels.

    Args:
        name: TFDS dataset name (prepared in `data_dir`, see `tfmeta.prepare`).
        split: TFDS split string ("train", "train+test", "train[:1000]").
        image_size: output height and width.
        channels: output channels (1 grey, 3 RGB).
        data_dir: TFDS data_dir (default `tfmeta.prepare.default_data_dir()`).
        features: feature names to keep besides the image (default: the
            supervised label only, returned as "label").
        image_key: the image feature's name.
        method: `tf.image.resize` method.
        invert: store 255 - image (bright strokes on dark ground).
        cache: read/write the `.npz` cache in `array_cache_dir(data_dir)`.

    Returns:
        `{"image": uint8 [N, size, size, channels], <feature>: [N], ...}`
        in TFDS's file order.

    Example::

        arrays = image_arrays("mnist", "test", image_size=28, channels=1)
        arrays["image"].shape, arrays["label"].shape   # (10000, 28, 28, 1), (10000,)
    """
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(data_dir)
    supervised = features is None

    def build():
        ds = load(name, split, data_dir=data_dir, as_supervised=supervised, shuffle_files=False)
        if supervised:
            ds = ds.map(lambda image, label: {image_key: image, "label": label})
        keys = ["label"] if supervised else list(features)

        def convert(example):
            image = _convert(example[image_key], image_size, channels, method, invert)
            return (image, *[example[k] for k in keys])

        parts = [[] for _ in range(len(keys) + 1)]
        batches = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(4096)
        for batch in batches.as_numpy_iterator():
            for part, value in zip(parts, batch):
                part.append(value)
        return {
            "image": np.concatenate(parts[0]),
            **{k: np.concatenate(p) for k, p in zip(keys, parts[1:])},
        }

    if not cache:
        return build()
    version = tfds.builder(name, data_dir=os.fspath(data_dir)).version
    extra = "" if supervised else "-" + "+".join(sorted(features))
    path = array_cache_dir(data_dir) / _cache_name(
        name + extra, version, split, image_size, channels, method, invert
    )
    return cached_arrays(path, build)


def datasets_as_tasks(names: Sequence[str] = ("mnist", "fashion_mnist"), image_size: int = 28,
                      channels: int = 1, train_examples: int | None = None,
                      test_examples: int | None = None, data_dir=None,
                      train_split: str = "train", test_split: str = "test",
                      augment=None) -> ClassificationTasks:
    """Whole TFDS image classification datasets, one task each.

    Any TFDS dataset with an image and a supervised label works once it is
    prepared (see `tfmeta.prepare`); images are resized (antialiased
    bilinear) to `image_size` and converted to `channels` (RGB -> grey by
    luminance, grey -> RGB by copying). Omniglot counts as one task over its
    1623 character labels (splits "train" = background, "test" = evaluation
    alphabets, which share no characters: use e.g. `train_split="train+test"`
    and hold out examples yourself if you want a meaningful test set).

    The shared head needs `num_classes = max(classes)` outputs; see the
    module docstring for how CTS and Leap handle heads.

    Args:
        names: TFDS dataset names, one task each (task names = these).
        image_size: common height and width.
        channels: common channel count.
        train_examples: keep the first N train examples of each dataset in
            TFDS's file order (deterministic; MNIST's order is already mixed).
        test_examples: the same for the test split.
        data_dir: TFDS data_dir (default `tfmeta.prepare.default_data_dir()`).
        train_split, test_split: TFDS splits of each task's train and test sets.
        augment: default augmentation of the returned family (see
            `ClassificationTasks`).

    Raises:
        DatasetNotPreparedError: a dataset is not prepared; the message names
            the command that prepares it.

    Example::

        tasks = datasets_as_tasks(("mnist", "fashion_mnist"))
        finetune(model, tasks.finetune_data(1), tasks.finetune_data(1, "test"), steps=1000)
    """
    if isinstance(names, str):
        names = [names]

    def limit(split, count):
        return split if count is None else f"{split}[:{int(count)}]"

    tasks = []
    for name in names:
        splits = {}
        for role, split, count in (("train", train_split, train_examples),
                                   ("test", test_split, test_examples)):
            splits[role] = image_arrays(
                name, limit(split, count), image_size=image_size, channels=channels,
                data_dir=data_dir,
            )
        num_classes = _num_classes(name, data_dir)
        tasks.append(ClassificationTask(
            name, splits["train"]["image"], splits["train"]["label"],
            splits["test"]["image"], splits["test"]["label"], num_classes,
        ))
    return ClassificationTasks(tasks, augment=augment)


def _num_classes(name, data_dir):
    """The dataset's label count from its TFDS metadata (not the labels seen)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=os.fspath(resolve_data_dir(data_dir)))
    label_key = (builder.info.supervised_keys or (None, "label"))[1]
    return int(builder.info.features[label_key].num_classes)
