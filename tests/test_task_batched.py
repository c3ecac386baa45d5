"""Tasks as one computation (`tfmeta.task_batched`) against T copies of the step.

The reference is `InnerLoop(..., vectorize=False).step`, the per-copy path
every other test checks: after several inner steps on real digit images the
batched step must give the same parameters, non-trainable state (BatchNorm
statistics, dropout seed states), inner optimizer state, learner state and
losses to 1e-5, for every learner, SGD momentum/Nesterov, Adam and weight
decay, both Conv2D lowerings, float32 and float64. TensorFlow runs other
CPU kernels with and without oneDNN (grouped convolutions exist only with
it), so the float32 checks run again in fresh processes with
TF_ENABLE_ONEDNN_OPTS=0 and =1. The traced step must not grow with T, and a
model the batched step cannot run must be named with the reason.
"""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import onednn_runs
import tfmeta
from tfmeta.inner_loop import InnerLoop, mean_loss
from tfmeta.inner_optimizer import make_stateless
from tfmeta.models import convnet
from tfmeta import task_batched
from tfmeta.task_batched import TaskBatchedStep, _grouped_conv_probe, task_shard_count, why_not_batched
from tfmeta.task_state import TaskState
from tfmeta.tasks.digits import digits_arrays
from tfmeta.validation import ConfigError

L = keras.layers
TASKS, BATCH, STEPS = 3, 6, 3


def _convnet(dtype="float32"):
    """Conv2D, DepthwiseConv2D, BatchNorm, MaxPool, ReLU, Dropout and Dense, on 8x8 digits."""
    return keras.Sequential([
        keras.Input((8, 8, 1), dtype=dtype),
        L.Conv2D(4, 3, padding="same", dtype=dtype),
        L.MaxPooling2D(2, padding="same", dtype=dtype),
        L.BatchNormalization(momentum=0.9, dtype=dtype),
        L.ReLU(dtype=dtype),
        L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", dtype=dtype),
        L.MaxPooling2D(2, dtype=dtype),
        L.BatchNormalization(momentum=0.9, dtype=dtype),
        L.ReLU(dtype=dtype),
        L.Flatten(dtype=dtype),
        L.Dropout(0.25, dtype=dtype),
        L.Dense(10, dtype=dtype),
    ])


def _functional():
    """Branches, a nested model, merges, strides, dilation, groups, a regularizer."""
    inputs = keras.Input((8, 8, 2))
    a = L.Conv2D(4, 3, strides=2, padding="valid", activation="relu")(inputs)
    a = L.ZeroPadding2D(1)(a)
    b = L.Conv2D(4, 3, dilation_rate=2, padding="same", groups=2, use_bias=False)(inputs)
    b = L.AveragePooling2D(2)(b)
    b = L.BatchNormalization(axis=1)(b)
    nested = keras.Sequential([keras.Input((4, 4, 4)), L.DepthwiseConv2D(2, padding="same"),
                               L.SpatialDropout2D(0.3)])
    merged = L.Add()([L.Cropping2D(((0, 1), (0, 1)))(a), nested(b)])
    merged = L.Concatenate()([merged, L.UpSampling2D(1)(b)])
    x = L.GlobalAveragePooling2D()(merged)
    x = L.Dense(6, activation="softmax", kernel_regularizer=keras.regularizers.L2(0.01))(x)
    x = L.GaussianNoise(0.1)(x)
    outputs = L.Dense(3)(L.Reshape((2, 3))(x))
    return keras.Model(inputs, L.Flatten()(outputs))


def _digits(shape, tasks, steps, classes, dtype):
    """Real digit images (channels repeated to `shape`) and labels, `[T, S, B, ...]`."""
    images, labels = digits_arrays(image_size=shape[0])
    rows = np.random.default_rng(0).choice(len(images), (tasks, steps, BATCH), replace=False)
    x = np.repeat(images[rows].astype(dtype) / 255.0, shape[-1], axis=-1)
    return tf.constant(x), tf.constant((labels[rows] % classes).astype("int32"))


def _steps_both_ways(model, learner, optimizer, conv, classes=10, dtype="float32", tasks=TASKS,
                     jit_compile=False, shards=1, nan_task=None):
    """The task states and losses after STEPS inner steps, per copy and batched.

    `nan_task`: that task's images are NaN (it diverges at its first step).
    """
    optimizer = make_stateless(optimizer)
    optimizer.build(model.trainable_variables)
    loss = mean_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype))
    loop = InnerLoop(model, loss, learner, optimizer, vectorize=False)
    batched = TaskBatchedStep(loop, conv=conv, shards=shards)
    state = TaskState(L.Layer(name="owner"), model, optimizer, learner, tasks)
    start = state.read(tf.constant(True), 0)  # from phi, one seed stream per task
    x, y = _digits(model.input_shape[1:], tasks, STEPS, classes, dtype)
    if nan_task is not None:
        x = tf.tensor_scatter_nd_update(x, [[nan_task]], tf.fill([1, *x.shape[1:]], np.nan))

    @tf.function(jit_compile=jit_compile)
    def run(step):
        def body(s, states, losses):
            states, loss = step(states, x[:, s], y[:, s], s)
            return s + 1, states, losses.write(s, loss)

        losses = tf.TensorArray(loss.dtype, size=STEPS)
        _, states, losses = tf.while_loop(
            lambda s, *_: s < STEPS, body, (tf.constant(0), start, losses)
        )
        return states, losses.stack()

    return run(loop.step), run(batched.step)


def _assert_same(per_copy, batched):
    (expected_state, expected_loss), (state, loss) = per_copy, batched
    assert loss.shape == expected_loss.shape and loss.shape[0] == STEPS
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-5)
    names = ["params", "non_trainable", "optimizer", "learner"]
    for name, want, got in zip(names, expected_state, state):
        want, got = tf.nest.flatten(want), tf.nest.flatten(got)
        assert len(want) == len(got), name
        for i, (w, g) in enumerate(zip(want, got)):
            assert w.dtype == g.dtype and w.shape == g.shape, (name, i)
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{name}[{i}]")


# Adam's epsilon is 1e-3: a conv bias feeding BatchNorm has a zero gradient up
# to round-off (~1e-9), which Adam's default epsilon (1e-7) would scale up to
# steps of +-lr whose sign is the round-off's, in either path.
CASES = {
    "leap-sgd_momentum-auto": (tfmeta.Leap, lambda: keras.optimizers.SGD(0.1, momentum=0.9), "auto"),
    "reptile-adam-auto": (tfmeta.Reptile, lambda: keras.optimizers.Adam(0.01, epsilon=1e-3), "auto"),
    "fomaml_all-nesterov-auto": (
        lambda: tfmeta.FOMAML(steps="all"),
        lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True), "auto"),
    "fomaml-adamw-map": (
        tfmeta.FOMAML, lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1, epsilon=1e-3), "map"),
    "cts-sgd_weight_decay-auto": (
        lambda: tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile()),
        lambda: keras.optimizers.SGD(0.1, momentum=0.5, weight_decay=0.01), "auto"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_step_equals_per_copy_float32(case):
    learner, optimizer, conv = CASES[case]
    per_copy, batched = _steps_both_ways(_convnet(), learner(), optimizer(), conv)
    _assert_same(per_copy, batched)
    # The dropout seed states advanced, differently per task, as Keras does.
    seeds = [v for v in batched[0][1] if v.dtype.is_integer]
    assert seeds and len({tuple(s) for s in seeds[0].numpy()}) == TASKS


def test_batched_step_equals_per_copy_float64():
    keras.utils.set_random_seed(1)
    per_copy, batched = _steps_both_ways(
        _convnet("float64"), tfmeta.Leap(), keras.optimizers.SGD(0.1, momentum=0.9), "auto",
        dtype="float64",
    )
    assert batched[0][0][0].dtype == tf.float64
    _assert_same(per_copy, batched)


def test_batched_step_equals_per_copy_under_xla_with_the_convolutions_mapped_and_why(
        caplog, monkeypatch):
    # Both under XLA: XLA draws other dropout masks from the same seeds than
    # TensorFlow's kernels (the per-copy step too), so XLA on vs off differ.
    # XLA's CPU grouped convolution fails the probe's diverged-task check:
    # its optimized HLO computes the filter gradient (batch_group_count) as
    # one convolution over a zero-dilated group axis, and NaN * 0 is NaN. An
    # HLO rewrite, not a kernel: the same on every CPU. So tf.map_fn, and one
    # warning.
    monkeypatch.setattr(task_batched, "_MAP_LOWERING_WARNED", set())
    config = ((8, 8, 2), (3, 3, 1, 8), (1, 1), "SAME", (1, 1), 2)  # 2 tasks of Conv2D(4, 3)
    assert _grouped_conv_probe(config, "float32", "", xla=True) == (
        "lets one task's NaN into the other tasks' gradients"
    )
    with caplog.at_level("WARNING", logger="tfmeta"):
        per_copy, batched = _steps_both_ways(
            _convnet(), tfmeta.Leap(), keras.optimizers.SGD(0.1, momentum=0.9), "auto",
            tasks=2, jit_compile=True,
        )
    _assert_same(per_copy, batched)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tfmeta"]
    assert len(warnings) == 1, warnings
    assert "tf.map_fn" in warnings[0] and "XLA's" in warnings[0] and "NaN" in warnings[0]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_diverged_task_leaves_the_other_tasks_as_per_copy(jit_compile):
    """One task's NaN stays in that task, with or without XLA, as in the
    copies. (XLA's CPU grouped convolution leaking it into every group shows
    in a longer graph: test_xla_replicas' ..._one_xla_computation.)"""
    # A convolution straight into Flatten: its output gradient is NaN
    # wherever its input is (after a MaxPool, most of it is 0 instead).
    model = keras.Sequential([
        keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same", use_bias=False), L.Flatten(),
        L.BatchNormalization(), L.ReLU(), L.Dense(10),
    ])
    per_copy, batched = _steps_both_ways(
        model, tfmeta.Leap(), keras.optimizers.SGD(0.1), "auto", tasks=3,
        jit_compile=jit_compile, nan_task=1,
    )
    # Where the NaN task's own values end up NaN is the kernels' business:
    # oneDNN's fused BatchNorm + ReLU maps NaN to 0, so its loss may even be
    # finite. Its weights are not: the first kernel's gradient is x times dy.
    assert not np.isfinite(batched[0][0][0][1]).any()
    others = [0, 2]

    def tasks(run):
        state, loss = run
        return tf.nest.map_structure(lambda t: tf.gather(t, others), state), tf.gather(loss, others, axis=1)

    for leaf in tf.nest.flatten(tasks(batched)):
        assert np.isfinite(leaf).all()
    _assert_same(tasks(per_copy), tasks(batched))


@pytest.mark.parametrize("shards", [2, "auto"])
def test_tasks_in_shards_equal_per_copy(shards, monkeypatch):
    # 3 tasks in 2 shards: one of 2 tasks, one of 1 ("auto" with one thread per
    # op: one per core, so 2 or 3 on the CI's 2 cores or more).
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    assert task_shard_count(shards, TASKS) >= 2
    per_copy, batched = _steps_both_ways(
        _convnet(), tfmeta.Leap(), keras.optimizers.SGD(0.1, momentum=0.9), "auto", shards=shards,
    )
    _assert_same(per_copy, batched)
    seeds = [v for v in batched[0][1] if v.dtype.is_integer]
    assert len({tuple(s) for s in seeds[0].numpy()}) == TASKS  # each task its own dropout stream


def test_task_shard_count(monkeypatch):
    assert [task_shard_count(n, 3) for n in (1, 2, 3, 7)] == [1, 2, 3, 3]
    # "auto" on a CPU (no GPU here): the cores over each op's threads, at most T.
    assert tf.config.threading.get_intra_op_parallelism_threads() == 0  # set by the environment
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    assert task_shard_count("auto", 64) == cores
    assert task_shard_count("auto", 1) == 1
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", str(cores))
    assert task_shard_count("auto", 64) == 1
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS")
    assert task_shard_count("auto", 64) == 1  # TensorFlow's default: every core per op


@pytest.mark.parametrize("shards", [0, -1, 1.5, True, "all"])
def test_bad_task_shards_are_refused(shards):
    loop = InnerLoop(_convnet(), mean_loss("mse"), tfmeta.Reptile(), keras.optimizers.SGD(0.1))
    with pytest.raises(ConfigError, match=r"task_shards=.* is not a number of task shards: use an int >= 1"):
        TaskBatchedStep(loop, shards=shards)


def test_task_shards_without_vectorized_tasks_is_refused():
    with pytest.raises(ConfigError, match=r"task_shards=2 .* vectorize_tasks=False .* set vectorize_tasks=True"):
        InnerLoop(_convnet(), mean_loss("mse"), tfmeta.Reptile(), keras.optimizers.SGD(0.1),
                  task_shards=2)


def test_functional_model_with_branches_and_regularizer_equals_per_copy():
    per_copy, batched = _steps_both_ways(
        _functional(), tfmeta.Leap(), keras.optimizers.SGD(0.1, momentum=0.9), "auto", classes=6,
    )
    _assert_same(per_copy, batched)


def test_grouped_conv_runs_exactly_where_onednn_does():
    """In the child processes below: with oneDNN the grouped lowering is the
    one `auto` picks (float32); without it TensorFlow's CPU kernels lack
    grouped convolutions and `auto` takes the map lowering."""
    expected = os.environ.get("TFMETA_EXPECT_ONEDNN")
    if expected is None:
        pytest.skip("runs in the child processes of the oneDNN test")
    # 3 groups of 4 -> 4 channels on 8x8, as 3 tasks of a Conv2D(4, 3).
    config = ((8, 8, 12), (3, 3, 4, 12), (1, 1), "SAME", (1, 1), 3)
    assert (_grouped_conv_probe(config, "float32", "") is None) == (expected == "1")
    assert _grouped_conv_probe(config, "float64", "") is not None


@pytest.fixture(scope="module")
def onednn_children():
    """This file's float32 checks in two child processes, TF_ENABLE_ONEDNN_OPTS=0 and =1."""
    children = onednn_runs.start(__file__, "leap-sgd_momentum-auto or functional or runs_exactly")
    yield children
    for child in children.values():
        if child.poll() is None:
            child.kill()
            child.communicate()


@pytest.fixture(scope="module", autouse=True)
def _onednn_children_first(request):
    """Start the children when the module starts, if their test is selected:
    they run beside the other tests (this process mostly traces, on one core)."""
    if any(item.originalname == "test_batched_step_is_right_with_and_without_onednn"
           for item in request.session.items):
        request.getfixturevalue("onednn_children")


def test_batched_step_is_right_with_and_without_onednn(onednn_children):
    for flag, child in onednn_children.items():
        output, _ = child.communicate(timeout=600)
        assert child.returncode == 0, f"TF_ENABLE_ONEDNN_OPTS={flag}:\n{output[-4000:]}"
        assert "3 passed" in output, output[-2000:]


def _layers_1d():
    inputs = keras.Input((6, 4))
    a = L.LeakyReLU(0.2)(L.MaxPooling1D(2, padding="same")(inputs))
    b = L.ELU()(L.AveragePooling1D(2)(inputs))
    merged = [L.Subtract()([a, b]), L.Multiply()([a, b]), L.Average()([a, b]),
              L.Maximum()([a, b]), L.Minimum()([a, b])]
    x = L.Permute((2, 1))(L.Identity()(L.Add()(merged)))
    x = L.Softmax()(L.GaussianDropout(0.2)(x))
    return keras.Model(inputs, L.Concatenate()([L.GlobalMaxPooling1D()(x), L.GlobalAveragePooling1D()(x)]))


def _layers_2d():
    """Per-channel layers on tasks in the channels (after convolutions)."""
    inputs = keras.Input((6, 6, 2))
    a = L.Conv2D(3, 3, padding="same")(inputs)
    b = L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same", use_bias=False)(inputs)
    b = L.UpSampling2D(2)(L.Conv2D(3, 1, activation="tanh")(b))
    x = L.Maximum()([a, b])
    x = L.Activation("sigmoid")(L.Minimum()([L.Subtract()([a, x]), L.Multiply()([x, b])]))
    x = L.MaxPooling2D(3, strides=2)(L.Activation("softmax")(x))
    return keras.Model(inputs, L.Concatenate()([L.GlobalMaxPooling2D()(x), L.GlobalAveragePooling2D()(x)]))


def _layers_3d():
    inputs = keras.Input((4, 4, 4, 2))
    a = L.MaxPooling3D(2)(inputs)
    b = L.AveragePooling3D(2)(inputs)
    x = L.Add()([a, b])
    return keras.Model(inputs, L.Add()([L.GlobalMaxPooling3D()(x), L.GlobalAveragePooling3D()(x)]))


@pytest.mark.parametrize("make", [_layers_1d, _layers_2d, _layers_3d], ids=["1d", "2d", "3d"])
def test_every_supported_layer_matches_its_per_task_call(make):
    """The forward pass (training) of T parameter sets at once against
    `stateless_call` per task, on random tensors (a numerical check)."""
    from tfmeta.task_batched import _run_model, _TaskValues

    model = make()
    rng = np.random.default_rng(0)
    # Different weights and seed states per task.
    params = [tf.constant(v.numpy() + 0.1 * rng.standard_normal((TASKS, *v.shape)), v.dtype)
              for v in model.trainable_variables]
    non_trainable = [tf.stack([v.value + t for t in range(TASKS)]) for v in model.non_trainable_variables]
    x = tf.constant(rng.standard_normal((TASKS, BATCH, *model.input_shape[1:])), "float32")
    state = _TaskValues(model, params, non_trainable, "auto")
    got = _run_model(model, x, state, training=True)
    for t in range(TASKS):
        want, want_state = model.stateless_call(
            [p[t] for p in params], [v[t] for v in non_trainable], x[t], training=True
        )
        np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-6)
        for v, w in zip(model.non_trainable_variables, want_state):
            np.testing.assert_array_equal(state[v][t], w)


def _graph_nodes(step, tasks, shards=1):
    """Nodes of the traced step, the functions it calls included."""
    model = convnet(5, input_shape=(8, 8, 1), filters=4, blocks=2)
    optimizer = make_stateless(keras.optimizers.SGD(0.1, momentum=0.9))
    optimizer.build(model.trainable_variables)
    loss = mean_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loop = InnerLoop(model, loss, tfmeta.Leap(), optimizer, vectorize=False)
    run = TaskBatchedStep(loop, shards=shards).step if step == "batched" else loop.step
    start = TaskState(L.Layer(name="owner"), model, optimizer, tfmeta.Leap(), tasks).read(
        tf.constant(True), 0
    )
    x, y = _digits((8, 8, 1), tasks, 1, 5, "float32")
    graph = tf.function(run).get_concrete_function(start, x[:, 0], y[:, 0], tf.constant(0)).graph
    definition = graph.as_graph_def()
    return len(definition.node) + sum(len(f.node_def) for f in definition.library.function)


def test_traced_step_is_flat_in_the_number_of_tasks():
    batched = {tasks: _graph_nodes("batched", tasks) for tasks in (2, 8)}
    per_copy = {tasks: _graph_nodes("per_copy", tasks) for tasks in (2, 8)}
    # Flat up to TensorFlow making a small zeros tensor a Const and a larger
    # one a Fill (2 nodes here), not one node per task.
    assert abs(batched[8] - batched[2]) <= 0.01 * batched[2], batched
    assert per_copy[8] > 3 * per_copy[2], per_copy
    assert batched[8] < per_copy[8] / 2, (batched, per_copy)
    # In shards the graph grows with the shards, not with T.
    sharded = {tasks: _graph_nodes("batched", tasks, shards=2) for tasks in (4, 8)}
    assert abs(sharded[8] - sharded[4]) <= 0.01 * sharded[4], sharded
    assert 1.5 * batched[8] < sharded[8] < 2.5 * batched[8], (sharded, batched)
    # One task has nothing to batch: no pfor, so no bigger than two (it was
    # 1492 nodes against 1099 through tf.vectorized_map).
    assert _graph_nodes("batched", 1) < batched[2], batched


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)

    def call(self, x):
        return self.dense(x)


UNSUPPORTED = {
    "lstm": (lambda: keras.Sequential([keras.Input((5, 3)), L.LSTM(4, name="lstm")]),
             r"layer 'lstm' \(LSTM\) has no batched form"),
    "subclassed": (_Subclassed, r"is a _Subclassed: only keras.Sequential and functional"),
    "activity_regularizer": (
        lambda: keras.Sequential([keras.Input((4,)), L.Dense(2, name="d", activity_regularizer="l2")]),
        r"layer 'd' \(Dense\) has an activity_regularizer"),
    "synchronized_batchnorm": (
        lambda: keras.Sequential([keras.Input((4,)), L.BatchNormalization(synchronized=True, name="bn")]),
        r"layer 'bn' \(BatchNormalization\) is synchronized"),
    "nested_lstm": (
        lambda: keras.Sequential([keras.Input((5, 3)), keras.Sequential([L.LSTM(4, name="inner")])]),
        r"layer 'inner' \(LSTM\)"),
    "mixed_precision": (
        lambda: keras.Sequential([keras.Input((4,)), L.Dense(2, name="d", dtype="mixed_float16")]),
        r"layer 'd' \(Dense\) uses dtype policy 'mixed_float16'"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_why_not_batched_names_the_layer_and_the_reason(case):
    make, reason = UNSUPPORTED[case]
    model = make()
    message = why_not_batched(model)
    assert message is not None and "\n" not in message
    assert re.search(reason, message), message
    loop = InnerLoop(model, mean_loss("mse"), tfmeta.Reptile(), keras.optimizers.SGD(0.1))
    with pytest.raises(ConfigError, match="cannot run as one computation: .*vectorize_tasks=False"):
        TaskBatchedStep(loop)


def test_supported_models_have_no_reason():
    assert why_not_batched(convnet(20, filters=16)) is None
    assert why_not_batched(_convnet()) is None
    assert why_not_batched(_functional()) is None


def test_unknown_conv_lowering_is_refused():
    loop = InnerLoop(_convnet(), mean_loss("mse"), tfmeta.Reptile(), keras.optimizers.SGD(0.1))
    with pytest.raises(ConfigError, match=r"conv='fast' is not a Conv2D lowering: use one of"):
        TaskBatchedStep(loop, conv="fast")


class PolarSGD(keras.optimizers.Optimizer):
    """Orthogonalized gradient descent: a matrix steps by -lr U diag(s / (s + d)) V^T
    of its gradient's SVD U diag(s) V^T, the polar factor U V^T (which Muon
    approximates by Newton-Schulz iterations) damped where s is small (d = 0.01:
    there U V^T alone is decided by round-off); a vector steps by -lr g.
    pfor has no converter for TensorFlow's Svd op."""

    def update_step(self, gradient, variable, learning_rate):
        if len(variable.shape) == 2:
            s, u, v = tf.linalg.svd(gradient)
            gradient = tf.matmul(u * (s / (s + 0.01)), v, transpose_b=True)
        self.assign_sub(variable, tf.cast(learning_rate, variable.dtype) * gradient)


def test_an_optimizer_pfor_cannot_batch_runs_as_a_loop_says_so_and_equals_per_copy(caplog):
    def mlp():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(),
                                 L.Dense(12, activation="tanh"), L.Dense(10)])

    def warnings():
        return [r.getMessage() for r in caplog.records if r.name == "tfmeta"]

    with caplog.at_level("WARNING", logger="tfmeta"):
        _steps_both_ways(mlp(), tfmeta.Reptile(), keras.optimizers.Adam(0.01), "auto")
        assert warnings() == []  # built-in optimizers and the loss batch whole
        per_copy, batched = _steps_both_ways(mlp(), tfmeta.Reptile(), PolarSGD(0.05), "auto")
    _assert_same(per_copy, batched)
    assert len(warnings()) == 1, warnings()
    assert "PolarSGD" in warnings()[0] and "Svd" in warnings()[0], warnings()[0]
    assert "tf.while_loop" in warnings()[0] and "vectorize_tasks=False" in warnings()[0]


@pytest.mark.parametrize("learner", [
    tfmeta.Leap(), tfmeta.Leap(norm=False, loss=False), tfmeta.Reptile(), tfmeta.FOMAML(),
    tfmeta.FOMAML(steps="all"), tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile()),
], ids=repr)
def test_every_learner_batches_whole(learner, caplog):
    """No built-in learner's `observe` falls back to a while loop over the tasks (an op without
    a pfor converter there, such as tf.nn.l2_loss, would make the batched step slow)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(), L.Dense(12, activation="tanh"),
                              L.Dense(10)])
    with caplog.at_level("WARNING", logger="tfmeta"):
        per_copy, batched = _steps_both_ways(model, learner, keras.optimizers.SGD(0.05, momentum=0.9),
                                             "auto")
    assert [r.getMessage() for r in caplog.records if r.name == "tfmeta"] == []
    _assert_same(per_copy, batched)
