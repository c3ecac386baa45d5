"""Leap's Omniglot experiment: one 20-way task per alphabet.

Flennerhag et al. (2019, section 3) make each Omniglot alphabet with at
least 20 characters one task: 20-way classification of 20 of its characters,
28x28 grey images, 5 drawings per character held out as the task's test set.
Meta-training uses 1 to 25 pretraining alphabets; 10 alphabets are held out
for meta-test.

How this module builds it from TFDS's `omniglot` (prepared offline, see
`tfmeta.prepare`):

* all 50 alphabets: splits "train" (30 background alphabets) + "test"
  (20 evaluation alphabets), 1623 characters x 20 drawings = 32460 images;
  46 alphabets have >= 20 characters and are eligible for `ways=20`;
* images: 105x105x3 -> grey -> 28x28 with an antialiased Lanczos-3 resize
  (Leap's `resize.py` uses PIL's LANCZOS), then **inverted**: strokes bright
  (1.0) on a dark (0.0) background. Leap keeps white backgrounds, where
  torchvision's affine fill (0) paints black corners; with inverted images
  the fill value 0 *is* the background, so `random_affine` adds no artefacts;
* the seed shuffles the eligible alphabets (sorted by name); the first
  `num_heldout` are held out and the next `num_pretrain` pretrain. Held-out
  alphabets therefore do not depend on `num_pretrain`, and the pretraining
  sets of a sweep over 1, 3, 5, ... alphabets are nested. (Leap's code takes
  pretraining alphabets first and the test ones after them, so its test set
  changes with the number of pretraining alphabets);
* per alphabet, the seed picks the `ways` characters (their order is the
  label order 0..ways-1) and, per character, the `test_shots` test drawings
  (Leap: the first 5 files by name; TFDS does not keep file names). A task
  depends only on the seed and its alphabet, not on the split it lands in.

Decoded 28x28 arrays are cached as a compressed `.npz` (about 7 MB) in
`tfmeta.tasks.datasets.array_cache_dir(data_dir)`, i.e. `~/.cache/tfmeta/arrays/`
by default, so only the first call pays the decode and resize (~15 s on 2 CPUs).

Example::

    from tfmeta.tasks import random_affine
    pretrain, heldout = omniglot_alphabets(num_pretrain=25, augment=random_affine())
    stream = pretrain.as_dataset(tasks_per_batch=20, inner_steps=100, batch_size=20,
                                 steps_per_chunk=10)
    heldout.finetune_data(0)           # 300 train images of a held-out alphabet
"""

from __future__ import annotations

import os

import numpy as np

from tfmeta.tasks.classification import ClassificationTask, ClassificationTasks
from tfmeta.prepare import resolve_data_dir
from tfmeta.tasks.datasets import image_arrays
from tfmeta.validation import check_seed

__all__ = ["omniglot_alphabets", "omniglot_arrays"]

DRAWINGS_PER_CHARACTER = 20


def omniglot_arrays(image_size: int = 28, data_dir=None) -> dict:
    """All 32460 Omniglot images (inverted grey uint8) with their label features.

    Returns:
        `{"image": [32460, s, s, 1] uint8, "label": character (0..1622),
        "alphabet": alphabet (0..49), "alphabet_char_id": character within
        its alphabet, "alphabet_names": [50] str}`, images in TFDS's order.

    Example::

        arrays = omniglot_arrays()
        arrays["image"].shape         # (32460, 28, 28, 1)
    """
    import tensorflow_datasets as tfds

    arrays = image_arrays(
        "omniglot", "train+test", image_size=image_size, channels=1, data_dir=data_dir,
        features=("label", "alphabet", "alphabet_char_id"), method="lanczos3", invert=True,
    )
    info = tfds.builder("omniglot", data_dir=os.fspath(resolve_data_dir(data_dir))).info
    arrays["alphabet_names"] = np.array(info.features["alphabet"].names)
    return arrays


def omniglot_alphabets(num_pretrain: int | None = 25, num_heldout: int = 10, ways: int = 20,
                       test_shots: int = 5, image_size: int = 28, seed: int = 0, data_dir=None,
                       augment=None) -> tuple[ClassificationTasks, ClassificationTasks]:
    """Leap's Omniglot task families: (pretraining alphabets, held-out alphabets).

    Args:
        num_pretrain: pretraining alphabets (Leap: 1, 3, 5, 10, 15, 20 or
            25); None for every eligible alphabet that is not held out.
        num_heldout: held-out (meta-test) alphabets (Leap: 10).
        ways: characters per task; only alphabets with at least this many
            characters are used.
        test_shots: drawings per character held out for each task's test
            split (of 20; Leap: 5, leaving 15 train drawings).
        image_size: height and width of the grey images.
        seed: seed of the alphabet split, character choice and test drawings.
        data_dir: TFDS data_dir (default `tfmeta.prepare.default_data_dir()`).
        augment: default augmentation of both families (Leap:
            `tfmeta.tasks.random_affine()`), or None.

    Returns:
        `(pretrain, heldout)`, two `ClassificationTasks` of `ways`-way tasks
        named after their alphabets, with `ways * (20 - test_shots)` train and
        `ways * test_shots` test images each.

    Raises:
        ValueError: more alphabets requested than have `ways` characters.
        DatasetNotPreparedError: Omniglot is not prepared (and not cached).

    Example::

        pretrain, heldout = omniglot_alphabets(num_pretrain=5, seed=1)
        pretrain.task_names, heldout.num_tasks     # [...5 alphabets], 10
    """
    if not 0 < test_shots < DRAWINGS_PER_CHARACTER:
        raise ValueError(
            f"test_shots must be in 1..{DRAWINGS_PER_CHARACTER - 1} (each character has "
            f"{DRAWINGS_PER_CHARACTER} drawings), got {test_shots}."
        )
    if ways < 2:
        raise ValueError(f"ways must be >= 2, got {ways}.")
    seed = check_seed(seed)  # None would be a new split every call
    arrays = omniglot_arrays(image_size, data_dir)
    images, labels, alphabets = arrays["image"], arrays["label"], arrays["alphabet"]
    names = arrays["alphabet_names"]

    characters = {a: np.unique(labels[alphabets == a]) for a in range(len(names))}
    # Sorted by name so the shuffle below depends only on the seed.
    eligible = sorted((a for a, c in characters.items() if len(c) >= ways), key=lambda a: names[a])
    available = len(eligible) - num_heldout
    if num_heldout < 1 or available < 1:
        raise ValueError(
            f"num_heldout={num_heldout} must be in 1..{len(eligible) - 1}: {len(eligible)} "
            f"alphabets have >= {ways} characters."
        )
    if num_pretrain is None:
        num_pretrain = available
    if not 1 <= num_pretrain <= available:
        raise ValueError(
            f"num_pretrain={num_pretrain} is not available: {len(eligible)} alphabets have "
            f">= {ways} characters and {num_heldout} are held out, leaving at most "
            f"{available} for pretraining; lower num_pretrain or num_heldout (or ways)."
        )
    order = [eligible[i] for i in np.random.default_rng(seed).permutation(len(eligible))]
    heldout, pretrain = order[:num_heldout], order[num_heldout:num_heldout + num_pretrain]

    # Drawings of each character, in TFDS's (fixed) order.
    by_label = np.argsort(labels, kind="stable")
    first = np.searchsorted(labels[by_label], np.arange(labels.max() + 2))

    def task(a):
        rng = np.random.default_rng([seed, int(a)])
        chosen = rng.choice(characters[a], size=ways, replace=False)
        train, test = [], []
        for new_label, character in enumerate(chosen):
            drawings = by_label[first[character]:first[character + 1]]
            if len(drawings) != DRAWINGS_PER_CHARACTER:
                raise ValueError(
                    f"character {character} has {len(drawings)} drawings, expected "
                    f"{DRAWINGS_PER_CHARACTER}: is the cached Omniglot array complete?"
                )
            held = np.zeros(len(drawings), bool)
            held[rng.choice(len(drawings), size=test_shots, replace=False)] = True
            train += [(i, new_label) for i in drawings[~held]]
            test += [(i, new_label) for i in drawings[held]]
        train, test = np.array(train), np.array(test)
        return ClassificationTask(
            str(names[a]), images[train[:, 0]], train[:, 1], images[test[:, 0]], test[:, 1], ways,
        )

    return (
        ClassificationTasks([task(a) for a in pretrain], augment=augment),
        ClassificationTasks([task(a) for a in heldout], augment=augment),
    )
