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

Per-example gradients are vectorized with ``tf.vectorized_map`` inside a
``tf.function`` (one traced call per batch, no Python loop over examples).
``pfor`` computes the per-example filter gradient of ``Conv2D`` (and of
``Conv1D``, which Keras lowers to ``Conv2D``) with a sequential while-loop,
so the gradient of ``Conv2D`` is replaced, inside this computation only, by a
vectorizable one (input patches gathered with an identity convolution, then
a per-example contraction); it is exact (tested against the standard
gradient) and makes the estimator cost about one training epoch.

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

import gin
import numpy as np
import tensorflow as tf

from tfmeta.complexity import _data

__all__ = ["FisherEstimate", "diagonal_fisher"]

_CONV_GRADIENT = "TfmetaPerExampleConv2D"


def _conv2d_attrs(op):
    return dict(
        strides=op.get_attr("strides"),
        padding=op.get_attr("padding"),
        explicit_paddings=op.get_attr("explicit_paddings"),
        data_format=op.get_attr("data_format"),
        dilations=op.get_attr("dilations"),
    )


def _per_example_conv2d_grad(op, grad):
    """Gradient of Conv2D whose filter part ``pfor`` vectorizes.

    The filter gradient ``dW[i, j, c, o] = sum_{h,w} patch[h, w, (i, j, c)]
    grad[h, w, o]`` is computed from the input patches, extracted by a
    convolution with an identity filter (same strides, padding and dilations
    as the forward op), followed by an ``einsum``. Both vectorize over the
    ``vectorized_map`` dimension (a forward Conv2D with a loop-invariant
    filter folds the loop into the batch). Unsupported layouts fall back to
    the standard gradient.
    """
    attrs = _conv2d_attrs(op)
    inputs, filters = op.inputs
    d_inputs = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(inputs), filter=filters, out_backprop=grad, **attrs
    )
    kh, kw, ci, co = filters.shape.as_list()
    static_ok = (
        attrs["data_format"] == b"NHWC"
        and None not in (kh, kw, ci, co)
        and inputs.shape.rank == 4
        and inputs.shape[-1] == ci  # no grouped convolution
    )
    if not static_ok:
        d_filters = tf.raw_ops.Conv2DBackpropFilter(
            input=inputs, filter_sizes=tf.shape(filters), out_backprop=grad, **attrs
        )
        return d_inputs, d_filters
    k = kh * kw * ci
    eye = tf.reshape(tf.eye(k, dtype=inputs.dtype), [kh, kw, ci, k])
    patches = tf.raw_ops.Conv2D(input=inputs, filter=eye, **attrs)
    d_filters = tf.einsum("nhwk,nhwo->ko", patches, grad)
    return d_inputs, tf.reshape(d_filters, [kh, kw, ci, co])


try:
    tf.RegisterGradient(_CONV_GRADIENT)(_per_example_conv2d_grad)
except KeyError:  # module re-imported: already registered
    pass


@dataclasses.dataclass
class FisherEstimate:
    """A diagonal Fisher estimate.

    Attributes:
      diagonal: one float32 tensor per entry of ``model.trainable_variables``
        (same order and shapes), the estimate of ``diag(F)`` averaged over
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


def _build_batch_fn(model, from_logits, mode, label_samples, per_parameter):
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
            rows_w = tf.ones([batch], tf.float32)
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
                rows_w = tf.fill([batch * label_samples], 1.0 / label_samples)

        def per_row(args):
            x1, y1 = args
            graph = tf.compat.v1.get_default_graph()
            with graph.gradient_override_map({"Conv2D": _CONV_GRADIENT}):
                o, _ = model.stateless_call(tvals, ntvals, x1[None], training=False)
            logp1 = _data.log_probs(o, from_logits)[0]
            onehot = tf.one_hot(y1, tf.shape(logp1)[-1], dtype=logp1.dtype)
            nll = -tf.reduce_sum(logp1 * onehot)
            grads = tf.gradients(nll, tvals)
            return [
                tf.zeros_like(t) if g is None else tf.square(tf.cast(g, tf.float32))
                for g, t in zip(grads, tvals)
            ]

        squares = tf.vectorized_map(per_row, (rows_x, rows_y))
        sums, sums_sq = [], []
        traces = tf.zeros([batch], tf.float32)
        for s in squares:
            shape = tf.shape(s)[1:]
            w = tf.reshape(rows_w, tf.concat([[-1], tf.ones_like(shape)], 0))
            f_i = tf.reduce_sum(
                tf.reshape(w * s, tf.concat([[batch, per_example], shape], 0)), axis=1
            )
            sums.append(tf.reduce_sum(f_i, axis=0))
            if per_parameter:
                sums_sq.append(tf.reduce_sum(tf.square(f_i), axis=0))
            traces += tf.reduce_sum(tf.reshape(f_i, [batch, -1]), axis=1)
        return sums, sums_sq, traces

    return batch_fn


def _batch_fn(model, from_logits, mode, label_samples, per_parameter):
    cache = _data.model_cache(model, "fisher")
    key = (_data.variables_key(model), bool(from_logits), mode,
           int(label_samples), bool(per_parameter))
    fn = cache.get(key)
    if fn is None:
        fn = _build_batch_fn(model, from_logits, mode, label_samples, per_parameter)
        cache[key] = fn
    return fn


@gin.configurable(module="tfmeta.complexity")
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
      batch_size: examples per vectorized call; None keeps the dataset's
        batches (arrays: 32). Memory is about ``batch_size * rows *
        num_params`` floats, with rows = ``label_samples`` (or the number of
        classes in exact mode).
      seed: seed of the (stateless, per-batch) label sampling; the estimate
        is a deterministic function of ``(model, data, seed)``.
      per_parameter_stderr: also accumulate per-parameter standard errors
        (one more reduction per batch).

    Returns:
      A :class:`FisherEstimate`; ``diagonal`` is aligned with
      ``model.trainable_variables``.
    """
    if labels not in ("model", "empirical"):
        raise ValueError(f"labels must be 'model' or 'empirical', got {labels!r}")
    if exact and labels != "model":
        raise ValueError("exact=True applies to labels='model' only")
    if label_samples < 1:
        raise ValueError("label_samples must be >= 1")
    if not model.built:
        raise ValueError("the model must be built")
    mode = "empirical" if labels == "empirical" else ("exact" if exact else "sample")
    fn = _batch_fn(model, from_logits, mode, label_samples, per_parameter_stderr)
    tvars = list(model.trainable_variables)
    sums = [np.zeros(v.shape, np.float64) for v in tvars]
    sums_sq = [np.zeros(v.shape, np.float64) for v in tvars] if per_parameter_stderr else None
    traces = []
    count = 0
    for index, (x, y) in enumerate(_data.iterate_batches(data, batch_size, num_samples)):
        if mode == "empirical":
            if y is None:
                raise ValueError("labels='empirical' needs (x, y) data")
            y = _data.sparse_labels(y)
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
        traces.append(tr.numpy().astype(np.float64))
        count += int(x.shape[0])
    if count == 0:
        raise ValueError("no examples: empty data or num_samples=0")
    traces = np.concatenate(traces)
    mean = [s / count for s in sums]
    stderr = None
    if per_parameter_stderr:
        stderr = []
        for s, s2 in zip(mean, sums_sq):
            var = np.maximum(s2 / count - s * s, 0.0) * (count / max(count - 1, 1))
            stderr.append(tf.constant(np.sqrt(var / count), tf.float32))
    trace_se = float(np.std(traces, ddof=1) / np.sqrt(count)) if count > 1 else float("nan")
    return FisherEstimate(
        diagonal=[tf.constant(m, tf.float32) for m in mean],
        stderr=stderr,
        trace=float(np.sum([m.sum() for m in mean])),
        trace_stderr=trace_se,
        num_examples=count,
        labels=labels,
        exact=bool(exact),
        label_samples=int(label_samples),
        variable_names=[getattr(v, "path", v.name) for v in tvars],
    )
