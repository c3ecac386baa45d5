"""Data plumbing shared by the complexity modules (private).

Two input conventions are accepted everywhere in ``tfmeta.complexity``:

* a batched ``tf.data.Dataset`` yielding ``(x, y)`` pairs (the TFDS
  ``as_supervised=True`` convention followed by ``.batch(n)``), or yielding
  ``x`` alone where labels are not needed;
* in-memory arrays: a tuple ``(x, y)`` of NumPy arrays / tensors, or a bare
  array ``x``.

Labels are sparse integer class ids; one-hot labels (rank 2) are converted
with ``argmax``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfmeta.input_options import without_autotuning
from tfmeta.validation import (check_class_ids, check_examples, check_positive_int, check_score_kind,
                               output_units, warn_if_unscaled)


def _split(element):
    if isinstance(element, dict):
        raise TypeError(
            "dict-structured datasets are not supported; map them to (x, y) "
            "pairs first (TFDS: as_supervised=True)"
        )
    if isinstance(element, (tuple, list)):
        if len(element) == 1:
            return element[0], None
        if len(element) == 2:
            return element[0], element[1]
        if len(element) == 3:  # (x, y, sample_weight): weights ignored
            return element[0], element[1]
        raise ValueError(f"expected (x, y) elements, got {len(element)} parts")
    return element, None


def sparse_labels(y):
    """Integer class ids from sparse or one-hot labels (None stays None)."""
    if y is None:
        return None
    y = tf.convert_to_tensor(y)
    if y.shape.rank is not None and y.shape.rank >= 2 and y.shape[-1] != 1:
        y = tf.argmax(y, axis=-1)
    elif y.shape.rank == 2:
        y = tf.squeeze(y, axis=-1)
    if y.dtype.is_floating and tf.executing_eagerly():
        # The cast below would silently truncate a float that is no class id.
        values = y.numpy()
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise ValueError(
                f"labels must be integer class ids (or one-hot rows); got floats such as "
                f"{fractional[0]:g}: pass the class index of each example")
    return tf.cast(y, tf.int32)


def input_dtype(data):
    """The dtype of the inputs of ``data`` (a dataset of ``(x, y)`` or ``x``, or arrays)."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        spec = spec[0] if isinstance(spec, (tuple, list)) else spec
        return spec.dtype
    x = data[0] if isinstance(data, (tuple, list)) else data
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def check_finite_dataset(data, name="data"):
    """Refuse an endless dataset where all of it would be read (a hang that fills memory)."""
    if isinstance(data, tf.data.Dataset) and (
            int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY)):
        raise ValueError(
            f"{name} is an endless dataset (it repeats), and all of it would be read: pass "
            f"{name}.take(n) or arrays (x, y)")


def iterate_batches(data, batch_size=None, num_samples=None):
    """Yield ``(x, y)`` batches (``y`` may be None), at most ``num_samples``
    examples in total.

    ``batch_size=None`` keeps a dataset's own batches (arrays default to 32).
    """
    remaining = None if num_samples is None else int(num_samples)
    if remaining is not None and remaining <= 0:
        return
    if remaining is None:
        check_finite_dataset(data)
    if isinstance(data, tf.data.Dataset):
        if batch_size is not None:
            data = data.unbatch().batch(int(batch_size))
        for element in without_autotuning(data):
            x, y = _split(element)
            n = int(tf.shape(x)[0])
            if remaining is not None and n > remaining:
                x = x[:remaining]
                y = None if y is None else y[:remaining]
                n = remaining
            yield x, y
            if remaining is not None:
                remaining -= n
                if remaining <= 0:
                    return
        return
    x, y = _split(data)
    x = np.asarray(x) if not tf.is_tensor(x) else x
    if y is not None and not tf.is_tensor(y):
        y = np.asarray(y)
    n = int(x.shape[0])
    if remaining is not None:
        n = min(n, remaining)
    bs = int(batch_size or 32)
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        yield x[start:stop], (None if y is None else y[start:stop])


def to_numpy(data, max_examples=None):
    """Materialize ``data`` as NumPy arrays ``(x, y)``: at most ``max_examples`` (None: all)."""
    if max_examples is not None:
        check_positive_int("max_examples", max_examples,
                           fix="pass a cap of at least 1 example, or None for every example")
    if not isinstance(data, tf.data.Dataset):
        x, y = _split(data)
        if y is None:
            raise ValueError("labels are required here: pass (x, y)")
        x = np.asarray(x)
        y = np.asarray(sparse_labels(y))
        if max_examples is not None:
            x, y = x[:max_examples], y[:max_examples]
        if x.ndim and not x.shape[0]:
            raise ValueError("empty data: (x, y) holds no examples")
        return x, y
    xs, ys = [], []
    for x, y in iterate_batches(data, num_samples=max_examples):
        if y is None:
            raise ValueError("labels are required here: the dataset must yield (x, y)")
        xs.append(np.asarray(x))
        ys.append(np.asarray(sparse_labels(y)))
    if not xs:
        raise ValueError("empty dataset")
    return np.concatenate(xs), np.concatenate(ys)


def check_supervised(model, x, y, name="data"):
    """Refuse arrays ``(x, y)`` that ``model`` cannot be trained or
    evaluated on, in one line that names the fix (``check_examples``), and
    labels outside its classes.

    Example::

        check_supervised(model, x, y, "target_data")
        # ValueError: target_data labels range over 0..11 but the model has 10 outputs ...
    """
    check_examples(model, x, y, name)
    warn_if_unscaled(model, x.dtype, name)
    check_class_ids(name, y, classes(model, x))


def classes(model, x):
    """How many classes ``model`` outputs (its last output dimension; found
    by calling it once on one example of ``x`` where it declares none)."""
    units = output_units(model)
    if units is not None:
        return int(units)
    cache = model_cache(model, "classes")
    key = variables_key(model)
    if key not in cache:
        cache[key] = int(model(x[:1], training=False).shape[-1])
    return cache[key]


def batch_labels(x, y, units, name="data"):
    """Sparse labels of one batch, checked against its inputs and the
    model's ``units`` classes (see :func:`check_supervised`)."""
    y = sparse_labels(y)
    if int(y.shape[0]) != int(x.shape[0]):
        raise ValueError(f"{name} has a batch of {int(x.shape[0])} inputs but "
                         f"{int(y.shape[0])} labels: pass one label per example")
    if int(y.shape[0]):
        check_class_ids(name, y.numpy(), units)
    return y


def num_examples(data):
    """Number of examples in ``data`` (iterates a dataset once if needed)."""
    if isinstance(data, tf.data.Dataset):
        return sum(int(tf.shape(x)[0]) for x, _ in iterate_batches(data))
    x, _ = _split(data)
    return int(x.shape[0])


def check_class_scores(model, from_logits):
    """Refuse a model whose outputs are not ``[batch, classes >= 2]`` scores of the kind
    ``from_logits`` says (logits, or probabilities when False), where its layers tell.

    A softmax output read as logits gives a Fisher about 80x too small (digits
    MLP: trace 0.17 against 14.0), and logits read as probabilities are
    clipped to garbage (631), both silently; so the last layer's activation is checked (Sequential and
    functional models; a subclassed model's outputs are taken on trust).

    Example::

        check_class_scores(softmax_model, from_logits=True)
        # ValueError: the model outputs probabilities (its last layer applies softmax) ...
    """
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) == 1:
        shape = tuple(outputs[0].shape)
        if len(shape) != 2 or (shape[-1] is not None and shape[-1] < 2):
            raise ValueError(
                f"the model outputs shape {shape}, not [batch, classes] class scores with at "
                "least 2 classes: end it in a Dense(num_classes) of logits (for a binary "
                "task, Dense(2) instead of one sigmoid unit)")
    check_score_kind(model, from_logits)


def log_probs(outputs, from_logits):
    """Log-probabilities of the model's categorical outputs, in their dtype
    (float32 for half-precision outputs, as Keras' losses do)."""
    if outputs.dtype not in (tf.float32, tf.float64):
        outputs = tf.cast(outputs, tf.float32)
    if from_logits:
        return tf.nn.log_softmax(outputs, axis=-1)
    return tf.math.log(tf.clip_by_value(outputs, 1e-12, 1.0))


def model_cache(model, name):
    """A per-model dict for traced functions, kept outside Keras tracking."""
    try:
        cache = object.__getattribute__(model, "_tfmeta_complexity_cache")
    except AttributeError:
        cache = {}
        object.__setattr__(model, "_tfmeta_complexity_cache", cache)
    return cache.setdefault(name, {})


def variables_key(model):
    return tuple(id(v) for v in model.trainable_variables) + (
        None,
    ) + tuple(id(v) for v in model.non_trainable_variables)


def _loss_fn(model, from_logits):
    cache = model_cache(model, "loss")
    key = (variables_key(model), bool(from_logits))
    fn = cache.get(key)
    if fn is None:

        @tf.function(reduce_retracing=True)
        def fn(x, y):
            out = model(x, training=False)
            logp = log_probs(out, from_logits)
            nll = -tf.gather(logp, y, axis=-1, batch_dims=1)
            return tf.reduce_sum(tf.cast(nll, tf.float64))

        cache[key] = fn
    return fn


def mean_cross_entropy(model, data, from_logits=True, batch_size=None,
                       num_samples=None):
    """Mean cross-entropy ``E_(x,y)~D[-log p_w(y|x)]`` in inference mode.

    Returns ``(mean_loss, number_of_examples)``.
    """
    check_class_scores(model, from_logits)
    warn_if_unscaled(model, input_dtype(data), "data")
    fn = _loss_fn(model, from_logits)
    total, count = 0.0, 0
    default_bs = None if isinstance(data, tf.data.Dataset) else 512
    units = None
    for x, y in iterate_batches(data, batch_size or default_bs, num_samples):
        if y is None:
            raise ValueError("the training loss needs labels: pass (x, y)")
        units = classes(model, x) if units is None else units
        total += float(fn(tf.convert_to_tensor(x), batch_labels(x, y, units)))
        count += int(x.shape[0])
    if count == 0:
        raise ValueError("empty dataset")
    return total / count, count
