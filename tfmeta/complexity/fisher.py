"""Diagonal Fisher information of a Keras classifier.

The Fisher information matrix of a model ``p_w(y|x)`` on data with input
distribution ``p(x)`` is (Achille, Mbeng & Soatto, section 2)::

    F = E_{x ~ p(x)} E_{y ~ p_w(y|x)} [ grad_w log p_w(y|x) grad_w log p_w(y|x)^T ]

Labels are drawn from the MODEL's predictive distribution, not taken from the
data: the data enter only through the inputs ``x``. ``diagonal_fisher``
estimates ``diag(F)`` over the examples of a dataset:

* ``labels="model"`` (default): one (or ``label_samples``) label(s) sampled
  from ``softmax(logits)`` per example, squared per-example gradients
  averaged (Task2Vec's "montecarlo" estimator);
* ``labels="model", exact=True``: the expectation over ``y`` is computed
  exactly, ``sum_c p_w(c|x) (d log p_w(c|x) / dw)^2`` (one gradient per
  class per example, so ``num_classes`` times the cost);
* ``labels="empirical"``: the *empirical* Fisher, with the data's labels
  ``y_i`` in place of model samples. It is a different quantity (it is large
  where the model is confidently wrong) and is offered only as a named
  option.

Per-example gradients come from :mod:`tfmeta.complexity.per_example`: a
``tf.vectorized_map`` inside one ``tf.function`` per batch (about one
training epoch of cost), or, for what that cannot do on every CPU (grouped
convolutions, nested functions), a ``tf.map_fn`` over the rows; the path is
chosen from the model's graph before running and reported as
``FisherEstimate.path``.

Dtypes: the estimate has the dtype of each trainable variable (float64
models get a float64 Fisher); the log-softmax is taken in the outputs' dtype,
or float32 for half-precision outputs. Under a ``mixed_float16`` policy
(float32 variables, float16 computation) the Fisher is float32, with the
rounding of a float16 forward and backward pass (about 1e-3 relative).

The model is run in inference mode (``training=False``: dropout off,
BatchNorm using its moving statistics) through ``model.stateless_call``, so
nothing in the model is modified. The model must be a built, single-input
Keras 3 classifier whose output is ``[batch, num_classes]`` LOGITS
(``from_logits=True``, the default) or probabilities (``from_logits=False``,
log taken after clipping at 1e-12).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
import tensorflow as tf

from tfmeta.complexity import _data
from tfmeta.complexity.per_example import PATHS, squared_gradients, vectorization_blocker
from tfmeta.validation import warn_if_unscaled

__all__ = ["FisherEstimate", "diagonal_fisher"]


@dataclasses.dataclass
class FisherEstimate:
    """A diagonal Fisher estimate.

    Attributes:
      diagonal: one tensor per entry of ``model.trainable_variables`` (same
        order, shapes and dtypes), the estimate of ``diag(F)`` averaged over
        examples.
      stderr: Monte-Carlo standard error of each entry of ``diagonal``
        (same structure), or None if not requested: the standard error of
        the mean over examples, ``std_i(f_i) / sqrt(n)`` where ``f_i`` is
        example ``i``'s contribution. It covers both the sampling of labels
        and of inputs (``F`` as an estimate of ``E_{x~p(x)}``), so it is
        conservative as an error against the exact Fisher on the same inputs.
      trace: ``sum(diag(F))``.
      trace_stderr: standard error of ``trace`` (same definition).
      num_examples: number of input examples used.
      labels: ``"model"`` or ``"empirical"``.
      exact: whether the expectation over model labels was computed exactly.
      label_samples: labels drawn per example (sampled mode).
      variable_names: paths of the trainable variables, aligned with
        ``diagonal``.
      path: how the per-example gradients were computed, ``"vectorized"``
        or ``"per_example"`` (:mod:`tfmeta.complexity.per_example`).
    """

    diagonal: List[tf.Tensor]
    stderr: Optional[List[tf.Tensor]]
    trace: float
    trace_stderr: float
    num_examples: int
    labels: str
    exact: bool
    label_samples: int
    variable_names: List[str]
    path: str

    def flat(self) -> np.ndarray:
        """The diagonal as one float64 NumPy vector (variable order)."""
        return np.concatenate(
            [np.asarray(d, np.float64).reshape(-1) for d in self.diagonal]
        )

    def flat_stderr(self) -> Optional[np.ndarray]:
        if self.stderr is None:
            return None
        return np.concatenate(
            [np.asarray(d, np.float64).reshape(-1) for d in self.stderr]
        )

    @property
    def num_params(self) -> int:
        return int(sum(int(np.prod(d.shape)) for d in self.diagonal))

    def scaled(self, factor: float) -> "FisherEstimate":
        """The estimate multiplied by ``factor`` (e.g. ``N`` for the Fisher of
        a summed, rather than averaged, loss)."""
        f = float(factor)
        return dataclasses.replace(
            self,
            diagonal=[d * f for d in self.diagonal],
            stderr=None if self.stderr is None else [s * f for s in self.stderr],
            trace=self.trace * f,
            trace_stderr=self.trace_stderr * f,
        )


def _build_batch_fn(model, from_logits, mode, label_samples, per_parameter, path):
    """Trace-once function: one batch -> (sum_i f_i, sum_i f_i^2, trace_i)."""
    tvars = list(model.trainable_variables)
    ntvars = list(model.non_trainable_variables)

    @tf.function(reduce_retracing=True)
    def batch_fn(x, y, seed):
        tvals = [tf.identity(v.value) for v in tvars]
        ntvals = [tf.identity(v.value) for v in ntvars]
        batch = tf.shape(x)[0]
        if mode == "empirical":
            rows_x, rows_y = x, y
            rows_w = tf.ones([batch], tf.float64)
            per_example = 1
        else:
            out, _ = model.stateless_call(tvals, ntvals, x, training=False)
            logp = tf.stop_gradient(_data.log_probs(out, from_logits))
            num_classes = tf.shape(logp)[-1]
            if mode == "exact":
                per_example = logp.shape[-1]
                if per_example is None:
                    raise ValueError("exact mode needs a static number of classes")
                rows_x = tf.repeat(x, per_example, axis=0)
                rows_y = tf.tile(tf.range(num_classes, dtype=tf.int32), [batch])
                rows_w = tf.reshape(tf.exp(logp), [-1])
            else:
                per_example = label_samples
                sampled = tf.random.stateless_categorical(
                    logp, label_samples, seed=seed, dtype=tf.int32
                )
                rows_x = tf.repeat(x, label_samples, axis=0)
                rows_y = tf.reshape(sampled, [-1])
                rows_w = tf.fill([batch * label_samples],
                                 tf.constant(1.0 / label_samples, tf.float64))

        squares = squared_gradients(model, tvals, ntvals, rows_x, rows_y, from_logits, path)
        sums, sums_sq = [], []
        traces = tf.zeros([batch], tf.float64)
        for s in squares:
            shape = tf.shape(s)[1:]
            w = tf.reshape(tf.cast(rows_w, s.dtype), tf.concat([[-1], tf.ones_like(shape)], 0))
            f_i = tf.reduce_sum(
                tf.reshape(w * s, tf.concat([[batch, per_example], shape], 0)), axis=1
            )
            sums.append(tf.reduce_sum(f_i, axis=0))
            if per_parameter:
                sums_sq.append(tf.reduce_sum(tf.square(f_i), axis=0))
            traces += tf.cast(tf.reduce_sum(tf.reshape(f_i, [batch, -1]), axis=1), tf.float64)
        return sums, sums_sq, traces

    return batch_fn


def _choose_path(model, x, path):
    """The gradient path for ``model`` on inputs like ``x`` (cached per model)."""
    spec = tf.TensorSpec([1, *x.shape[1:]], tf.as_dtype(x.dtype))
    cache = _data.model_cache(model, "fisher_path")
    key = (_data.variables_key(model), tuple(spec.shape), spec.dtype)
    if key not in cache:
        cache[key] = vectorization_blocker(model, spec)
    blocker = cache[key]
    if path == "auto":
        return "per_example" if blocker else "vectorized"
    if path == "vectorized" and blocker:
        raise ValueError(
            f"path='vectorized' does not apply to this model: {blocker}. "
            "Use path='auto' (it takes the per-example path here)"
        )
    return path


def _batch_fn(model, from_logits, mode, label_samples, per_parameter, path):
    cache = _data.model_cache(model, "fisher")
    key = (_data.variables_key(model), bool(from_logits), mode,
           int(label_samples), bool(per_parameter), path)
    fn = cache.get(key)
    if fn is None:
        fn = _build_batch_fn(model, from_logits, mode, label_samples, per_parameter, path)
        cache[key] = fn
    return fn


def diagonal_fisher(
    model,
    data,
    num_samples: Optional[int] = None,
    labels: str = "model",
    exact: bool = False,
    label_samples: int = 1,
    from_logits: bool = True,
    batch_size: Optional[int] = None,
    seed: int = 0,
    per_parameter_stderr: bool = True,
    path: str = "auto",
) -> FisherEstimate:
    """Estimate the diagonal of the Fisher information of ``model`` on ``data``.

    Args:
      model: a built Keras 3 classifier (single input) whose output is
        ``[batch, num_classes]`` logits (or probabilities with
        ``from_logits=False``). Evaluated with ``training=False``.
      data: batched ``tf.data.Dataset`` of ``(x, y)`` (or of ``x`` alone when
        ``labels="model"``), or arrays ``(x, y)`` / ``x``.
      num_samples: number of input examples to use (the first ones); None
        uses all of ``data``.
      labels: ``"model"`` (the Fisher: ``y ~ p_w(y|x)``) or ``"empirical"``
        (the empirical Fisher, with the data's labels).
      exact: with ``labels="model"``, compute the expectation over ``y``
        exactly (sum over classes weighted by ``p_w(y|x)``) instead of
        sampling.
      label_samples: labels sampled per example (sampled mode).
      from_logits: whether the model outputs logits (default) or
        probabilities.
      batch_size: examples per traced call; None keeps the dataset's
        batches (arrays: 32). Memory is about ``batch_size * rows *
        num_params`` floats, with rows = ``label_samples`` (or the number of
        classes in exact mode).
      seed: seed of the (stateless, per-batch) label sampling; the estimate
        is a deterministic function of ``(model, data, seed)``.
      per_parameter_stderr: also accumulate per-parameter standard errors
        (one more reduction per batch).
      path: ``"auto"`` (default: the rule of
        :mod:`tfmeta.complexity.per_example`), ``"per_example"`` (force the
        row-by-row path) or ``"vectorized"`` (refused with the reason when
        the rule says it does not apply).

    Returns:
      A :class:`FisherEstimate`; ``diagonal`` is aligned with
      ``model.trainable_variables``.

    Example::

        fisher = diagonal_fisher(model, (x, y), num_samples=1024)
        fisher.trace, fisher.trace_stderr, fisher.path
    """
    if labels not in ("model", "empirical"):
        raise ValueError(f"labels must be 'model' or 'empirical', got {labels!r}")
    if exact and labels != "model":
        raise ValueError("exact=True applies to labels='model' only")
    if label_samples < 1:
        raise ValueError("label_samples must be >= 1")
    if path not in ("auto", *PATHS):
        raise ValueError(f"path must be 'auto', 'vectorized' or 'per_example', got {path!r}")
    if not model.built:
        raise ValueError("the model must be built")
    _data.check_class_scores(model, from_logits)
    warn_if_unscaled(model, _data.input_dtype(data), "data")
    mode = "empirical" if labels == "empirical" else ("exact" if exact else "sample")
    tvars = list(model.trainable_variables)
    sums = [np.zeros(v.shape, np.float64) for v in tvars]
    sums_sq = [np.zeros(v.shape, np.float64) for v in tvars] if per_parameter_stderr else None
    traces = []
    count = 0
    for index, (x, y) in enumerate(_data.iterate_batches(data, batch_size, num_samples)):
        if index == 0:
            path = _choose_path(model, x, path)
            fn = _batch_fn(model, from_logits, mode, label_samples, per_parameter_stderr, path)
        if mode == "empirical":
            if y is None:
                raise ValueError("labels='empirical' needs (x, y) data")
            if index == 0:
                units = _data.classes(model, x)
            y = _data.batch_labels(x, y, units)
        else:
            y = tf.zeros([int(x.shape[0])], tf.int32)
        s, s2, tr = fn(
            tf.convert_to_tensor(x), y, tf.constant([seed, index], tf.int64)
        )
        for acc, part in zip(sums, s):
            acc += part.numpy()
        if per_parameter_stderr:
            for acc, part in zip(sums_sq, s2):
                acc += part.numpy()
        traces.append(tr.numpy())
        count += int(x.shape[0])
    if count == 0:
        raise ValueError("no examples: empty data or num_samples=0")
    traces = np.concatenate(traces)
    mean = [s / count for s in sums]
    stderr = None
    if per_parameter_stderr:
        stderr = []
        for s, s2, v in zip(mean, sums_sq, tvars):
            var = np.maximum(s2 / count - s * s, 0.0) * (count / max(count - 1, 1))
            stderr.append(tf.constant(np.sqrt(var / count), v.dtype))
    trace_se = float(np.std(traces, ddof=1) / np.sqrt(count)) if count > 1 else float("nan")
    return FisherEstimate(
        diagonal=[tf.constant(m, v.dtype) for m, v in zip(mean, tvars)],
        stderr=stderr,
        trace=float(np.sum([m.sum() for m in mean])),
        trace_stderr=trace_se,
        num_examples=count,
        labels=labels,
        exact=bool(exact),
        label_samples=int(label_samples),
        variable_names=[getattr(v, "path", v.name) for v in tvars],
        path=path,
    )
