"""Fine-tune a model from an initialization and measure it as Leap does.

``finetune`` trains with plain Keras ``compile``/``fit`` and records, at each
step k = 0..K-1, the loss and error of that step's mini-batch, computed in the
forward pass that produces the step's gradient (before the update, in
training mode), as the Leap code logs them. Its summary metrics are

- the area under the training-loss and training-error curves,
  ``area_under_curve(curve) = trapezoid(curve, dx=1) / K``
  ``= (1/K) * sum_{k=1}^{K-1} (curve[k-1] + curve[k]) / 2``,
  the composite trapezoidal rule divided by the number of recorded steps K
  (``compute_auc`` in amzn/metalearn-leap, src/omniglot/utils.py);
- the final held-out test loss and error from ``model.evaluate``.

Error is ``1 - accuracy`` with Keras' ``"accuracy"`` metric, i.e. argmax
agreement for multi-class outputs.

The per-step values are written by the compiled train step itself (into
preallocated variables), so Keras may run many steps per execution
(``steps_per_execution``) without returning to Python after every step; the
numbers are the same as with one step per execution.

``Finetuner`` runs ``finetune`` for many models of a few architectures (the
same body from many initializations, many targets): tracing Keras' train
and test functions costs seconds per ``finetune`` call, more than a thousand
steps of a small convnet on a CPU, and a ``Finetuner`` traces them once per
architecture. Its results equal ``finetune``'s, bit for bit.

Example::

    from tfmeta.export import load_initialization
    from tfmeta.finetune import finetune, plot_curves, random_initialization

    leap = finetune(load_initialization("runs/init", num_classes=5),
                    (x_train, y_train), (x_test, y_test), steps=100)
    scratch = finetune(random_initialization(model, seed=0),
                       (x_train, y_train), (x_test, y_test), steps=100)
    plot_curves({"leap": leap, "random": scratch}, "curves.png")
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tfmeta import atomic, validation
from tfmeta.input_options import without_autotuning

__all__ = [
    "FinetuneResult",
    "Finetuner",
    "area_under_curve",
    "finetune",
    "plot_curves",
    "random_initialization",
]


def area_under_curve(curve):
    """Leap's AUC of a per-step curve: trapezoidal rule with dx=1, over K steps.

    Example::

        area_under_curve([2.0, 1.0, 0.5])  # ((2 + 1) / 2 + (1 + 0.5) / 2) / 3
    """
    values = np.asarray(curve, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("area_under_curve needs a non-empty 1-D curve")
    return float((values[1:] + values[:-1]).sum() / 2.0 / values.size)


@dataclasses.dataclass
class FinetuneResult:
    """Per-step curves and summary metrics of one fine-tuning run.

    Attributes:
        losses: training loss of the mini-batch at each step (before its update).
        errors: training error (1 - accuracy) of the same mini-batches.
        loss_auc: ``area_under_curve(losses)``.
        error_auc: ``area_under_curve(errors)``.
        test_loss: held-out loss after fine-tuning, or None without test data.
        test_error: held-out error after fine-tuning, or None.

    Example::

        result = finetune(model, (x, y), steps=50)
        json.dumps(result.to_dict())
        result.plot("run.png")
    """

    losses: list
    errors: list
    loss_auc: float
    error_auc: float
    test_loss: float | None = None
    test_error: float | None = None

    @property
    def steps(self):
        """Number of recorded fine-tuning steps."""
        return len(self.losses)

    def to_dict(self):
        """JSON-serializable dict of all fields plus ``steps``."""
        return {**dataclasses.asdict(self), "steps": self.steps}

    def plot(self, path, label="finetune"):
        """Write a PNG of the loss and error curves; see ``plot_curves``."""
        return plot_curves({label: self}, path)


def plot_curves(results, path, *, title=None):
    """Plot the training loss and error curves of several runs into one PNG.

    ``results`` maps a legend label to a ``FinetuneResult``; each legend entry
    shows the run's AUC. Uses the Agg canvas directly, so the caller's
    matplotlib backend is untouched. Returns the written ``pathlib.Path``.

    Example::

        plot_curves({"leap": leap, "random init": scratch}, "curves.png")
    """
    if isinstance(results, FinetuneResult) or not isinstance(results, Mapping) or not all(
            isinstance(r, FinetuneResult) for r in results.values()):
        raise validation.ConfigError(
            f"plot_curves needs a dict from a legend label to a FinetuneResult, e.g. "
            f"{{'leap': result}}; got {type(results).__name__}")
    if not results:
        raise ValueError("plot_curves needs at least one result")
    path = pathlib.Path(path)
    if path.suffix.lower() != ".png":
        raise validation.ConfigError(f"plot_curves writes a PNG: give the path a .png suffix, "
                                     f"not {path.name!r}")
    if path.is_dir():
        raise validation.ConfigError(f"{path} is a folder: give plot_curves a file path, e.g. "
                                     f"{path / 'curves.png'}")
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, error_axes = figure.subplots(1, 2)
    for label, result in results.items():
        steps = np.arange(result.steps)
        loss_axes.plot(steps, result.losses, label=f"{label} (AUC {result.loss_auc:.3f})")
        error_axes.plot(steps, result.errors, label=f"{label} (AUC {result.error_auc:.3f})")
    for axes, name in ((loss_axes, "training loss"), (error_axes, "training error")):
        axes.set_xlabel("fine-tuning step")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_atomic(path) as handle:  # a crash keeps the old PNG
        figure.savefig(handle, format="png", dpi=100)
    return path


def finetune(
    model,
    train_data,
    test_data=None,
    *,
    steps=100,
    optimizer=None,
    loss=None,
    batch_size=20,
    seed=0,
    callbacks=None,
    steps_per_execution="auto",
    verbose=0,
):
    """Fine-tune ``model`` in place for ``steps`` steps and return the curves.

    The model is compiled with ``optimizer`` (default ``SGD(0.1)``, Leap's
    inner optimizer), ``loss`` (default sparse categorical cross-entropy on
    logits) and the ``"accuracy"`` metric, then trained with one
    ``fit(..., steps_per_epoch=steps)`` call, running
    ``steps_per_execution`` steps per call of Keras' compiled train function.

    Args:
        model: a built ``keras.Model``; it is trained in place.
        train_data: a ``tf.data.Dataset`` of ``(x, y)`` batches (repeated when
            it runs out; shuffle it yourself) or a tuple of arrays ``(x, y)``
            (shuffled with ``seed``, repeated, batched by ``batch_size``).
        test_data: optional held-out ``Dataset`` of batches or ``(x, y)``.
        steps: number of optimizer steps.
        optimizer: Keras optimizer or its name.
        loss: Keras loss or its name.
        batch_size: batch size for array inputs.
        seed: shuffling seed for array inputs. Stochastic layers (dropout)
            draw from Keras' global seed (``keras.utils.set_random_seed``).
        callbacks: extra Keras callbacks for ``fit``. Metrics are reset before
            every step so that batch logs are per-step values (Keras otherwise
            reports running means), hence callbacks also see per-step values
            and the epoch logs are those of the last step. Keras calls the
            batch hooks once per execution, so with callbacks the default
            runs one step per execution.
        steps_per_execution: steps per call of the compiled train function
            (Keras' ``compile`` option; also used by ``evaluate``). ``"auto"``:
            the largest divisor of ``steps`` up to 50 without ``callbacks``
            (1 for a prime ``steps`` above 50), 1 with ``callbacks``. An
            integer must divide ``steps``; callbacks then see the logs of
            every execution's last step. Results do not depend on it. The
            model stays compiled with it (and the optimizer and loss), so a
            later ``model.fit`` runs that many steps per execution too.
        verbose: ``fit``/``evaluate`` verbosity.

    Returns:
        ``FinetuneResult``.

    Example::

        result = finetune(model, (x_train, y_train), (x_test, y_test), steps=100)
        result.loss_auc, result.test_error
    """
    _check_steps(steps)
    batch_size, seed = _check_batching(batch_size, seed)
    execution = _execution_size(steps, steps_per_execution, callbacks)
    _compile(model, optimizer, loss, execution)
    curves = _record_steps(model, steps)
    try:
        return _train_and_test(model, curves, train_data, test_data, steps, batch_size, seed,
                               callbacks, verbose, checked=set())
    finally:
        _stop_recording(model)


class Finetuner:
    """``finetune`` with the same settings for many models, each architecture traced once.

    A Finetuner keeps one compiled working copy per architecture (one class,
    configs equal up to names, the same variables). A call copies the model's state
    (weights, BatchNorm statistics, seed generators) into that copy, restores
    its optimizer to its state before the first step, fine-tunes the copy and
    copies the weights back, so the model ends fine-tuned as with
    ``finetune``, and the result is ``finetune``'s with the same arguments,
    bit for bit. Keras' train and test functions are traced once per
    architecture instead of once per call. Unlike ``finetune``, the model
    is left uncompiled, and there are no callbacks (use ``finetune``).

    Args:
        steps, optimizer, loss, batch_size, steps_per_execution, verbose: as
            for ``finetune``; each working copy gets its own optimizer, made
            from ``optimizer``'s config (a name or an instance).

    Example::

        tune = Finetuner(steps=1000, optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        for init in initializations:                      # one trace in all
            result = tune(with_new_head(init, 10), (x, y), (x_test, y_test), seed=0)
    """

    def __init__(self, steps=100, optimizer=None, loss=None, batch_size=20,
                 steps_per_execution="auto", verbose=0):
        _check_steps(steps)
        batch_size, _ = _check_batching(batch_size, 0)
        self.steps, self.batch_size, self.verbose = steps, batch_size, verbose
        self._execution = _execution_size(steps, steps_per_execution, None)
        _check_optimizer(optimizer)
        self._optimizer = optimizer
        self._loss = None if loss is None else validation.resolve_loss(loss)
        self._copies = {}  # architecture -> (working copy, curves, initial optimizer state)
        self._checked = set()  # (architecture, data shapes) whose loss fits the model

    @property
    def architectures(self):
        """How many architectures it has compiled (traced) so far."""
        return len(self._copies)

    def __call__(self, model, train_data, test_data=None, *, seed=0):
        """Fine-tune ``model`` in place like ``finetune(model, ..., seed=seed)``; its ``FinetuneResult``."""
        if not isinstance(model, keras.Model) or not model.built:
            raise validation.ConfigError(
                f"Finetuner needs a built Keras model, got {model!r}: give it an Input "
                "(keras.Input(shape)) or call model.build(input_shape) first.")
        _, seed = _check_batching(self.batch_size, seed)
        working, curves, start = self._working_copy(model)
        _copy_state(model, working)
        for variable, value in zip(working.optimizer.variables, start, strict=True):
            variable.assign(value)
        curves.count.assign(0)
        result = _train_and_test(working, curves, train_data, test_data, self.steps,
                                 self.batch_size, seed, None, self.verbose, self._checked)
        _copy_state(working, model)
        return result

    def _working_copy(self, model):
        key = _architecture(model)
        if key not in self._copies:
            working = random_initialization(model)
            optimizer = self._optimizer
            if isinstance(optimizer, keras.optimizers.Optimizer):
                if getattr(optimizer, "_exclude_from_weight_decay", None) or getattr(
                        optimizer, "_exclude_from_weight_decay_pattern", None):
                    raise ValueError(
                        "Finetuner makes each copy's optimizer from the optimizer's config, which "
                        "does not hold exclude_from_weight_decay: fine-tune with finetune(), or "
                        "leave weight decay to all variables"
                    )
                optimizer = optimizer.__class__.from_config(optimizer.get_config())
            _compile(working, optimizer, self._loss, self._execution)
            working.optimizer.build(working.trainable_variables)
            start = [variable.numpy() for variable in working.optimizer.variables]
            self._copies[key] = working, _record_steps(working, self.steps), start
        return self._copies[key]


def _architecture(model):
    """``model``'s class, config, build config and variables (shape, dtype, trainable), as JSON.

    Names in the config are replaced by their order of appearance: equal keys
    mean the same layers, connected the same way, frozen the same way; only
    the names (``input_layer_3`` in one model, ``input_layer_7`` in the next)
    may differ.
    """
    try:
        config = [type(model).__module__, type(model).__qualname__, model.get_config(),
                  model.get_build_config(),
                  [(tuple(v.shape), str(v.dtype), bool(v.trainable)) for v in model.variables]]
    except NotImplementedError:
        raise ValueError(
            f"Finetuner needs models Keras can clone (get_config), and {model.name!r} has none: "
            "implement get_config, or fine-tune it with finetune()"
        ) from None
    names = {}

    def collect(value):  # every "name" entry, in order: layers, input layers, the model
        if isinstance(value, dict):
            if isinstance(value.get("name"), str):
                names.setdefault(value["name"], f"name {len(names)}")
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    def renamed(value):
        if isinstance(value, str):
            return names.get(value, value)
        if isinstance(value, dict):
            return {key: renamed(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [renamed(item) for item in value]
        return value

    def refuse(value):
        raise ValueError(f"{model.name!r}'s config holds {value!r}, which is not JSON: Finetuner "
                         "cannot tell its architecture; fine-tune it with finetune()")

    collect(config)
    return json.dumps(renamed(config), sort_keys=True, default=refuse)


def _check_steps(steps):
    validation.check_positive_int("steps", steps, "the number of optimizer steps, e.g. steps=100")


def _check_batching(batch_size, seed):
    """`(batch_size, seed)` checked: a whole batch size, and an integer seed or None (random)."""
    batch_size = validation.check_positive_int("batch_size", batch_size)
    return batch_size, None if seed is None else validation.check_seed(seed)


def _check_optimizer(optimizer):
    """Refuse an optimizer whose learning rate would not descend (e.g. SGD(-0.1): ascent)."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        validation.check_learning_rate(optimizer, "the fine-tuning optimizer")


def _compile(model, optimizer, loss, execution):
    _check_optimizer(optimizer)
    if optimizer is None:
        optimizer = keras.optimizers.SGD(learning_rate=0.1)
    if loss is None:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    loss = validation.resolve_loss(loss)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"],
                  steps_per_execution=execution)


def _copy_state(source, target):
    """Assign every variable of ``target`` (weights and seed generators) from ``source``'s, in order."""
    pairs = list(zip(source.variables, target.variables, strict=True))
    for have, want in pairs:
        if tuple(have.shape) != tuple(want.shape):
            raise ValueError(f"{source.name!r} and {target.name!r} differ in {have.path}: "
                             f"{tuple(have.shape)} against {tuple(want.shape)}")
    for have, want in pairs:
        want.assign(have)


def _train_and_test(model, curves, train_data, test_data, steps, batch_size, seed, callbacks,
                    verbose, checked):
    """One ``fit`` of ``steps`` steps of the compiled, recording ``model``, then ``evaluate``.

    ``checked``: the (model, data shapes) whose loss was checked already (a set it adds to).
    """
    shapes = _check_data(model, train_data, "train_data")
    if test_data is not None:
        _check_data(model, test_data, "test_data")
    if shapes is not None and (id(model), shapes) not in checked:
        _check_loss(model, *shapes)
        checked.add((id(model), shapes))
    model.fit(
        without_autotuning(_training_dataset(train_data, batch_size, seed)),
        epochs=1,
        steps_per_epoch=steps,
        shuffle=False,
        callbacks=callbacks,
        verbose=verbose,
    )
    losses, errors = curves.read()
    test_loss = test_error = None
    if test_data is not None:
        if not isinstance(test_data, tf.data.Dataset):
            # Keras would build an autotuned stream from the arrays (see tfmeta.input_options).
            test_data = tf.data.Dataset.from_tensor_slices(tuple(test_data)).batch(batch_size)
        scores = model.evaluate(without_autotuning(test_data), return_dict=True, verbose=verbose)
        test_loss = float(scores["loss"])
        test_error = 1.0 - float(scores["accuracy"])
    return FinetuneResult(
        losses=losses,
        errors=errors,
        loss_auc=area_under_curve(losses),
        error_auc=area_under_curve(errors),
        test_loss=test_loss,
        test_error=test_error,
    )


def random_initialization(model, seed=0):
    """Clone ``model``'s architecture with fresh weights: the no-pretraining baseline.

    Uses ``keras.models.clone_model``, which rebuilds every layer from its
    config, so weights (and BatchNorm moving statistics) come from the
    layers' initializers, never from ``model``. The clone is built with
    ``model``'s build config. Weights are a function of ``seed`` for
    Sequential, functional and subclassed models, and the global seeds are
    left untouched.

    Example::

        baseline = random_initialization(load_initialization("runs/init"), seed=1)
    """
    # Keras gives every unseeded initializer (and SeedGenerator) its seed from
    # Python's `random` module when it is constructed, and initializers with an
    # integer seed are deterministic. Seeding that module only while the clone
    # is constructed and built therefore fixes every fresh weight by `seed`
    # without disturbing the caller's random state.
    state = random.getstate()
    random.seed(seed)
    try:
        clone = keras.models.clone_model(model)
        if not clone.built and model.built:
            clone.build_from_config(model.get_build_config())
    finally:
        random.setstate(state)
    return clone


# Keras runs an execution's steps in a tf.while_loop (not unrolled), so the
# graph does not grow with its size; what a larger execution saves is the
# return to Python per execution, already a small part of 50 steps' compute
# (docs/performance.md), while the progress bar (verbose) updates once per
# execution.
_MAX_STEPS_PER_EXECUTION = 50


def _execution_size(steps, steps_per_execution, callbacks):
    """Steps per execution: a divisor of ``steps``, as Keras runs whole executions.

    Keras runs ceil(steps / n) executions of n steps each, i.e. more steps
    than asked when n does not divide ``steps``.
    """
    if steps_per_execution == "auto":
        if callbacks:
            return 1  # callbacks see every step's logs
        return max(n for n in range(1, min(steps, _MAX_STEPS_PER_EXECUTION) + 1) if steps % n == 0)
    if (isinstance(steps_per_execution, bool) or not isinstance(steps_per_execution, int)
            or steps_per_execution < 1 or steps % steps_per_execution):
        raise ValueError(
            f"steps_per_execution={steps_per_execution!r} does not divide steps={steps}: Keras "
            "runs whole executions, so it would train more steps than asked; pass a positive "
            "divisor of steps or 'auto'"
        )
    return steps_per_execution


class _StepCurves:
    """Per-step loss and accuracy that the compiled train step writes at its step index."""

    def __init__(self, steps):
        # float64 holds a float32 or float64 metric exactly, as float() does.
        self.losses = tf.Variable(tf.zeros([steps], tf.float64), trainable=False)
        self.accuracies = tf.Variable(tf.zeros([steps], tf.float64), trainable=False)
        self.count = tf.Variable(0, trainable=False)

    def record(self, logs):
        self.losses[self.count].assign(tf.cast(logs["loss"], tf.float64))
        self.accuracies[self.count].assign(tf.cast(logs["accuracy"], tf.float64))
        self.count.assign_add(1)

    def read(self):
        """``(losses, errors)`` of the steps run, as lists of Python floats."""
        count = int(self.count.numpy())
        return self.losses.numpy()[:count].tolist(), (1.0 - self.accuracies.numpy()[:count]).tolist()


def _record_steps(model, steps):
    """From now on ``model``'s train step records into the returned ``_StepCurves``.

    Keras builds its train function from ``model.train_step`` when ``fit``
    starts, so an instance attribute wraps it (``_stop_recording`` removes it).
    """
    curves = _StepCurves(steps)
    train_step = model.train_step

    def recording_step(data):
        # Keras' logs are running means over the epoch; resetting the metrics
        # before each step makes them the current mini-batch's values.
        model.reset_metrics()
        logs = train_step(data)
        curves.record(logs)
        return logs

    model.train_step = recording_step
    return curves


def _stop_recording(model):
    """Undo ``_record_steps``; the train function goes too, since its graph writes into the curves."""
    del model.train_step
    model.train_function = None


def _check_data(model, data, name):
    """Refuse data the compiled ``model`` cannot take, in one line naming the fix
    (``tfmeta.validation.check_examples``; labels outside its classes for a sparse loss).

    Returns ``(x shape, y shape, y dtype)`` of a batch where they are known, else None.
    """
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        if name == "test_data" and cardinality == int(tf.data.INFINITE_CARDINALITY):
            # evaluate would read it forever.
            raise validation.ConfigError(
                f"test_data is an endless stream (it repeats): pass held-out examples that end, "
                f"e.g. tasks.finetune_data(i, 'test') or test_data.take(n)")
        if cardinality == 0:
            raise validation.ConfigError(
                f"{name} yields no batches: pass a dataset with examples (a .take(0), .skip() "
                "or .filter() may have emptied it)")
        spec = data.element_spec
        if not isinstance(spec, (tuple, list)) or len(spec) < 2:
            raise validation.ConfigError(
                f"{name} yields inputs only, not (x, y) batches: zip in the labels, e.g. "
                f"tf.data.Dataset.from_tensor_slices((x, y)).batch(20)")
        expected = validation.model_input_shape(model)
        x_spec, y_spec = spec[0], spec[1]
        if (expected is not None and isinstance(x_spec, tf.TensorSpec)
                and x_spec.shape.rank == len(expected)):
            raise validation.ConfigError(
                f"{name} yields single examples of shape {tuple(x_spec.shape)}, not batches: "
                f"batch it first (e.g. {name}.batch(20))")
        if isinstance(x_spec, tf.TensorSpec):
            validation.warn_if_unscaled(model, x_spec.dtype, name)
        if isinstance(x_spec, tf.TensorSpec) and isinstance(y_spec, tf.TensorSpec) and \
                x_spec.shape.rank is not None and y_spec.shape.rank is not None:
            return tuple(x_spec.shape), tuple(y_spec.shape), y_spec.dtype.name
        return None
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise validation.ConfigError(
            f"{name} must be a tf.data.Dataset of (x, y) batches or a tuple of arrays (x, y), "
            f"got {type(data).__name__}")
    x, y = (np.asarray(part) for part in data)
    validation.check_examples(model, x, y, name)
    validation.warn_if_unscaled(model, x.dtype, name)
    validation.check_labels(model, y, model.loss, name, fix=None)
    return (None, *x.shape[1:]), (None, *y.shape[1:]), y.dtype.name


_LOSS_FIX = "pass loss=keras.losses.SparseCategoricalCrossentropy(from_logits={})"


def _check_loss(model, x_shape, y_shape, y_dtype):
    """Refuse a loss that cannot compare these labels with the model's outputs, or
    reads its class scores as the other kind (softmax as logits, logits as
    probabilities: the string 'sparse_categorical_crossentropy' means probabilities)."""
    from_logits = validation.loss_from_logits(model.loss)
    if from_logits is not None:
        validation.check_score_kind(model, from_logits, probabilities_fix=_LOSS_FIX.format(False),
                                    logits_fix=_LOSS_FIX.format(True))
    # As one task's batch of a task batch [T = 1, S = 1, B, ...].
    validation.check_loss_on_outputs(model, model.loss, (1, 1, *x_shape), (1, 1, *y_shape), y_dtype)


def _training_dataset(train_data, batch_size, seed):
    if isinstance(train_data, tf.data.Dataset):
        return train_data.repeat()
    x, y = train_data
    # Shuffle once per pass and repeat before batching, so every batch is
    # full (batches run across pass boundaries) like Leap's task batches.
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size)
    )
