"""Training to a loss threshold with plain Keras ``fit``.

The static distance trains one model per dataset with the same recipe, and
reachability counts the SGD steps a fine-tuning run needs to bring the
training loss below a threshold. Both use :func:`fit_to_threshold`.

"Training loss" here is the mean cross-entropy of the model in inference mode
on (the first ``eval_examples`` of) the training set, evaluated every
``eval_every`` steps; Keras' running-average batch loss is not used because it
lags behind the weights. Step counts therefore have a resolution of
``eval_every``, unless ``fine_check_factor`` is set: once a check finds the
loss at or below ``fine_check_factor * loss_threshold`` the loss is checked
after every step, so the run stops at the first step whose loss is under the
threshold and the trained model (whose ``C_beta`` is then measured) is taken
at that defined point rather than wherever the run was between two checks.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple, Union

import keras
import tensorflow as tf

from tfmeta.complexity import _data
from tfmeta.heads import find_head, with_new_head
from tfmeta.input_options import without_autotuning
from tfmeta.validation import check_positive_int

__all__ = [
    "NOT_CONVERGED",
    "TrainResult",
    "TrainingRecipe",
    "copy_model",
    "fit_to_threshold",
    "replace_head",
    "sgd",
    "train",
]

#: Marks a fine-tuning run that did not reach the threshold in ``steps``.
NOT_CONVERGED = -1


def sgd(learning_rate: float = 0.1, momentum: float = 0.0,
        weight_decay: Optional[float] = None):
    """Default optimizer factory: ``keras.optimizers.SGD``."""
    return keras.optimizers.SGD(
        learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay
    )


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """How every model of a comparison is trained (same recipe for all).

    Attributes:
      optimizer: zero-argument factory returning a fresh Keras optimizer.
      steps: budget of SGD steps; a run that has not reached
        ``loss_threshold`` by then is "not converged".
      batch_size: mini-batch size.
      loss_threshold: stop as soon as the training loss (inference mode,
        mean cross-entropy) is <= this; None trains for exactly ``steps``.
      eval_every: check the threshold every this many steps.
      eval_examples: examples of the training set used for the check
        (None: all).
      seed: seeds the model construction (``keras.utils.set_random_seed``),
        the shuffling and hence the whole run.
      from_logits: whether the models output logits.
      jit_compile: passed to ``model.compile`` (False by default: it avoids an
        XLA compilation per trained model, which dominates on small tasks).
      fine_check_factor: None (default: check every ``eval_every`` steps
        only), or a factor ``>= 1``: once a check's loss is at or below
        ``fine_check_factor * loss_threshold``, check after every step, so
        that a converged run stops at the first step under the threshold
        (step resolution 1 near the end; :attr:`TrainResult.resolution`).
    """

    optimizer: Callable[[], keras.optimizers.Optimizer] = sgd
    steps: int = 2000
    batch_size: int = 32
    loss_threshold: Optional[float] = 0.05
    eval_every: int = 10
    eval_examples: Optional[int] = 4096
    seed: int = 0
    from_logits: bool = True
    jit_compile: Union[bool, str] = False
    fine_check_factor: Optional[float] = None

    def __post_init__(self):
        # Each of these used to fail late and raw (ZeroDivisionError, a TF error) or,
        # worse, silently: a threshold of 0 is never reached, so every run of a
        # comparison came out "not converged".
        for name in ("steps", "batch_size", "eval_every"):
            check_positive_int(name, getattr(self, name), f"set TrainingRecipe({name}=...) to a count")
        if self.eval_examples is not None:
            check_positive_int("eval_examples", self.eval_examples,
                               "set it to a count of training examples, or None for all")
        threshold = self.loss_threshold
        if threshold is not None and (isinstance(threshold, bool) or not threshold > 0):
            raise ValueError(
                f"loss_threshold={threshold!r} must be None or > 0: a cross-entropy never "
                "reaches 0, so no run would converge; e.g. loss_threshold=0.05")
        if isinstance(self.optimizer, keras.optimizers.Optimizer) or not callable(self.optimizer):
            raise ValueError(
                f"optimizer={self.optimizer!r} must be a zero-argument factory (every model of "
                "a comparison gets a fresh optimizer): e.g. "
                "optimizer=lambda: keras.optimizers.SGD(0.1)")
        factor = self.fine_check_factor
        if factor is not None and not factor >= 1.0:
            raise ValueError(
                f"fine_check_factor must be None or >= 1 (a multiple of loss_threshold), "
                f"got {factor!r}; e.g. fine_check_factor=2.0 checks every step once the loss "
                "is within 2x of the threshold")


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`fit_to_threshold`.

    Attributes:
      model: the trained model (trained in place).
      steps: SGD steps taken (multiple of ``eval_every`` unless the budget
        ended the run).
      converged: whether the loss threshold was reached (True when the recipe
        has no threshold).
      initial_loss, final_loss: training loss before and after.
      curve: ``[(step, loss), ...]`` at every check.
      resolution: the spacing of the checks when the run stopped (1 when
        ``recipe.fine_check_factor`` had switched to checking every step,
        else ``recipe.eval_every``): a converged run's loss first went under
        the threshold within the last ``resolution`` steps.
    """

    model: keras.Model
    steps: int
    converged: bool
    initial_loss: float
    final_loss: float
    curve: List[Tuple[int, float]]
    resolution: int = 1


class _ThresholdStop(keras.callbacks.Callback):
    def __init__(self, evaluate, recipe, curve):
        super().__init__()
        self._evaluate = evaluate
        self._recipe = recipe
        self._curve = curve
        self.steps = 0
        self.converged = False
        self.every = int(recipe.eval_every)
        self.observe(curve[-1][1])

    def observe(self, loss):
        """Switch to checking every step once ``loss`` is near the threshold."""
        r = self._recipe
        if (r.fine_check_factor is not None and r.loss_threshold is not None
                and loss <= r.fine_check_factor * r.loss_threshold):
            self.every = 1

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        r = self._recipe
        if self.steps % self.every == 0 or self.steps >= r.steps:
            loss = self._evaluate()
            self._curve.append((self.steps, loss))
            self.observe(loss)
            if r.loss_threshold is not None and loss <= r.loss_threshold:
                self.converged = True
                self.model.stop_training = True
        if self.steps >= r.steps:
            self.model.stop_training = True


def copy_model(model, model_fn=None):
    """A new model with ``model``'s architecture and weights.

    Uses ``model_fn()`` when given (needed for subclassed models), else
    ``keras.models.clone_model``.
    """
    new = model_fn() if model_fn is not None else keras.models.clone_model(model)
    if not new.built:
        try:
            new.build(model.input_shape)
        except Exception as err:  # subclassed models without input_shape
            raise ValueError(
                "could not build the copy of the initialization; pass a model_fn "
                "that returns a built model"
            ) from err
    new.set_weights(model.get_weights())
    return new


def replace_head(model, num_classes: int, seed: Optional[int] = 0):
    """A copy of ``model`` whose final ``Dense`` layer (the head) is replaced by
    a freshly initialized one with ``num_classes`` units.

    The body (every layer but the last) is copied with its weights, so
    ``model`` itself is not modified; the new head has the old head's config
    (activation, initializers, regularizers) with ``units=num_classes`` and is
    initialized under ``keras.utils.set_random_seed(seed)`` (``seed=None``
    leaves the global seed alone). This is how the complexity experiments
    fine-tune a source model on a target task with another label set.

    Works for ``Sequential`` and single-output functional models whose output
    is produced by their last layer.

    Example::

        mnist_model = train(mnist, recipe, model_fn=lambda: mlp(10)).model
        start = replace_head(mnist_model, num_classes=50)   # for a 50-way task
        run = fit_to_threshold(start, omniglot50, recipe)
    """
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    find_head(model)  # refuse a model without a replaceable head before copying it
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
    return with_new_head(copy_model(model), int(num_classes))


def fit_to_threshold(model, data, recipe: TrainingRecipe) -> TrainResult:
    """Train ``model`` in place on ``data`` with ``recipe`` (Keras ``fit``)
    until the training loss reaches ``recipe.loss_threshold`` or
    ``recipe.steps`` steps are spent.

    ``data`` is ``(x, y)`` arrays or a batched dataset of ``(x, y)``; it is
    materialized in memory, shuffled with ``recipe.seed`` each epoch.
    """
    x, y = _data.to_numpy(data)
    _data.check_supervised(model, x, y)
    n = int(x.shape[0])
    eval_n = n if recipe.eval_examples is None else min(n, int(recipe.eval_examples))
    eval_data = (x[:eval_n], y[:eval_n])
    curve: List[Tuple[int, float]] = []

    def evaluate():
        return _data.mean_cross_entropy(model, eval_data, recipe.from_logits)[0]

    initial = evaluate()
    curve.append((0, initial))
    if recipe.loss_threshold is not None and initial <= recipe.loss_threshold:
        return TrainResult(model, 0, True, initial, initial, curve, 1)
    if recipe.steps <= 0:
        return TrainResult(model, 0, recipe.loss_threshold is None, initial, initial, curve,
                           int(recipe.eval_every))

    keras.utils.set_random_seed(recipe.seed)
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(min(n, 65536), seed=recipe.seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(int(recipe.batch_size))
        .prefetch(2)
    )
    model.compile(
        optimizer=recipe.optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=recipe.from_logits),
        jit_compile=recipe.jit_compile,
    )
    stopper = _ThresholdStop(evaluate, recipe, curve)
    model.fit(without_autotuning(ds), epochs=1, steps_per_epoch=int(recipe.steps), verbose=0,
              shuffle=False, callbacks=[stopper])
    final = curve[-1][1] if curve[-1][0] == stopper.steps else evaluate()
    converged = stopper.converged or (
        recipe.loss_threshold is None or final <= recipe.loss_threshold
    )
    return TrainResult(model, stopper.steps, bool(converged), initial, final, curve,
                       stopper.every)


def train(data, recipe: TrainingRecipe, model_fn=None, init=None) -> TrainResult:
    """Train a fresh model on ``data``: ``model_fn()`` built under
    ``keras.utils.set_random_seed(recipe.seed)``, or a copy of ``init``
    (fine-tuning; ``init`` itself is not modified)."""
    if init is None and model_fn is None:
        raise ValueError("pass model_fn or init")
    keras.utils.set_random_seed(recipe.seed)
    if init is not None:
        model = copy_model(init, model_fn)
    else:
        model = model_fn()
    return fit_to_threshold(model, data, recipe)
