"""Squared per-example gradients of a Keras classifier, and which path computes them.

``diagonal_fisher`` needs ``(d log p_w(y_r|x_r) / dw)^2`` for every row ``r``
of a batch. Two paths compute them, equal up to float rounding; the choice
is made BEFORE anything runs, from the model's inference graph on one
example (:func:`gradient_path`), never by catching a failure:

* ``"vectorized"``: ``tf.vectorized_map`` over the rows (one traced call per
  batch, about the cost of a training epoch). Taken when every op of the
  inference graph sits at top level (no nested function) and every
  ``Conv2D`` op is one the patch gradient below handles (NHWC, static
  filter shape, not grouped). That covers ``Dense``, ``Conv1D``/``Conv2D``
  with ``groups=1`` (strided, dilated, any padding), ``DepthwiseConv2D``,
  ``SeparableConv1D``/``SeparableConv2D``, pooling, BatchNorm, LayerNorm and
  Dropout; also ``Conv3D`` and transposed convolutions, whose filter
  gradients ``pfor`` runs in its while-loop fallback on the stock kernels.
* ``"per_example"``: ``tf.map_fn`` over the rows, each a plain
  ``tf.gradients`` with TensorFlow's own gradients (what training uses);
  exact everywhere, slower (rows run one after another). Taken for
  everything else, in particular every model with a **grouped convolution**
  (``groups > 1``): Keras runs those in a nested, XLA-compiled function
  because TensorFlow's CPU kernels cannot; ``pfor`` would run that
  function's gradient uncompiled on the stock ``Conv2DBackpropFilter``,
  which fails on CPUs where TensorFlow does not enable oneDNN (``filter_size
  does not have enough elements``). Recurrent layers (nested while loops)
  also take this path.

Why the patch gradient: ``pfor`` computes the per-example filter gradient of
``Conv2D`` (``Conv1D`` is lowered to it) with a sequential while-loop, which
made the estimator ~2.4x slower than an epoch. In the vectorized path only,
the gradient of ``Conv2D`` is replaced (``gradient_override_map``) by an
exact vectorizable one: the input patches are extracted by a convolution
with an identity filter (same strides, padding and dilations), then
contracted with the output gradient by an ``einsum``.

Example::

    path = gradient_path(model, tf.TensorSpec([1, 28, 28, 1], tf.float32))
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tfmeta.complexity import _data

__all__ = ["PATHS", "gradient_path", "squared_gradients", "vectorization_blocker"]

#: The two ways of computing per-example gradients (see the module docstring).
PATHS = ("vectorized", "per_example")

_CONV_GRADIENT = "TfmetaPerExampleConv2D"


def _conv2d_attrs(op):
    return dict(
        strides=op.get_attr("strides"),
        padding=op.get_attr("padding"),
        explicit_paddings=op.get_attr("explicit_paddings"),
        data_format=op.get_attr("data_format"),
        dilations=op.get_attr("dilations"),
    )


def _patch_gradient_applies(op) -> bool:
    """Whether :func:`_patch_conv2d_grad` handles this ``Conv2D`` op."""
    inputs, filters = op.inputs
    return (
        op.get_attr("data_format") == b"NHWC"
        and filters.shape.is_fully_defined()
        and inputs.shape.rank == 4
        and inputs.shape[-1] == filters.shape[2]  # not grouped
    )


def _patch_conv2d_grad(op, grad):
    """Gradient of an NHWC, ungrouped Conv2D whose filter part ``pfor`` vectorizes.

    ``dW[i, j, c, o] = sum_{h,w} patch[h, w, (i, j, c)] grad[h, w, o]``, the
    patches extracted by a convolution with an identity filter; both steps
    vectorize over the ``vectorized_map`` dimension (a forward Conv2D with a
    loop-invariant filter folds the loop into the batch).
    """
    attrs = _conv2d_attrs(op)
    inputs, filters = op.inputs
    d_inputs = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(inputs), filter=filters, out_backprop=grad, **attrs
    )
    kh, kw, ci, co = filters.shape.as_list()
    k = kh * kw * ci
    eye = tf.reshape(tf.eye(k, dtype=inputs.dtype), [kh, kw, ci, k])
    patches = tf.raw_ops.Conv2D(input=inputs, filter=eye, **attrs)
    d_filters = tf.einsum("nhwk,nhwo->ko", patches, grad)
    return d_inputs, tf.reshape(d_filters, [kh, kw, ci, co])


try:
    tf.RegisterGradient(_CONV_GRADIENT)(_patch_conv2d_grad)
except KeyError:  # module re-imported: already registered
    pass


def _inference_graph(model, spec):
    tvars, ntvars = list(model.trainable_variables), list(model.non_trainable_variables)

    @tf.function(autograph=False)
    def forward(x):
        out, _ = model.stateless_call(
            [tf.identity(v.value) for v in tvars], [tf.identity(v.value) for v in ntvars],
            x, training=False,
        )
        return out

    return forward.get_concrete_function(spec).graph


def vectorization_blocker(model, spec: tf.TensorSpec) -> Optional[str]:
    """Why the vectorized path does not apply to ``model`` on inputs ``spec``
    (one example, e.g. ``TensorSpec([1, 28, 28, 1])``), or None when it does.

    Example::

        vectorization_blocker(model, tf.TensorSpec([1, 10, 10, 2]))
        # "it calls nested functions (XLA-compiled: __inference__conv_xla_12); ..."
    """
    graph = _inference_graph(model, spec)
    functions = graph.as_graph_def().library.function
    if functions:
        names = ", ".join(sorted(f.signature.name for f in functions))
        xla = any(f.attr["_XlaMustCompile"].b for f in functions)
        return (
            f"it calls nested functions ({'XLA-compiled: ' if xla else ''}{names}); "
            "Keras compiles grouped convolutions (groups > 1) this way, and their "
            "gradient cannot be vectorized on every CPU"
        )
    for op in graph.get_operations():
        if op.type == "Conv2D" and not _patch_gradient_applies(op):
            return (
                f"its Conv2D op {op.name!r} is not an NHWC, ungrouped convolution with "
                "a static filter shape"
            )
    return None


def gradient_path(model, spec: tf.TensorSpec) -> str:
    """``"vectorized"`` or ``"per_example"``: the path ``diagonal_fisher``
    takes for ``model`` on inputs ``spec`` (one example; see the module
    docstring for the rule).

    Example::

        gradient_path(model, tf.TensorSpec([1, 28, 28, 1]))   # "vectorized"
    """
    return "per_example" if vectorization_blocker(model, spec) else "vectorized"


def squared_gradients(model, tvals, ntvals, rows_x, rows_y, from_logits, path):
    """``(d (-log p(rows_y[r] | rows_x[r])) / d tvals)^2`` for every row ``r``.

    Traced code (call inside a ``tf.function``). ``tvals``/``ntvals`` are the
    values of the model's trainable / non-trainable variables; returns one
    tensor ``[rows, *shape]`` per entry of ``tvals``, in its dtype.
    """

    def per_row(args):
        x1, y1 = args
        if path == "vectorized":
            graph = tf.compat.v1.get_default_graph()
            with graph.gradient_override_map({"Conv2D": _CONV_GRADIENT}):
                out, _ = model.stateless_call(tvals, ntvals, x1[None], training=False)
        else:
            out, _ = model.stateless_call(tvals, ntvals, x1[None], training=False)
        logp = _data.log_probs(out, from_logits)[0]
        nll = -tf.reduce_sum(logp * tf.one_hot(y1, tf.shape(logp)[-1], dtype=logp.dtype))
        grads = tf.gradients(nll, tvals)
        return [tf.zeros_like(t) if g is None else tf.square(g) for g, t in zip(grads, tvals)]

    if path == "vectorized":
        return tf.vectorized_map(per_row, (rows_x, rows_y))
    signature = [tf.TensorSpec(t.shape, t.dtype) for t in tvals]
    return tf.map_fn(per_row, (rows_x, rows_y), fn_output_signature=signature)
