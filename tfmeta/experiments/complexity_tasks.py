"""The named tasks, models and training recipe of the complexity experiments.

Tasks are named (:func:`task_arrays`): ``"mnist"``, ``"fashion_mnist"``,
``"fashion_mnist_inverted"``, ``"mnist_random"``, ``"mnist_0-4"``,
``"omniglot"``, optionally with ``"@k"`` to take another block of examples
(``"mnist@3"``: MNIST images 30000.., the same task on other samples). Each
task has a label space (:func:`label_space`): tasks in one space name the
same classes. Models: :func:`mlp_classifier`, :func:`conv_classifier`;
training: :func:`default_recipe`.

Example::

    x, y = task_arrays("mnist", examples=300)
    model = mlp_classifier(num_classes=10)
"""

from __future__ import annotations

import functools

import keras
import numpy as np

from tfmeta.complexity import TrainingRecipe, sgd

__all__ = [
    "BLOCK",
    "OMNIGLOT_DRAWINGS",
    "TASKS",
    "conv_classifier",
    "default_recipe",
    "export_baseline",
    "label_space",
    "mlp_classifier",
    "relabel",
    "task_arrays",
]

BLOCK = 10000

#: Named tasks: source dataset, default block, label space. Tasks in one
#: label space name the same classes (so a union shares their labels).
TASKS = {
    "mnist": ("mnist", 0, "digits"),
    "mnist_random": ("mnist", 1, "digits"),
    "mnist_0-4": ("mnist", 2, "digits"),
    "fashion_mnist": ("fashion_mnist", 0, "fashion"),
    "fashion_mnist_inverted": ("fashion_mnist", 0, "fashion"),
    "omniglot": ("omniglot", 0, "omniglot"),
}

OMNIGLOT_DRAWINGS = 20

def mlp_classifier(num_classes: int = 10, input_shape=(28, 28, 1), units=(256,)):
    """The experiments' network: Flatten -> [Dense(u, relu)]* -> Dense(logits).

    Example::

        model = mlp_classifier(num_classes=50)      # 784-256-50, 213,810 params
    """
    model = keras.Sequential([keras.Input(tuple(input_shape)), keras.layers.Flatten()],
                             name="mlp_classifier")
    for width in units:
        model.add(keras.layers.Dense(int(width), activation="relu"))
    model.add(keras.layers.Dense(int(num_classes), name="head"))
    return model


def conv_classifier(num_classes: int = 10, input_shape=(28, 28, 1), filters=(16, 32),
                    units=128):
    """A small convnet: [Conv 3x3 (f, relu) -> MaxPool 2]* -> Flatten ->
    Dense(units, relu) -> Dense(logits). No BatchNorm, so the model has no
    non-trainable state and ``C_beta`` covers all of it.

    Example::

        model = conv_classifier(num_classes=10)     # 108,618 params for 10 classes
    """
    layers = keras.layers
    model = keras.Sequential([keras.Input(tuple(input_shape))], name="conv_classifier")
    for f in filters:
        model.add(layers.Conv2D(int(f), 3, activation="relu"))
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    if units:
        model.add(layers.Dense(int(units), activation="relu"))
    model.add(layers.Dense(int(num_classes), name="head"))
    return model


def _parse(spec):
    name, _, block = str(spec).partition("@")
    if name not in TASKS:
        raise ValueError(
            f"unknown task {spec!r}; known tasks: {sorted(TASKS)} (optionally with "
            "'@k' for another block of examples, e.g. 'mnist@3')"
        )
    dataset, default_block, space = TASKS[name]
    if block:
        try:
            block = int(block)
        except ValueError:
            raise ValueError(f"task {spec!r}: the block after '@' must be an integer") from None
    else:
        block = default_block
    return name, dataset, block, space


def label_space(spec) -> str:
    """The label space of a named task (``"digits"``, ``"fashion"``, ...)."""
    return _parse(spec)[3]


@functools.lru_cache(maxsize=4)
def _train_split(dataset, data_dir):
    from tfmeta.tasks.datasets import image_arrays

    arrays = image_arrays(dataset, "train", image_size=28, channels=1, data_dir=data_dir)
    return arrays["image"], arrays["label"].astype(np.int32)


@functools.lru_cache(maxsize=2)
def _omniglot(data_dir):
    from tfmeta.tasks.omniglot import omniglot_arrays

    arrays = omniglot_arrays(28, data_dir)
    return arrays["image"], arrays["label"].astype(np.int32)


def relabel(y, fraction, num_classes=10, seed=0):
    """Labels with ``round(fraction * N)`` examples (chosen uniformly without
    replacement) given labels drawn uniformly from ``0..num_classes-1``
    (about ``1/num_classes`` of them coincide with the true label, as in
    Zhang et al.'s random-label experiments).

    Example::

        y_noisy = relabel(y, 0.5, seed=1)
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    y = np.array(y, np.int32, copy=True)
    rng = np.random.default_rng([int(seed), 0xC0FFEE])
    chosen = rng.permutation(len(y))[: int(round(float(fraction) * len(y)))]
    y[chosen] = rng.integers(0, num_classes, size=len(chosen))
    return y


def task_arrays(spec: str, examples: int = 1000, seed: int = 0, data_dir=None):
    """A named real task as ``(x, y)``: float32 ``[N, 28, 28, 1]`` in [0, 1]
    and int32 labels.

    Tasks (``spec``; ``"name@k"`` takes the examples from block ``k`` of the
    train split, i.e. indices ``k * BLOCK ..``):

    * ``"mnist"``: the first ``examples`` MNIST training images of block 0;
    * ``"fashion_mnist"``: the same from Fashion-MNIST;
    * ``"fashion_mnist_inverted"``: Fashion-MNIST with ``1 - x`` (the
      paper's "ifashion");
    * ``"mnist_random"``: MNIST images of block 1 with every label drawn
      uniformly at random (seeded by ``seed``); no image is shared with
      ``"mnist"``;
    * ``"mnist_0-4"``: the first ``examples`` block-2 MNIST images of digits
      0-4 (a 5-class sub-task of ``"mnist"`` on other images);
    * ``"omniglot"``: ``examples // 20`` Omniglot characters drawn at random
      (seeded by ``seed`` and the block) from all 50 alphabets, all 20
      drawings of each, labels ``0..examples//20 - 1`` (the character);
      grey 28x28, Lanczos-resized, inverted so strokes are bright on a dark
      ground like MNIST (``tfmeta.tasks.omniglot.omniglot_arrays``).

    The order is TFDS's (MNIST's is already mixed); training code shuffles.

    Example::

        x, y = task_arrays("omniglot", examples=1000)    # 50 characters x 20
        x.shape, int(y.max()) + 1                        # (1000, 28, 28, 1), 50
    """
    name, dataset, block, _ = _parse(spec)
    examples = int(examples)
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    if name == "omniglot":
        images, labels = _omniglot(data_dir)
        characters = examples // OMNIGLOT_DRAWINGS
        if characters < 2:
            raise ValueError(
                f"omniglot needs examples >= {2 * OMNIGLOT_DRAWINGS} (20 drawings per "
                f"character), got {examples}"
            )
        rng = np.random.default_rng([int(seed), block, 0x0A1])
        chosen = rng.choice(int(labels.max()) + 1, size=characters, replace=False)
        index = np.concatenate([np.flatnonzero(labels == c) for c in chosen])
        remap = np.full(int(labels.max()) + 1, -1, np.int32)
        remap[chosen] = np.arange(characters, dtype=np.int32)
        x, y = images[index], remap[labels[index]]
        order = np.random.default_rng([int(seed), block, 0x0A2]).permutation(len(x))
        x, y = x[order], y[order]
    else:
        images, labels = _train_split(dataset, data_dir)
        start = block * BLOCK
        if start >= len(images):
            raise ValueError(
                f"task {spec!r}: block {block} starts at {start}, past the "
                f"{len(images)} training images; use a block < {len(images) // BLOCK}"
            )
        stop = min(len(images), start + BLOCK)
        x, y = images[start:stop], labels[start:stop]
        if name == "mnist_0-4":
            keep = y < 5
            x, y = x[keep], y[keep]
        if examples > len(x):
            raise ValueError(
                f"task {spec!r} has only {len(x)} examples in its block; ask for fewer"
            )
        x, y = x[:examples], y[:examples]
        if name == "mnist_random":
            y = relabel(y, 1.0, 10, seed=int(seed) * 1000 + block)
    x = x.astype(np.float32) / 255.0
    if name == "fashion_mnist_inverted":
        x = 1.0 - x
    return x, np.asarray(y, np.int32)


def default_recipe(weight_decay, **overrides):
    """SGD lr 0.1 with decoupled weight decay ``2 gamma`` (= the gradient of the
    penalty ``gamma ||w||^2`` of ``beta = 2 lam^2 gamma``), batch 32, training
    loss threshold 0.1, budget 20000 steps, checks every 10 steps.

    Example::

        recipe = default_recipe(5e-4, seed=1)
    """
    base = dict(
        optimizer=functools.partial(sgd, learning_rate=0.1, weight_decay=2.0 * weight_decay),
        steps=20000, batch_size=32, loss_threshold=0.1, eval_every=10, seed=0,
    )
    base.update(overrides)
    return TrainingRecipe(**base)


def export_baseline(path, num_classes: int, seed: int):
    """A random initialization of an exported initialization's architecture,
    with a head of ``num_classes``: ``keras.models.clone_model`` of the
    loaded export (every layer's initializers run again, under ``seed``).

    Example::

        baseline = export_baseline("runs/leap/initialization", num_classes=10, seed=0)
    """
    from tfmeta.export import load_initialization

    loaded = load_initialization(path, num_classes=int(num_classes), head="reset")
    keras.utils.set_random_seed(int(seed))
    return keras.models.clone_model(loaded)
