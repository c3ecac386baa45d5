"""Checks of a meta-training setup that fail early, in one line, naming the fix.

Everything here runs before the first train step (`tools/train.py` calls
these right after building the model and the task stream, `MetaModel`
calls the model-level ones in `__init__`, `compile`, `build` and `fit`), so a
wrong setting costs seconds, not a training run. Each error is a
`ConfigError` (a `ValueError`) with a one-line message that says what is
wrong and what to change.

Example::

    from tfmeta import validation

    validation.check_learning_rate(keras.optimizers.SGD(-0.1), "inner_optimizer")
    # ConfigError: inner_optimizer (SGD) has learning rate -0.1; it must be a finite number > 0 ...
"""

from __future__ import annotations

import difflib
import logging
import math
import types

import numpy as np

__all__ = [
    "ConfigError",
    "INNER_STEPS_MARK",
    "check_class_ids",
    "check_examples",
    "check_inner_steps_of",
    "check_labels",
    "check_learning_rate",
    "check_loss_dtype",
    "check_loss_on_outputs",
    "check_max_task_loss",
    "check_positive_int",
    "check_task_batch",
    "check_task_batches",
    "check_trainable",
    "is_meta_model",
    "is_sparse_loss",
    "mark_inner_steps",
    "model_input_shape",
    "output_units",
    "resolve_loss",
    "warn_if_unscaled",
]


class ConfigError(ValueError):
    """A setup error, in one line naming the problem and the fix.

    Raised for a wrong gin configuration (a configurable or parameter that
    does not exist) and for every check here, before any training: the
    command line prints it as one line.
    """


def check_positive_int(name, value, fix=None, minimum=1):
    """`value` as an int >= `minimum`, or a ConfigError naming `fix`."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum
    if not ok:
        hint = fix or f"set {name} to an integer >= {minimum}"
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}: {hint}.")
    return int(value)


def check_flag(name, value):
    """`value` if it is a bool, else a ConfigError (bool("false") would be True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def check_keys(name, given, known, what="tasks"):
    """Refuse keys of the mapping `given` that are not in `known` (a typo would be ignored)."""
    unknown = [k for k in (given or {}) if k not in known]
    if unknown:
        guesses = {k: difflib.get_close_matches(str(k), [str(n) for n in known], n=1) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {g[0]!r}?" for k, g in guesses.items() if g)
        raise ConfigError(
            f"{name} names {unknown} but the {what} are {list(known)}"
            + (f" ({hint})" if hint else "") + f": key {name} by those names."
        )


def check_seed(value, name="seed"):
    """`value` as an int64 seed, or a ConfigError: a seed names one stream.

    Not int(): seed=2.5 would quietly be stream 2, and seed=None is not a
    stream at all (these streams are stateless: there is no "unseeded" one).
    """
    integer = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if not integer or not -2**63 <= int(value) < 2**63:
        raise ConfigError(
            f"{name}={value!r} must be an integer that fits in int64: every stream here "
            f"is a function of its seed, so pass one, e.g. {name}=0."
        )
    return int(value)


def _learning_rate_value(optimizer):
    rate = getattr(optimizer, "learning_rate", None)
    if rate is None:
        return None
    schedule = getattr(optimizer, "_learning_rate", None)
    if callable(schedule) and not hasattr(schedule, "numpy"):
        rate = schedule(0)
    try:
        return float(np.asarray(rate))
    except (TypeError, ValueError):
        return None


def check_learning_rate(optimizer, name, setting=None, allow_zero=False):
    """Raise a ConfigError if `optimizer`'s learning rate (at step 0) is not > 0 and finite.

    Args:
        optimizer: a Keras optimizer (or None: nothing to check).
        name: what the optimizer is ("inner_optimizer", "optimizer").
        setting: the setting to change, for the message (e.g.
            "inner/SGD.learning_rate").
        allow_zero: accept 0 (a frozen loop: `MetaModel` allows it for
            experiments; `tools/train.py` does not).
    """
    if optimizer is None:
        return
    rate = _learning_rate_value(optimizer)
    if rate is None:
        return
    if not (math.isfinite(rate) and (rate > 0 or (allow_zero and rate == 0))):
        where = setting or f"the learning_rate of {name}"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(
            f"{name} ({type(optimizer).__name__}) has learning rate {rate}; it must be a "
            f"finite number {bound}: set {where} to e.g. 0.1."
        )


def model_input_shape(model):
    """The per-example input shape ``model`` declares (None where it declares none)."""
    inputs = getattr(model, "inputs", None)
    if inputs:
        return tuple(inputs[0].shape[1:])
    shape = (model.get_build_config() or {}).get("input_shape")
    if isinstance(shape, (tuple, list)):
        return tuple(shape[1:])
    return None


def check_task_batch(model, x_shape, y_shape=None):
    """Check task batches `[T, S, B, *input_shape]` against `model`'s input.

    Raises a ConfigError naming the expected shape when the rank or the
    per-example shape differs.
    """
    x_shape = tuple(None if d is None else int(d) for d in x_shape)
    expected = model_input_shape(model)
    layout = "[tasks T, steps per chunk S, batch B, *input_shape]"
    if expected is None:
        if len(x_shape) < 4:
            raise ConfigError(
                f"task batches must be {layout}; got shape {x_shape}: produce them "
                "with a tfmeta.tasks distribution's as_dataset."
            )
        return
    want = 3 + len(expected)
    if len(x_shape) != want:
        raise ConfigError(
            f"task batches have shape {x_shape} (rank {len(x_shape)}) but the model "
            f"takes inputs {expected}, so task batches must be {layout} = "
            f"[T, S, B, {', '.join(str(d) for d in expected)}] (rank {want}): build the "
            "stream with a tfmeta.tasks distribution's as_dataset, or give the model "
            f"Input(shape={x_shape[3:]})."
        )
    for have, need in zip(x_shape[3:], expected):
        if need is not None and have is not None and have != need:
            raise ConfigError(
                f"task batch examples have shape {x_shape[3:]} but the model takes "
                f"{expected}: make the model's input shape {x_shape[3:]} (e.g. "
                "mlp.input_shape / convnet.input_shape) or resize the tasks' images "
                "(e.g. image_size=...)."
            )
    if y_shape is not None:
        y_shape = tuple(y_shape)
        if tuple(y_shape[:3]) != tuple(x_shape[:3]):
            raise ConfigError(
                f"labels have shape {y_shape} but inputs {x_shape}: y must be "
                "[T, S, B, ...] with the same T, S, B as x."
            )


def output_units(model):
    """The last dimension of ``model``'s first output (None where it declares none)."""
    outputs = getattr(model, "outputs", None)
    if outputs:
        return outputs[0].shape[-1]
    return None


def is_sparse_loss(loss):
    """Whether `loss` (a Keras loss, its name or a function) takes class ids as labels."""
    name = getattr(loss, "name", None) or getattr(loss, "__name__", "") or str(loss)
    return "sparse" in str(name).lower() or "Sparse" in type(loss).__name__


#: How meta-training labels outside the model's classes are fixed (`check_labels`).
_TASK_LABELS_FIX = ("give the model's head {classes} units (e.g. mlp.num_classes = {classes} / "
                    "convnet.num_classes = {classes}) or use tasks with fewer classes.")


def check_labels(model, y, loss, name="task", fix=_TASK_LABELS_FIX):
    """Check that integer labels `y` index the model's outputs (sparse losses).

    For `SparseCategoricalCrossentropy` (or any loss named "sparse..."), the
    labels must lie in `0..units-1` where `units` is the model's last output
    dimension (`check_class_ids`, with `name` and `fix`; None: its default fix).
    """
    if not is_sparse_loss(loss):
        return
    units = output_units(model)
    y = np.asarray(y)
    if units is None or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        return
    check_class_ids(name, y, units, fix)


def check_examples(model, x, y, name="data"):
    """Refuse arrays ``(x, y)`` of examples ``model`` cannot take, in one line
    that names the fix: unequal lengths, no examples, non-finite inputs,
    examples of another shape than the model takes.

    Example::

        check_examples(model, x, y[:60], "train_data")
        # ConfigError: train_data has 64 inputs but 60 labels: pass one label per example
    """
    if len(x) != len(y):
        raise ConfigError(f"{name} has {len(x)} inputs but {len(y)} labels: pass one label "
                          "per example")
    if len(x) == 0:
        raise ConfigError(f"{name} has no examples")
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():
            raise ConfigError(
                f"{name} has non-finite inputs (NaN or inf) in {int((~finite).sum())} examples, "
                f"the first at index {int(np.flatnonzero(~finite)[0])}: drop or repair them")
    expected = model_input_shape(model)
    if expected is not None and (len(expected) != x.ndim - 1 or any(
            need is not None and need != have for need, have in zip(expected, x.shape[1:]))):
        raise ConfigError(
            f"{name} examples have shape {tuple(x.shape[1:])} but the model takes "
            f"{tuple(expected)}: reshape the data or use a model for this input shape")


#: How labels outside a model's classes are fixed outside meta-training (`check_class_ids`).
_CLASS_IDS_FIX = ("give it a head with {classes} classes (num_classes={classes}, e.g. "
                  "load_initialization(path, num_classes={classes}) or "
                  "tfmeta.complexity.replace_head) or relabel the data")


def check_class_ids(name, y, units, fix=None):
    """Refuse sparse labels ``y`` outside ``0..units-1`` (a model of ``units`` classes);
    ``fix`` (default: a new head or relabelled data) is formatted with ``classes``,
    the head size the labels need.

    Example::

        check_class_ids("train_data", y, 10)
        # ConfigError: train_data labels range over 0..11 but the model has 10 outputs ...
    """
    low, high = int(np.min(y)), int(np.max(y))
    if low < 0 or high >= units:
        raise ConfigError(
            f"{name} labels range over {low}..{high} but the model has {units} outputs "
            f"(classes 0..{units - 1}): " + (fix or _CLASS_IDS_FIX).format(classes=high + 1))


#: The message of `assert_class_ids`' error, followed by the lowest and highest label and the classes.
# (No quote in it: TensorFlow's error text escapes quotes.)
LABELS_OUT_OF_RANGE = "tfmeta: task batch labels outside the model classes; lowest, highest, classes:"


def assert_class_ids(y, units):
    """In a graph: an op that raises InvalidArgumentError (`LABELS_OUT_OF_RANGE`, the
    lowest and highest label, `units`) when a label of `y` is outside 0..units-1.

    The CPU kernels of sparse losses check this themselves; under XLA and on
    GPUs nothing does, and a task's loss turns NaN (its task is then skipped
    as diverged) or silently wrong.

    Example::

        with tf.control_dependencies([assert_class_ids(y, 10)]):
            y = tf.identity(y)
    """
    import tensorflow as tf

    low, high = tf.reduce_min(y), tf.reduce_max(y)
    classes = tf.constant(units, y.dtype)
    return tf.debugging.Assert(tf.logical_and(low >= 0, high < classes),
                               [LABELS_OUT_OF_RANGE, low, high, classes])


#: The attribute of a task stream that holds the K it was built for (`mark_inner_steps`).
INNER_STEPS_MARK = "tfmeta_inner_steps"


def mark_inner_steps(dataset, inner_steps):
    """`dataset` (a task distribution's stream), marked with the K its trajectories keep
    each meta-batch's tasks for, so that `MetaModel.fit` can check compile's K
    (`check_inner_steps_of`). Any transformation of the dataset drops the mark.

    Example::

        return mark_inner_steps(stream, inner_steps)   # in TaskDistribution.as_dataset
    """
    setattr(dataset, INNER_STEPS_MARK, int(inner_steps))
    return dataset


def check_inner_steps_of(dataset, inner_steps):
    """Refuse a task stream marked with another K than `inner_steps` (unmarked: not known).

    Its trajectories would silently mix two meta-batches' tasks (a shorter
    stream K) or run one meta-batch's tasks as several trajectories (a longer one).
    """
    built = getattr(dataset, INNER_STEPS_MARK, None)
    if built is not None and built != inner_steps:
        raise ConfigError(
            f"the task stream keeps each meta-batch's tasks for inner_steps={built} but "
            f"compile has inner_steps={inner_steps}, so trajectories would not be one "
            f"meta-batch's {inner_steps} steps: build the stream with "
            f"as_dataset(inner_steps={inner_steps}, ...) or compile with inner_steps={built}"
        )


_WARNED_UNSCALED = set()


def warn_if_unscaled(model, dtype, name="x"):
    """Log one warning when integer inputs (uint8 images in 0..255, say) reach a model
    that does not rescale them itself: it still trains, on inputs 255x too large.

    Not an error: a model may begin with a layer of its own that takes them
    (Rescaling, Normalization, Embedding and the lookups are recognized).

    Example::

        warn_if_unscaled(model, x.dtype, "train_data")   # x: uint8 digits
        # WARNING tfmeta: train_data is uint8 ... convert with x.astype("float32") / 255 ...
    """
    import keras
    import tensorflow as tf

    dtype = tf.as_dtype(dtype)
    if not dtype.is_integer:
        return False
    first = model
    while isinstance(first, keras.Model):
        layers = [layer for layer in first.layers if not isinstance(layer, keras.layers.InputLayer)]
        if not layers:
            return False
        first = layers[0]
    takes_integers = (keras.layers.Rescaling, keras.layers.Normalization, keras.layers.Embedding,
                      keras.layers.IntegerLookup, keras.layers.CategoryEncoding,
                      keras.layers.Discretization, keras.layers.Hashing)
    if isinstance(first, takes_integers):
        return False
    key = (id(model), name, dtype.name)
    if key in _WARNED_UNSCALED:  # once per model and input, however many calls check it
        return True
    _WARNED_UNSCALED.add(key)
    logging.getLogger("tfmeta").warning(
        "%s is %s, and the model (first layer %r) does not rescale it: integer images "
        "(0..255) train and measure on inputs 255x larger than tfmeta's task streams "
        "(float32 in [0, 1]). Convert with x.astype(\"float32\") / 255, or begin the "
        "model with keras.layers.Rescaling(1 / 255).", name, dtype.name, first.name,
    )
    return True


def last_layer(model):
    """The layer that makes the output of a Sequential or functional model (None if unknown)."""
    import keras

    while isinstance(model, keras.Sequential) or (
            type(model) is keras.Model or type(model).__name__ == "Functional"):
        if not model.layers:
            return None
        if isinstance(model, keras.Sequential):
            model = model.layers[-1]
        else:
            outputs = model.outputs or []
            if len(outputs) != 1:
                return None
            model = outputs[0]._keras_history.operation
    return model if isinstance(model, keras.layers.Layer) else None


def check_score_kind(model, from_logits, probabilities_fix="pass from_logits=False",
                     logits_fix="pass from_logits=True"):
    """Refuse a model whose last layer makes the other kind of class scores than
    `from_logits` says: softmax probabilities read as logits, or a linear Dense's
    logits read as probabilities (both train or measure silently wrong numbers).
    Subclassed models, whose layers do not tell, are taken on trust.

    Example::

        check_score_kind(softmax_model, from_logits=True)
        # ConfigError: the model outputs probabilities (its last layer 'dense_1' applies softmax) ...
    """
    import keras

    layer = last_layer(model)
    if layer is None:
        return
    activation = getattr(layer, "activation", None)
    if from_logits and (isinstance(layer, keras.layers.Softmax) or activation is keras.activations.softmax):
        raise ConfigError(
            f"the model outputs probabilities (its last layer {layer.name!r} applies softmax) "
            f"but from_logits=True reads them as logits: {probabilities_fix}, or end the "
            "model in logits.")
    if not from_logits and activation is keras.activations.linear and isinstance(layer, keras.layers.Dense):
        raise ConfigError(
            f"the model outputs logits (its last layer {layer.name!r} is a Dense without "
            f"activation) but from_logits=False reads them as probabilities: {logits_fix}.")


def loss_from_logits(loss):
    """A categorical cross-entropy's `from_logits` (its name's default: False), else None."""
    if _builtin_name(loss) not in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        return None
    return bool(getattr(loss, "_fn_kwargs", {}).get("from_logits", False))


def is_meta_model(model):
    """Whether `model` is a `tfmeta.MetaModel` (found by name: the parts below
    `meta_model` cannot import it), whose own input is a stream of task batches."""
    return any(kind.__name__ == "MetaModel" for kind in type(model).__mro__)


def check_trainable(model):
    """Refuse a model without trainable weights: there would be no phi to meta-learn."""
    if not model.trainable_variables:
        raise ConfigError(
            f"the model {model.name!r} has no trainable weights, so there is no "
            "initialization (phi) to meta-learn: unfreeze it (model.trainable = True, or "
            "trainable=True on its layers) before wrapping it in MetaModel."
        )


def check_max_task_loss(value):
    """`value` as a float > 0 (or None), else a ConfigError."""
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.number))
    if not ok or not value > 0:
        raise ConfigError(
            f"max_task_loss={value!r} must be a number > 0 (inner losses above it count as "
            "diverged) or None (only NaN/inf do): e.g. max_task_loss=1e10."
        )
    return float(value)


def _loss_names():
    try:
        from keras.src.losses import ALL_OBJECTS_DICT

        return sorted(ALL_OBJECTS_DICT)
    except ImportError:  # another Keras layout: the public names
        import keras

        return [n for n in dir(keras.losses) if not n.startswith("_")]


def resolve_loss(loss):
    """`keras.losses.get(loss)`, or a ConfigError naming the closest Keras loss.

    Example:
        >>> resolve_loss("sparse_categorical_crossentropyy")
        ConfigError: unknown loss 'sparse_categorical_crossentropyy': did you mean
        'sparse_categorical_crossentropy'? ...
    """
    import keras

    if isinstance(loss, type):
        # keras.losses.get would take the class as a loss function: each call
        # would build a loss object from (y_true, y_pred), silently wrong.
        raise ConfigError(
            f"loss={loss.__name__} is the class, not a loss: call it, e.g. "
            f"loss={loss.__name__}() (with from_logits=True for logits)."
        )
    try:
        return keras.losses.get(loss)
    except (ValueError, TypeError) as error:
        if not isinstance(loss, str):
            raise ConfigError(
                f"loss={loss!r} is not a Keras loss: pass a keras.losses.Loss, a function "
                "(y_true, y_pred) -> per-example losses, or a Keras loss name such as 'mse'."
            ) from error
        close = difflib.get_close_matches(loss, _loss_names(), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "see keras.losses for the names"
        raise ConfigError(
            f"unknown loss {loss!r}: {hint} (a Keras loss name, e.g. "
            "'sparse_categorical_crossentropy' or 'mse', or a keras.losses.Loss object)."
        ) from error


def _weights_dtype(model):
    """The widest float dtype of `model`'s trainable weights (e.g. "float32")."""
    dtypes = [np.dtype(v.dtype) for v in model.trainable_variables]
    return max(dtypes, key=lambda d: d.itemsize).name if dtypes else None


def check_loss_dtype(loss, model):
    """Refuse a loss that computes in a narrower float dtype than the model's weights.

    Keras casts predictions and labels to the loss's dtype (float32 unless
    given), so a float64 model with a float32 loss would train on rounded
    losses and gradients.
    """
    weights = _weights_dtype(model)
    computes = getattr(loss, "dtype", None)
    if weights is None or computes is None:
        return
    if np.dtype(computes).itemsize < np.dtype(weights).itemsize:
        name = type(loss).__name__
        raise ConfigError(
            f"the loss computes in {computes} but the model's weights are {weights}, so "
            f"every inner loss and gradient would be rounded to {computes}: create the loss "
            f"with dtype={weights!r} (e.g. keras.losses.{name}(dtype={weights!r})), or "
            f"call keras.config.set_floatx({weights!r}) before creating it."
        )


def _builtin_name(loss):
    """The Keras name of a built-in loss (object or wrapped function), else None."""
    fn = getattr(loss, "fn", loss)
    # A loss object's function (`.fn`), or the function a name resolves to
    # (keras.losses.get("mse")): either tells by its module; else the class.
    named = fn is not loss or isinstance(fn, types.FunctionType)
    module = getattr(fn, "__module__", "") if named else getattr(type(loss), "__module__", "")
    if not str(module).startswith("keras"):
        return None
    return getattr(fn, "__name__", None) or type(loss).__name__


def _output_spec(model, example_shape, batch):
    import keras

    inputs = getattr(model, "inputs", None)
    dtype = inputs[0].dtype if inputs else "float32"
    try:
        return model.compute_output_spec(keras.KerasTensor((batch, *example_shape), dtype=dtype))
    except Exception:  # noqa: BLE001 - a model Keras cannot trace symbolically: no check
        return None


def check_loss_on_outputs(model, loss, x_shape, y_shape, y_dtype):
    """Check, before any step, that `loss` can compare task labels with the model's outputs.

    Args:
        model: the wrapped model.
        loss: the task loss (a `keras.losses.Loss`).
        x_shape, y_shape: task-batch shapes `[T, S, B, ...]`.
        y_dtype: the labels' dtype.

    Raises a ConfigError naming the fix for a model whose output is not a
    vector per example under a sparse (class-index) loss, for integer class
    labels given to a loss that compares values elementwise (e.g. MSE), for
    labels shaped unlike the outputs, and for a loss that fails on them.
    """
    import keras
    import tensorflow as tf

    batch = x_shape[2] or 2
    spec = _output_spec(model, tuple(x_shape[3:]), batch)
    if not isinstance(spec, keras.KerasTensor):
        return
    outputs, labels = tuple(spec.shape[1:]), tuple(y_shape[3:])
    name = _builtin_name(loss)
    if name is not None:
        _check_builtin_shapes(name, outputs, labels, np.dtype(y_dtype).kind in "iu")
    try:  # traced only: nothing is computed
        tf.function(loss).get_concrete_function(
            tf.TensorSpec((batch, *labels), y_dtype), tf.TensorSpec(spec.shape, spec.dtype)
        )
    except Exception as error:  # noqa: BLE001 - any failure is the loss's on these shapes
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"the loss {name or getattr(loss, 'name', loss)!r} fails on labels of shape {labels} and "
            f"model outputs of shape {outputs} per example ({first}): make the labels and "
            "the model's head match what the loss expects."
        ) from error


# Keras' built-in losses by how they pair labels with outputs: one class index
# per output vector, or one label value per output value.
_CLASS_INDEX_LOSSES = ("sparse_categorical_crossentropy",)
_ELEMENTWISE_LOSSES = (
    "mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
    "mean_squared_logarithmic_error", "huber", "log_cosh", "binary_crossentropy",
    "binary_focal_crossentropy", "categorical_crossentropy", "categorical_focal_crossentropy",
    "kl_divergence", "poisson", "hinge", "squared_hinge", "categorical_hinge",
    "cosine_similarity",
)


def _check_builtin_shapes(name, outputs, labels, integer):
    if name in _CLASS_INDEX_LOSSES:
        if labels in (outputs[:-1], outputs[:-1] + (1,)):
            return
        if len(outputs) > 1 and len(labels) == 0:
            raise ConfigError(
                f"the model's output is not a vector per example: it is {outputs}, but "
                f"{name} needs one vector of class scores per label: end the model with "
                "Flatten() (or GlobalAveragePooling2D()) and Dense(num_classes)."
            )
        if labels == outputs:
            fix = ("these look one-hot: pass class ids (np.argmax(y, -1)) or use "
                   "keras.losses.CategoricalCrossentropy(from_logits=True)")
        else:
            fix = f"give each example labels of shape {outputs[:-1]}"
        raise ConfigError(
            f"{name} needs one class index per output vector, i.e. labels of shape "
            f"{outputs[:-1]} per example for outputs {outputs}; got labels {labels}: {fix}."
        )
    if name not in _ELEMENTWISE_LOSSES:
        return
    if labels in (outputs, outputs + (1,)) or labels + (1,) == outputs:
        return
    if integer:
        raise ConfigError(
            f"the labels are integer class indices (shape {labels} per example), but "
            f"{name} compares them elementwise with the model's outputs {outputs}: for "
            "class labels use keras.losses.SparseCategoricalCrossentropy(from_logits=True), "
            f"or give one-hot float labels of shape {outputs}."
        )
    raise ConfigError(
        f"labels of shape {labels} per example cannot be compared by {name} with model "
        f"outputs of shape {outputs}: give the model a head with output shape {labels}, or "
        f"labels of shape {outputs}."
    )


def check_task_batches(model, loss, x, y=None):
    """Check task batches (a `tf.data.Dataset` of `(x, y)`, or arrays) against model and loss.

    The shapes must fit the model (`check_task_batch`), a cross-entropy must
    read the model's class scores as what they are (`check_score_kind`), the
    loss must compare the labels with the model's outputs (`check_loss_on_outputs`),
    and array labels must be the model's classes (`check_labels`). Streams
    whose element shapes are unknown are left to the first step.
    """
    import tensorflow as tf

    from_logits = None if loss is None else loss_from_logits(loss)
    if from_logits is not None:
        fix = "compile with loss=keras.losses.SparseCategoricalCrossentropy(from_logits={})"
        check_score_kind(model, from_logits, fix.format(False), fix.format(True))
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        if not isinstance(spec, (tuple, list)) or len(spec) < 2:
            return
        if not all(isinstance(s, tf.TensorSpec) for s in spec[:2]):
            return
        x_shape, y_shape, y_dtype = spec[0].shape, spec[1].shape, spec[1].dtype
        warn_if_unscaled(model, spec[0].dtype)
    elif y is not None and hasattr(x, "shape") and hasattr(y, "shape"):
        x_shape, y_shape, y_dtype = tf.TensorShape(x.shape), tf.TensorShape(y.shape), y.dtype
        warn_if_unscaled(model, x.dtype)
    else:
        return
    if x_shape.rank is None or y_shape.rank is None:
        return
    check_task_batch(model, tuple(x_shape), tuple(y_shape))
    if loss is not None and len(x_shape) >= 4 and len(y_shape) >= 3:
        check_loss_on_outputs(model, loss, tuple(x_shape), tuple(y_shape), tf.as_dtype(y_dtype).name)
    if loss is not None and not isinstance(x, tf.data.Dataset):
        # Arrays are at hand: every label is checked now. A stream's labels are
        # checked by the step (MetaModel.fit names the fix if one is out of range).
        check_labels(model, y, loss)
