"""The embedded, no-download task family: few-way tasks over scikit-learn's digits.

`sklearn.datasets.load_digits` ships inside scikit-learn: 1797 real 8x8
handwritten digits (UCI "optdigits", 16 grey levels, ~180 per class), so this
family works on a fresh machine without any archive or network. It is a
smoke-scale, real-data task family for demos, the README's first command and
fast end-to-end tests; it is not a benchmark.

The family (Omniglot-style, in miniature):

* the images of each digit are split once, by the seed, into a pretraining
  pool and a held-out pool (`heldout_fraction`), so held-out tasks are
  fine-tuned and tested on images never seen in meta-training;
* a task is `ways`-way classification of `ways` random digits with a random
  label order (task i's label 0 may be a "7", task j's a "2"), with
  `train_shots` train and `test_shots` test images per class sampled from
  its pool.

Why this family: because labels are shuffled per task, no single output
layer solves all tasks, so what an initialization can carry across tasks is
the *features* (pen-stroke detectors that separate digits) and a head that
is quick to re-assign, which is what Leap, Reptile and CTS meta-learn. With a
small MLP (64-64-5), a few hundred meta-updates on CPU take seconds and give
an initialization that fine-tunes held-out tasks much faster than a random
one. Measured on 2 CPUs (SGD 0.1 inner, T=5, K=20, B=10): Reptile (outer SGD
1.0), 150 meta-updates in ~5 s: mean loss AUC over 20 fine-tuning steps on 4
held-out tasks 0.29 vs 1.29 from random inits (`tests/test_tasks.py`);
Leap (outer SGD 0.1), 300 meta-updates in ~8 s: loss AUC over 50 steps on all
20 held-out tasks 0.11 vs 0.90, test error 3% vs 10%. Random inits do learn
(digits are easy), so the comparison is about speed of fine-tuning, Leap's
metric.

Example::

    pretrain, heldout = digits_tasks()            # 100 + 20 five-way tasks, 8x8x1
    stream = pretrain.as_dataset(tasks_per_batch=5, inner_steps=20, batch_size=10,
                                 steps_per_chunk=20)
    finetune(model, heldout.finetune_data(0, batch_size=10),
             heldout.finetune_data(0, "test"), steps=20)
"""

from __future__ import annotations

import numpy as np

from tfmeta.tasks.classification import ClassificationTask, ClassificationTasks
from tfmeta.validation import check_positive_int, check_seed

__all__ = ["digits_arrays", "digits_tasks"]

NUM_DIGITS = 10


def digits_arrays(image_size: int = 8):
    """scikit-learn's 1797 digits as uint8 images `[N, s, s, 1]` (0..255) and labels.

    The 16 grey levels (0..16) are scaled to 0..255 (ink bright on a dark
    ground). `image_size` other than 8 resizes with antialiased bilinear
    interpolation (e.g. 28 to share a network with MNIST or Omniglot).

    Example::

        x, y = digits_arrays()
        x.shape, y.shape                  # (1797, 8, 8, 1), (1797,)
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) * (255.0 / 16.0)
    images = images[..., None]
    if image_size != images.shape[1]:
        import tensorflow as tf

        images = tf.image.resize(images, (image_size, image_size), antialias=True).numpy()
    images = np.round(np.clip(images, 0, 255)).astype(np.uint8)
    return images, digits.target.astype(np.int32)


def _check_count(name, value, minimum, what):
    check_positive_int(name, value, minimum=minimum,
                       fix=f"set digits_tasks.{name} to an integer >= {minimum} ({what})")


def digits_tasks(num_pretrain: int = 100, num_heldout: int = 20, ways: int = 5,
                 train_shots: int = 20, test_shots: int = 10, heldout_fraction: float = 0.4,
                 image_size: int = 8, seed: int = 0,
                 augment=None) -> tuple[ClassificationTasks, ClassificationTasks]:
    """Pretraining and held-out families of `ways`-way digit tasks with shuffled labels.

    Args:
        num_pretrain: pretraining tasks (drawn from the pretraining image pool).
        num_heldout: held-out tasks (drawn from the held-out image pool).
        ways: digits per task (2..10).
        train_shots: train images per class and task.
        test_shots: test images per class and task.
        heldout_fraction: share of each digit's images in the held-out pool.
        image_size: image height and width (8 = native).
        seed: seed of the pools, the tasks' digits, label orders and images.
        augment: default augmentation of both families, or None.

    Returns:
        `(pretrain, heldout)` `ClassificationTasks`; each task has
        `ways * train_shots` train and `ways * test_shots` test images,
        labels 0..ways-1, and is named after its digits in label order
        (e.g. "digits_7_2_9_0_4": label 0 is a 7).

    Example::

        pretrain, heldout = digits_tasks(seed=1)
        heldout.task(0).x_train.shape          # (100, 8, 8, 1)
    """
    _check_count("ways", ways, 2, f"digits per task, 2..{NUM_DIGITS}")
    if ways > NUM_DIGITS:
        raise ValueError(f"ways={ways} must be in 2..{NUM_DIGITS}: set digits_tasks.ways to at most {NUM_DIGITS}.")
    _check_count("num_pretrain", num_pretrain, 1, "pretraining tasks")
    _check_count("num_heldout", num_heldout, 1, "held-out tasks")
    _check_count("train_shots", train_shots, 1, "train images per class and task")
    _check_count("test_shots", test_shots, 0, "test images per class and task")
    _check_count("image_size", image_size, 1, "image height and width, 8 = native")
    if not (isinstance(heldout_fraction, (int, float)) and 0.0 < heldout_fraction < 1.0):
        raise ValueError(
            f"heldout_fraction={heldout_fraction!r} must be in (0, 1): set "
            "digits_tasks.heldout_fraction to e.g. 0.4."
        )
    images, labels = digits_arrays(image_size)
    rng = np.random.default_rng(check_seed(seed))  # None would be a new family every call

    pools = {"pretrain": {}, "heldout": {}}
    for digit in range(NUM_DIGITS):
        members = rng.permutation(np.flatnonzero(labels == digit))
        cut = int(round(len(members) * heldout_fraction))
        pools["heldout"][digit], pools["pretrain"][digit] = members[:cut], members[cut:]
    need = train_shots + test_shots
    for pool, members in pools.items():
        smallest = min(len(m) for m in members.values())
        if need > smallest:
            raise ValueError(
                f"train_shots + test_shots = {need} exceeds the {smallest} images of the "
                f"smallest digit in the {pool} pool; lower the shots or adjust heldout_fraction."
            )

    def make(pool, count):
        tasks = []
        for _ in range(count):
            chosen = rng.choice(NUM_DIGITS, size=ways, replace=False)  # order = label order
            train, test = [], []
            for label, digit in enumerate(chosen):
                picked = rng.choice(pools[pool][digit], size=need, replace=False)
                train += [(i, label) for i in picked[:train_shots]]
                test += [(i, label) for i in picked[train_shots:]]
            # [n, 2] even when empty (test_shots=0): (image index, label) pairs.
            train, test = (np.array(pairs, dtype=np.int64).reshape(-1, 2) for pairs in (train, test))
            tasks.append(ClassificationTask(
                "digits_" + "_".join(str(d) for d in chosen),
                images[train[:, 0]], train[:, 1], images[test[:, 0]], test[:, 1], ways,
            ))
        return ClassificationTasks(tasks, augment=augment)

    return make("pretrain", num_pretrain), make("heldout", num_heldout)
