"""The diagonal Fisher of convolutional models, on every CPU.

``diagonal_fisher`` takes the vectorized or the per-example path by a rule
decided from the model's graph (``tfmeta.complexity.per_example``). These
tests check every convolution kind (Conv1D/Conv2D strided, dilated and
grouped, DepthwiseConv2D, SeparableConv2D) against

* a NumPy re-derivation of the exact Fisher of ``conv -> Flatten -> Dense``
  in float64 (tolerance 1e-10), and
* a per-example ``tf.GradientTape`` loop (one tape per example and class),

and run the float32 check in fresh processes with ``TF_ENABLE_ONEDNN_OPTS=0``
and ``=1``: TensorFlow picks other CPU kernels with and without oneDNN
(grouped convolutions failed on CPUs without it), so the result must not
depend on which CPU runs the suite.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import onednn_runs
from tfmeta import complexity as cx

L = keras.layers


# --------------------------------------------------------------------------
# NumPy reference: exact Fisher of conv -> Flatten -> Dense(k), float64


def _patches(x, kernel_hw, strides, dilations):
    """``patches[h, w, i, j, c] = x[h*s + i*d, w*s + j*d, c]`` (valid padding)."""
    (height, width, channels), (kh, kw) = x.shape, kernel_hw
    (sh, sw), (dh, dw) = strides, dilations
    out_h = (height - (kh - 1) * dh - 1) // sh + 1
    out_w = (width - (kw - 1) * dw - 1) // sw + 1
    patches = np.empty((out_h, out_w, kh, kw, channels))
    for i in range(kh):
        for j in range(kw):
            patches[:, :, i, j] = x[i * dh:i * dh + (out_h - 1) * sh + 1:sh,
                                    j * dw:j * dw + (out_w - 1) * sw + 1:sw]
    return patches


def _grouped_conv(x, kernel, strides, dilations, groups):
    """Grouped convolution: output channel ``f`` of group ``g = f // (F/G)``
    sees input channels ``g*cg .. (g+1)*cg - 1``. Returns the output and the
    grouped patches (for the kernel gradient)."""
    kh, kw, cg, filters = kernel.shape
    p = _patches(x, (kh, kw), strides, dilations)
    p = p.reshape(*p.shape[:4], groups, cg)
    k = kernel.reshape(kh, kw, cg, groups, filters // groups)
    out = np.einsum("hwijgc,ijcgo->hwgo", p, k)
    return out.reshape(*out.shape[:2], filters), p


def _grouped_kernel_grad(p, d_out):
    """``dK[i, j, c, (g, o)] = sum_{h,w} p[h, w, i, j, g, c] d_out[h, w, (g, o)]``."""
    groups = p.shape[4]
    d = d_out.reshape(*d_out.shape[:2], groups, -1)
    g = np.einsum("hwijgc,hwgo->ijcgo", p, d)
    return g.reshape(*g.shape[:3], -1)


def _conv_stage(layer_kind, weights, x, cfg):
    """Forward pass of the conv layer on one example ``x`` ([H, W, C]), and a
    function mapping the output gradient to the conv weights' gradients."""
    strides, dilations = cfg["strides"], cfg["dilations"]
    if layer_kind == "conv":
        kernel, bias = weights
        k4 = kernel.reshape((1,) * (4 - kernel.ndim) + kernel.shape)  # Conv1D: height 1
        out, p = _grouped_conv(x, k4, strides, dilations, cfg["groups"])
        return out + bias, lambda d: [_grouped_kernel_grad(p, d).reshape(kernel.shape),
                                      d.sum((0, 1))]
    if layer_kind == "depthwise":  # groups = channels, kernel [kh, kw, C, M]
        kernel, bias = weights
        kh, kw, c, m = kernel.shape
        out, p = _grouped_conv(x, kernel.reshape(kh, kw, 1, c * m), strides, dilations, c)
        return out + bias, lambda d: [_grouped_kernel_grad(p, d).reshape(kernel.shape),
                                      d.sum((0, 1))]
    depthwise, pointwise, bias = weights  # separable: depthwise, then 1x1
    kh, kw, c, m = depthwise.shape
    mid, p = _grouped_conv(x, depthwise.reshape(kh, kw, 1, c * m), strides, dilations, c)
    out = mid @ pointwise[0, 0] + bias

    def backward(d):
        d_mid = d @ pointwise[0, 0].T
        return [_grouped_kernel_grad(p, d_mid).reshape(depthwise.shape),
                np.einsum("hwk,hwf->kf", mid, d)[None, None], d.sum((0, 1))]

    return out, backward


def _numpy_exact_fisher(model, x, layer_kind, cfg):
    """``E_x sum_c p_c(x) (d log p_c / dw)^2`` by hand: for logits ``z``,
    ``d(-log p_c)/dz = p - e_c``; the dense head passes ``W_d (p - e_c)`` back
    to the conv output."""
    weights = [np.asarray(v, np.float64) for v in model.get_weights()]
    conv_w, (w_dense, b_dense) = weights[:-2], weights[-2:]
    acc = [np.zeros_like(w) for w in weights]
    for example in np.asarray(x, np.float64):
        example = example[None] if example.ndim == 2 else example  # 1D: [1, T, C]
        out, backward = _conv_stage(layer_kind, conv_w, example, cfg)
        z = out.reshape(-1) @ w_dense + b_dense
        p = np.exp(z - z.max())
        p /= p.sum()
        for c in range(len(p)):
            r = p - np.eye(len(p))[c]
            grads = backward((w_dense @ r).reshape(out.shape)) + [np.outer(out.reshape(-1), r), r]
            for a, g in zip(acc, grads):
                a += p[c] * g**2
    return [a / len(x) for a in acc]


NUMPY_CASES = {
    # name: (layer, its arguments, input shape, kind, strides, dilations, groups, path)
    "conv2d_strided": (L.Conv2D, dict(filters=3, kernel_size=(2, 3), strides=(2, 1)),
                       (5, 6, 2), "conv", (2, 1), (1, 1), 1, "vectorized"),
    "conv2d_dilated": (L.Conv2D, dict(filters=3, kernel_size=2, dilation_rate=2),
                       (5, 5, 2), "conv", (1, 1), (2, 2), 1, "vectorized"),
    "conv2d_grouped_strided": (L.Conv2D, dict(filters=4, kernel_size=2, strides=2, groups=2),
                               (5, 5, 4), "conv", (2, 2), (1, 1), 2, "per_example"),
    "conv1d_strided": (L.Conv1D, dict(filters=3, kernel_size=2, strides=2),
                       (7, 2), "conv", (1, 2), (1, 1), 1, "vectorized"),
    "conv1d_grouped_dilated": (L.Conv1D, dict(filters=4, kernel_size=2, dilation_rate=2,
                                              groups=2),
                               (7, 2), "conv", (1, 1), (1, 2), 2, "per_example"),
    "depthwise_strided": (L.DepthwiseConv2D, dict(kernel_size=2, strides=2, depth_multiplier=2),
                          (5, 5, 2), "depthwise", (2, 2), (1, 1), None, "vectorized"),
    "separable_dilated": (L.SeparableConv2D, dict(filters=3, kernel_size=2, dilation_rate=2,
                                                  depth_multiplier=2),
                          (5, 5, 2), "separable", (1, 1), (2, 2), None, "vectorized"),
}


@pytest.mark.parametrize("name", sorted(NUMPY_CASES))
def test_exact_conv_fisher_matches_numpy_in_float64(name):
    layer, arguments, shape, kind, strides, dilations, groups, path = NUMPY_CASES[name]
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input(shape, dtype="float64"),
                              layer(**arguments, dtype="float64"), L.Flatten(dtype="float64"),
                              L.Dense(3, dtype="float64")], name=name)
    assert all(v.dtype == "float64" for v in model.trainable_variables)
    x = np.random.default_rng(2).normal(size=(4, *shape))
    fisher = cx.diagonal_fisher(model, x, exact=True)
    assert fisher.path == path
    cfg = dict(strides=strides, dilations=dilations, groups=groups)
    want = _numpy_exact_fisher(model, x, kind, cfg)
    for got, expected, v in zip(fisher.diagonal, want, model.trainable_variables):
        assert got.dtype == tf.float64 and tuple(got.shape) == tuple(v.shape)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------
# per-example GradientTape loop, float32


def _naive_exact_fisher(model, x):
    """One GradientTape per (example, class): the slow reference."""
    acc = [np.zeros(v.shape) for v in model.trainable_variables]
    for i in range(len(x)):
        p = np.asarray(tf.nn.softmax(model(x[i:i + 1], training=False)))[0]
        for c in range(len(p)):
            with tf.GradientTape() as tape:
                nll = -tf.nn.log_softmax(model(x[i:i + 1], training=False))[0, c]
            for a, g in zip(acc, tape.gradient(nll, model.trainable_variables)):
                a += p[c] * np.asarray(g, np.float64) ** 2
    return [a / len(x) for a in acc]


def _assert_matches_loop(model, x, path):
    fisher = cx.diagonal_fisher(model, x, exact=True)
    assert fisher.path == path
    # aligned with trainable variables only (BatchNorm moving stats excluded)
    assert len(fisher.diagonal) == len(model.trainable_variables)
    for got, want, v in zip(fisher.diagonal, _naive_exact_fisher(model, x),
                            model.trainable_variables):
        assert tuple(got.shape) == tuple(v.shape)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-9)
    return fisher


def test_vectorized_conv_fisher_matches_per_example_loop():
    model = keras.Sequential([
        keras.Input((10, 10, 2)),
        L.Conv2D(3, 3, strides=2, padding="same"),
        L.BatchNormalization(),
        L.ReLU(),
        L.Conv2D(4, 3, dilation_rate=2),
        L.DepthwiseConv2D(3, padding="same"),
        L.SeparableConv2D(4, 2, strides=2, padding="same"),
        L.Dropout(0.5),  # inactive: Fisher is in inference mode
        L.Flatten(),
        L.Dense(3),
    ])
    x = np.random.default_rng(4).normal(size=(5, 10, 10, 2)).astype(np.float32)
    vectorized = _assert_matches_loop(model, x, "vectorized")
    forced = cx.diagonal_fisher(model, x, exact=True, path="per_example")
    assert forced.path == "per_example"
    np.testing.assert_allclose(forced.flat(), vectorized.flat(), rtol=1e-5, atol=1e-10)


def test_grouped_conv_fisher_takes_per_example_path_and_matches_loop():
    # The model that failed on CPUs without oneDNN (issue 9), and more groups.
    model = keras.Sequential([
        keras.Input((10, 10, 2)),
        L.Conv2D(3, 3, strides=2, padding="same"),
        L.BatchNormalization(),
        L.ReLU(),
        L.Conv2D(4, 3, dilation_rate=2),
        L.DepthwiseConv2D(3, padding="same"),
        L.Conv2D(4, 1, groups=2),
        L.Conv2D(4, 2, dilation_rate=2, groups=4, padding="same"),
        L.Dropout(0.5),
        L.Flatten(),
        L.Dense(3),
    ])
    x = np.random.default_rng(4).normal(size=(5, 10, 10, 2)).astype(np.float32)
    _assert_matches_loop(model, x, "per_example")
    with pytest.raises(ValueError, match="grouped convolutions"):
        cx.diagonal_fisher(model, x, exact=True, path="vectorized")


def test_conv1d_fisher_matches_per_example_loop():
    model = keras.Sequential([
        keras.Input((12, 2)),
        L.Conv1D(4, 3, strides=2, padding="same"),
        L.SeparableConv1D(4, 2, dilation_rate=2),
        L.DepthwiseConv1D(2),
        L.Flatten(),
        L.Dense(3),
    ])
    x = np.random.default_rng(6).normal(size=(4, 12, 2)).astype(np.float32)
    _assert_matches_loop(model, x, "vectorized")
    grouped = keras.Sequential([keras.Input((12, 2)), L.Conv1D(4, 3, groups=2),
                                L.Flatten(), L.Dense(3)])
    _assert_matches_loop(grouped, x, "per_example")


def test_conv3d_and_transposed_conv_fisher_match_per_example_loop():
    # Vectorized too: pfor runs their filter gradients in its while-loop
    # fallback, on the stock kernels (right, slower).
    for layer, shape in ((L.Conv3D(2, 2, strides=(1, 2, 1)), (4, 4, 4, 2)),
                         (L.Conv2DTranspose(2, 3, strides=2), (4, 4, 2))):
        model = keras.Sequential([keras.Input(shape), layer, L.Flatten(), L.Dense(3)])
        x = np.random.default_rng(7).normal(size=(3, *shape)).astype(np.float32)
        _assert_matches_loop(model, x, "vectorized")


# --------------------------------------------------------------------------
# the same checks with and without oneDNN, each in a fresh process


def test_conv_fisher_is_right_with_and_without_onednn():
    children = onednn_runs.start(__file__, "per_example_loop or per_example_path or onednn_flag")
    for flag, child in children.items():
        output, _ = child.communicate(timeout=600)
        assert child.returncode == 0, f"TF_ENABLE_ONEDNN_OPTS={flag}:\n{output[-4000:]}"
        assert "5 passed" in output, output[-2000:]


def test_onednn_flag_reaches_tensorflow():
    """In the child processes above: TensorFlow saw the requested setting
    (oneDNN can always be switched off; switching it on needs an x86 build)."""
    expected = os.environ.get("TFMETA_EXPECT_ONEDNN")
    if expected is None:
        pytest.skip("runs in the child processes of the oneDNN test")
    from tensorflow.python.util import _pywrap_util_port

    if expected == "0":
        assert not _pywrap_util_port.IsMklEnabled()
