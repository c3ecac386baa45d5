"""Every task's inner step as one computation, for convolutional models too.

`InnerLoop.step` advances T tasks by one inner step. As T copies of the step
the graph (and its build time) grows with T; `tf.vectorized_map` keeps it
flat but cannot batch a convolution over per-task filters, nor dropout.
`TaskBatchedStep.step` (same arguments, same result) runs the T tasks as one
computation instead:

* the forward pass walks the Keras model (`keras.Sequential`, functional
  models, nested ones) and runs every layer for the T parameter sets at
  once on `x` of shape `[T, B, ...]`: Dense as one batched matmul; Conv2D
  as one convolution with `groups=T` (input `[B, H, W, T*C]`) where the
  device runs grouped convolutions, else as a `tf.map_fn` of the layer's
  own call over the tasks; DepthwiseConv2D as one depthwise convolution of
  the `T*C` channels; BatchNormalization with per-task batch moments (one
  fused op on `T*C` channels) and per-task moving statistics, updated as
  Keras does; dropout-like layers as a `tf.map_fn` of their own call on
  each task's seed state (the same masks as the per-copy path); weightless
  per-example layers (pooling, Flatten, activations, merges, ...) on the
  tasks in the channels where they act per channel, else with the tasks
  folded into the batch;
* one tape over the sum of the T task losses gives every task's gradient
  (tasks share no parameter);
* the rest of the step (the inner optimizer, `diverged_as_nan`, the
  learner's `observe`), element-wise ops and reductions, runs per task in
  one `tf.vectorized_map`. An op pfor cannot batch (e.g. `tf.linalg.svd`
  in a custom optimizer) runs as a `tf.while_loop` over the tasks: right
  but slower, so the first trace logs one warning naming the part (the
  optimizer, or the loss) and pfor's reason.

No op of the traced step depends on T. With `shards=N` the T tasks run as
N such computations of consecutive tasks, side by side (the graph grows
with N, not T): on CPUs whose ops are too small to use every core, that is
what keeps the cores busy. `why_not_batched(model)` names the
first layer this cannot run (an LSTM, a subclassed model, a regularized
activity, ...), so the caller can fall back to the per-copy step.

Example::

    loop = InnerLoop(model, loss, learner, inner_optimizer)
    if why_not_batched(model) is None:
        step = TaskBatchedStep(loop)
        tasks, losses = step.step(tasks, x, y, index)   # x: [T, B, ...], losses: [T]
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional

from tfmeta.divergence import diverged_as_nan
from tfmeta.inner_optimizer import stateless_apply
from tfmeta.learners.base import InnerStep
from tfmeta.replicas import task_loss
from tfmeta.validation import ConfigError

__all__ = [
    "CONV_LOWERINGS", "TaskBatchedStep", "check_task_shards", "finish_task_step", "quiet_pfor",
    "task_shard_count", "why_not_batched",
]

#: How `TaskBatchedStep` runs a Conv2D for T tasks: "grouped" (one grouped
#: convolution), "map" (`tf.map_fn` over the tasks), "auto" (grouped where
#: the device computes it right and keeps a diverged task's NaN in that
#: task, e.g. CPUs with oneDNN and GPUs, not XLA on CPU; map elsewhere, with
#: one warning that says why).
CONV_LOWERINGS = ("auto", "grouped", "map")


def check_task_shards(shards):
    """`shards` if it is an int >= 1 or "auto" (a ConfigError says so otherwise).

    Example:
        >>> check_task_shards("auto")
        'auto'
    """
    if shards == "auto" or (isinstance(shards, (int, np.integer)) and not isinstance(shards, bool)
                            and shards >= 1):
        return shards
    raise ConfigError(
        f"task_shards={shards!r} is not a number of task shards: use an int >= 1 (1: all "
        "tasks as one computation) or 'auto' (as many as the CPU cores over each op's "
        "threads and the replicas, at most one per task; 1 where a GPU is visible)."
    )


def task_shard_count(shards, tasks):
    """The number of shards `shards` (`check_task_shards`) means for `tasks` tasks.

    "auto": 1 where a GPU is visible (one big computation suits it). On CPUs,
    the cores this process may use over the threads each op takes
    (`tf.config.threading`'s intra-op threads, else `TF_NUM_INTRAOP_THREADS`,
    else all cores) and over the replicas in sync (in a replica context),
    at most `tasks`: so with TensorFlow's default threads 1 shard, and with
    `TF_NUM_INTRAOP_THREADS=1` one per core, the setting that measured
    fastest for small models (docs/performance.md). An int is capped at `tasks`.

    Example:
        >>> task_shard_count(4, 3)
        3
    """
    if shards != "auto":
        return min(int(shards), tasks)
    if tf.config.list_logical_devices("GPU"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    if not threads:
        try:
            threads = int(os.environ.get("TF_NUM_INTRAOP_THREADS", "0"))
        except ValueError:
            threads = 0
    threads = threads if threads > 0 else cores
    context = tf.distribute.get_replica_context()
    replicas = 1 if context is None else context.num_replicas_in_sync
    return max(1, min(tasks, cores // (threads * replicas)))


L = keras.layers

# Weightless layers that act on each example alone, deterministically: the
# T tasks run through them as one batch of T * B examples.
_FOLDED = (L.Softmax, L.Flatten, L.Reshape, L.Permute, L.Concatenate)
# Those of them that act on each channel alone (or element-wise on inputs of
# one shape) run on tasks in the channels as well, unchanged.
_PER_CHANNEL = (
    L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Identity,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.ZeroPadding2D, L.Cropping2D, L.UpSampling2D,
    L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum,
)
# Layers whose only state is a seed generator: run per task on its own
# seed state, so every task draws the masks the per-copy step draws.
_RANDOM = (L.Dropout, L.SpatialDropout2D, L.GaussianNoise, L.GaussianDropout)


# ------------------------------------------------------------ the check


def why_not_batched(model):
    """Why `model` cannot run its T tasks as one computation, in one line; `None` if it can.

    Example:
        >>> why_not_batched(tfmeta.models.convnet(filters=16)) is None
        True
        >>> why_not_batched(keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4)]))
        "layer 'lstm' (LSTM) has no batched form: ..."
    """
    kind = type(model)
    if kind is keras.Sequential:
        layers = model.layers
    elif kind is Functional:
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            return (
                f"model {model.name!r} has {len(model.inputs)} inputs and "
                f"{len(model.outputs)} outputs; only single-input, single-output "
                "models run batched"
            )
        layers = [op for op in model.operations if not isinstance(op, L.InputLayer)]
        for nodes in model._nodes_by_depth.values():
            for node in nodes:
                extra = {
                    k for k, v in node.arguments.kwargs.items() if k != "training" and v is not None
                }
                if extra and not node.is_input:
                    return (
                        f"layer {node.operation.name!r} is called with {sorted(extra)} in the "
                        "model's graph; only the layer's input (and training) run batched"
                    )
    else:
        return (
            f"model {model.name!r} is a {kind.__name__}: only keras.Sequential and "
            "functional models (keras.Model(inputs, outputs)) of built-in layers run batched"
        )
    for layer in layers:
        reason = _why_not_layer(layer)
        if reason:
            return reason
    return None


def _why_not_layer(layer):
    kind = type(layer)
    name = f"layer {layer.name!r} ({kind.__name__})"
    if kind in (keras.Sequential, Functional):
        return why_not_batched(layer)
    if kind not in _HANDLERS:
        return (
            f"{name} has no batched form: supported are Dense, Conv2D, DepthwiseConv2D, "
            "BatchNormalization, Dropout-like, pooling, reshaping, activation and merge layers"
        )
    policy = layer.dtype_policy
    if policy.quantization_mode is not None or policy.compute_dtype != policy.variable_dtype:
        return (
            f"{name} uses dtype policy {policy.name!r}; only unquantized, unmixed "
            "policies run batched"
        )
    if getattr(layer, "activity_regularizer", None) is not None:
        return f"{name} has an activity_regularizer, which runs only in the per-copy step"
    if getattr(layer, "lora_enabled", False):
        return f"{name} has LoRA enabled, which runs only in the per-copy step"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"{name} uses data_format={layer.data_format!r}; only channels_last runs batched"
    if kind is L.BatchNormalization and (layer.synchronized or layer.renorm):
        return f"{name} is synchronized or renormalized, which runs only in the per-copy step"
    return None


# ------------------------------------------------------------ the step


def finish_task_step(loop, params, opt_vars, learner_state, grads, loss, index):
    """One task's step after its loss and gradients: optimizer, divergence, learner.

    Args:
        loop: the `InnerLoop` (its `optimizer`, `learner`, `max_task_loss`
            and `heads`).
        params, opt_vars, learner_state: the task's state before the step.
        grads: the task's gradients (`None` for a parameter the loss ignores).
        loss: the task's scalar loss.
        index: the step's position in the trajectory.

    Returns:
        `((new_params, new_opt_vars, new_learner_state), loss)`: a diverged
        step leaves NaN in the loss, the parameters and the optimizer state,
        which the learner and the meta-update then see.
    """
    grads = [tf.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    new_params, new_opt_vars = stateless_apply(loop.optimizer, opt_vars, grads, params)
    if loop.heads is not None and not loop.learner.schedule.reset_optimizer:
        # The heads' slots restarted with the trajectory, the step count did not.
        new_params, new_opt_vars = loop.heads.own_step_count(
            loop.optimizer, opt_vars, grads, params, index, (new_params, new_opt_vars)
        )
    loss, (new_params, new_opt_vars) = diverged_as_nan(
        loss, (new_params, new_opt_vars), loop.max_task_loss
    )
    learner_state = loop.learner.observe(
        learner_state, InnerStep(list(params), grads, loss, index)
    )
    return (list(new_params), list(new_opt_vars), learner_state), loss


class TaskBatchedStep:
    """`InnerLoop.step` with the T tasks as one computation (see the module docstring).

    Args:
        loop: the `InnerLoop` whose model, loss, learner, inner optimizer and
            `max_task_loss` the step uses.
        conv: how Conv2D layers run for T tasks, one of `CONV_LOWERINGS`.
        shards: split the T tasks into this many groups of consecutive tasks,
            each one batched computation of its own (an int >= 1, or "auto":
            `task_shard_count`). The groups share no op, so the executor runs
            them side by side on its inter-op threads: on a CPU whose ops are
            too small to keep every core busy alone, this is what fills the
            cores (docs/performance.md, "Tasks as one computation"). The
            graph grows with the shards, not with T. Same results as 1 shard
            to float rounding.

    Raises:
        ConfigError: `why_not_batched(loop.model)` is not `None` (the message
            says why), `conv` is not one of `CONV_LOWERINGS`, or `shards` is
            not an int >= 1 or "auto".

    Example:
        >>> step = TaskBatchedStep(loop)
        >>> tasks, losses = step.step(tasks, x, y, index)   # as loop.step(...)
    """

    def __init__(self, loop, conv="auto", shards=1):
        if conv not in CONV_LOWERINGS:
            raise ConfigError(
                f"conv={conv!r} is not a Conv2D lowering: use one of {CONV_LOWERINGS}."
            )
        reason = why_not_batched(loop.model)
        if reason:
            raise ConfigError(
                f"The tasks of this model cannot run as one computation: {reason}. "
                "Run them as copies of the step (vectorize_tasks=False)."
            )
        self.loop = loop
        self.conv = conv
        # The grouped-conv probe must check the kernels the step will run:
        # XLA's, when the loop is compiled (its CPU grouped-conv filter
        # gradient lets one group's NaN into every group's).
        self._xla = bool(getattr(loop, "jit_compile", False))
        self.shards = check_task_shards(shards)
        # What tf.vectorized_map must partly run as a while loop, and why
        # (None: nothing), found at the first trace of each map.
        self._while_loops = {}

    def _vectorized_map(self, what, fn, elems):
        """`tf.vectorized_map(fn, elems)`, with one warning naming `what` and pfor's
        reason when pfor cannot batch some op of `fn` and runs it as a while loop."""
        if tf.nest.flatten(elems)[0].shape[0] == 1:
            # One task (a shard of one, or T = 1): nothing to batch, and pfor
            # would add about a third to the graph (1492 nodes against 1099
            # at T = 2 for tests/test_task_batched.py's convnet; 909 this way).
            out = fn(tf.nest.map_structure(lambda t: t[0], elems))
            return tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), out)
        if what not in self._while_loops:
            reason = self._while_loops[what] = _why_not_vectorized(fn, elems)
            if reason:
                logging.getLogger("tfmeta").warning(
                    "tf.vectorized_map cannot batch %s over the tasks (%s): that part of the "
                    "inner step runs as a tf.while_loop over them, right but slower. Use ops "
                    "pfor can batch there, or run the tasks as copies of the step "
                    "(vectorize_tasks=False).", what, reason,
                )
        # warn=False: the warning above replaces pfor's own line per op.
        return tf.vectorized_map(fn, elems, fallback_to_while_loop=True, warn=False)

    def step(self, tasks, x, y, index):
        """One inner step of every task: `(tasks, losses)`, stacked over tasks like `x`."""
        count = task_shard_count(self.shards, x.shape[0])
        if count == 1:
            return self._step(tasks, x, y, index)
        # Consecutive tasks, as even as the count allows: [3, 3, 2] for 8 in 3.
        sizes = [len(part) for part in np.array_split(np.arange(x.shape[0]), count)]
        parts = zip(*(tf.split(t, sizes) for t in tf.nest.flatten((tasks, x, y))))
        outputs = [
            self._step(*tf.nest.pack_sequence_as((tasks, x, y), list(part)), index)
            for part in parts
        ]
        return tf.nest.map_structure(lambda *shards: tf.concat(shards, 0), *outputs)

    def _step(self, tasks, x, y, index):
        """`step` for tasks as one computation."""
        params, non_trainable, opt_vars, learner_state = tasks
        model = self.loop.model
        with tf.GradientTape() as tape:
            tape.watch(params)
            xla = self._xla or _traced_for_xla()
            state = _TaskValues(model, params, non_trainable, self.conv, xla)
            y_pred = _run_model(model, x, state, training=True)
            losses = self._vectorized_map(
                f"the task loss {self.loop.loss.name!r}",
                lambda args: task_loss(self.loop.loss, *args), (y, y_pred),
            )
            penalty = _weight_penalties(model, state)
            if penalty is not None:
                losses = losses + tf.cast(penalty, losses.dtype)
            total = tf.reduce_sum(losses)
        grads = tape.gradient(total, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        def rest(args):
            return finish_task_step(self.loop, *args, index)

        optimizer, learner = self.loop.optimizer, self.loop.learner
        (new_params, new_opt_vars, learner_state), losses = self._vectorized_map(
            f"the inner optimizer {type(optimizer).__name__} ({optimizer.name!r}) and "
            f"{type(learner).__name__}.observe",
            rest, (params, opt_vars, learner_state, grads, losses),
        )
        new_non_trainable = [state[v] for v in model.non_trainable_variables]
        return (list(new_params), new_non_trainable, list(new_opt_vars), learner_state), losses


def _traced_for_xla():
    """Whether the function being traced is compiled with XLA (`jit_compile`,
    the caller's own too). TensorFlow has no public API for it; where its
    private one is gone, only the inner loop's own `jit_compile` counts."""
    try:
        from tensorflow.python.ops import control_flow_util
        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return False


@contextlib.contextmanager
def quiet_pfor():
    """TensorFlow's logger off: pfor logs every op it cannot batch (dozens of lines
    of NodeDefs) before raising, and the error it raises says it in one line.

    Example::

        with quiet_pfor():
            tf.vectorized_map(fn, elems, fallback_to_while_loop=False)
    """
    logger = tf.get_logger()
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _why_not_vectorized(fn, elems):
    """None if `tf.vectorized_map` batches every op of `fn` over `elems`, else pfor's
    reason, in one line.

    The attempt is traced in a function of its own that never runs: a failed
    one leaves no ops in the caller's graph (where stateful ones would run).
    """
    reasons = []

    def attempt(values):
        # Caught here, inside the trace: out of it, tf.function would frame
        # the message ("in user code: ...").
        try:
            tf.vectorized_map(fn, values, fallback_to_while_loop=False)
        except ValueError as error:
            reasons.append(str(error).splitlines()[0])

    specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), elems)
    with quiet_pfor():
        tf.function(attempt).get_concrete_function(specs)
    return reasons[0] if reasons else None


# ------------------------------------------------------------ the forward pass


class _TaskValues:
    """The stacked `[T, ...]` values of the model's variables while the tasks run.

    Indexed by a Keras variable; assignments (BatchNorm's moving statistics,
    seed states) replace the value, so a layer used twice sees its update.
    """

    def __init__(self, model, params, non_trainable, conv, xla=False):
        variables = list(model.trainable_variables) + list(model.non_trainable_variables)
        self._values = {id(v): value for v, value in zip(variables, [*params, *non_trainable])}
        self.conv, self.xla = conv, xla

    def __getitem__(self, variable):
        return self._values[id(variable)]

    def __setitem__(self, variable, value):
        self._values[id(variable)] = value


class _Acts:
    """The T tasks' activations of one layer, in one of two layouts.

    Tasks first, `[T, B, ...]`, or tasks in the channels, `[B, ..., T*C]`
    (task t's channels at t*C .. (t+1)*C - 1): the layout of a grouped or
    depthwise convolution, in which per-channel layers (BatchNorm, pooling,
    element-wise activations) run unchanged, so a convnet's blocks need no
    transposes between them.
    """

    def __init__(self, value, tasks, in_channels):
        self.value, self.tasks, self.in_channels = value, tasks, in_channels

    def first(self):
        """`[T, B, ...]`."""
        if not self.in_channels:
            return self.value
        *rest, channels = _shape(self.value)
        value = tf.reshape(self.value, [*rest, self.tasks, channels // self.tasks])
        rank = len(rest) + 2
        return tf.transpose(value, [rank - 2, *range(rank - 2), rank - 1])

    def channels(self):
        """`[B, ..., T*C]`."""
        if self.in_channels:
            return self.value
        tasks, *rest, channels = _shape(self.value)
        rank = len(rest) + 2
        value = tf.transpose(self.value, [*range(1, rank - 1), 0, rank - 1])
        return tf.reshape(value, [*rest, tasks * channels])


def _weight_penalties(model, state):
    """The per-task sum `[T]` of the weight regularizers' losses (`None` without any)."""
    penalties = [
        tf.vectorized_map(v.regularizer, state[v])
        for v in model.trainable_variables if v.regularizer is not None
    ]
    return tf.add_n(penalties) if penalties else None


def _run_model(model, x, state, training):
    """The model's output `[T, B, ...]` for the tasks' inputs `x` (`[T, B, ...]`)."""
    acts = _run_graph(model, _Acts(x, x.shape[0], False), state, training)
    return acts.first()


def _run_graph(model, acts, state, training):
    if type(model) is keras.Sequential:
        for layer in model.layers:
            acts = _run_layer(layer, acts, state, training)
        return acts

    def call(layer, inputs, **kwargs):
        # As in Functional.call: the call's training mode overrides the one
        # the graph recorded; `why_not_batched` made sure the rest are None.
        mode = kwargs.get("training") if training is None else training
        return _run_layer(layer, inputs, state, mode)

    return model._run_through_graph(acts, operation_fn=lambda op: op, call_fn=call)


def _run_layer(layer, acts, state, training):
    if type(layer) in (keras.Sequential, Functional):
        return _run_graph(layer, acts, state, training)

    def convert(a):
        value = layer.dtype_policy.convert_input(a.value, layer.autocast, layer.input_dtype)
        return _Acts(value, a.tasks, a.in_channels)

    is_list = isinstance(acts, (list, tuple))
    acts = [convert(a) for a in acts] if is_list else convert(acts)
    return _HANDLERS[type(layer)](layer, acts, state, training)


def _shape(x):
    """`x`'s shape, static where known (Keras layers read static shapes)."""
    static, dynamic = x.shape.as_list(), tf.shape(x)
    return [d if d is not None else dynamic[i] for i, d in enumerate(static)]


def _per_task(value, rank, axis=-1):
    """`[T, C]` reshaped to broadcast against a `[T, ...]` tensor of `rank` along `axis`."""
    shape = [1] * rank
    shape[0], shape[axis] = -1, value.shape[-1]
    return tf.reshape(value, shape)


_ELEMENTWISE = tuple(
    getattr(keras.activations, name) for name in (
        "relu", "leaky_relu", "relu6", "elu", "selu", "softplus", "softsign", "silu",
        "gelu", "celu", "tanh", "sigmoid", "exponential", "hard_sigmoid", "log_sigmoid",
        "hard_silu", "linear", "mish",
    )
)


def _finish(layer, acts, state):
    """`acts` plus the layer's per-task bias (if any), through its activation."""
    bias = getattr(layer, "bias", None) if getattr(layer, "use_bias", True) else None
    if bias is not None:
        bias = state[bias]
        if acts.in_channels:
            # BiasAdd, not a broadcast add: its gradient is one fast kernel
            # (and oneDNN fuses it into the convolution's).
            acts = _Acts(tf.nn.bias_add(acts.value, tf.reshape(bias, [-1])), acts.tasks, True)
        else:
            acts = _Acts(acts.value + _per_task(bias, acts.value.shape.rank), acts.tasks, False)
    if layer.activation in _ELEMENTWISE:
        return _Acts(layer.activation(acts.value), acts.tasks, acts.in_channels)
    # An activation along the channels (softmax, ...) must see one task's.
    return _Acts(layer.activation(acts.first()), acts.tasks, False)


def _dense(layer, acts, state, training):
    del training
    x = acts.first()
    shape = _shape(x)
    kernel = state[layer.kernel]
    y = tf.matmul(tf.reshape(x, [shape[0], -1, shape[-1]]), kernel)
    y = tf.reshape(y, [*shape[:-1], kernel.shape[-1]])
    return _finish(layer, _Acts(y, acts.tasks, False), state)


def _conv2d(layer, acts, state, training):
    kernel = state[layer.kernel]  # [T, kh, kw, C / groups, F]
    conv = state.conv
    if conv == "auto":
        conv = "grouped" if _grouped_conv_works(layer, acts, kernel, state.xla) else "map"
    if conv == "map":
        return _per_task_calls(layer, acts, state, training)
    # Task t's filters see its channels t*C .. (t+1)*C - 1 and give its
    # outputs t*F .. (t+1)*F - 1: groups * T groups in all.
    folded = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [*kernel.shape[1:4], -1])
    y = tf.nn.convolution(
        acts.channels(), folded, strides=layer.strides,
        padding=layer.padding.upper(), dilations=layer.dilation_rate,
    )
    return _finish(layer, _Acts(y, acts.tasks, True), state)


def _depthwise_conv2d(layer, acts, state, training):
    del training
    kernel = state[layer.kernel]  # [T, kh, kw, C, M]
    # A depthwise convolution of the T*C channels is each task's own.
    folded = tf.reshape(
        tf.transpose(kernel, [1, 2, 0, 3, 4]), [*kernel.shape[1:3], -1, kernel.shape[-1]]
    )
    y = keras.ops.depthwise_conv(
        acts.channels(), folded, strides=layer.strides, padding=layer.padding,
        data_format="channels_last", dilation_rate=layer.dilation_rate,
    )
    return _finish(layer, _Acts(y, acts.tasks, True), state)


def _batch_norm(layer, acts, state, training):
    # As keras.layers.BatchNormalization.call, per task.
    if acts.in_channels and layer.axis % acts.value.shape.rank != acts.value.shape.rank - 1:
        acts = _Acts(acts.first(), acts.tasks, False)  # normalizing another axis
    rank = acts.value.shape.rank
    x = acts.value
    x = tf.cast(x, keras.backend.result_type(x.dtype.name, "float32"))
    if acts.in_channels:
        # Per-task statistics are the per-channel ones of [B, ..., T*C].
        axis, axes = rank - 1, list(range(rank - 1))

        def shaped(value):
            return tf.reshape(value, [-1])
    else:
        axis = layer.axis % (rank - 1) + 1
        axes = [a for a in range(1, rank) if a != axis]

        def shaped(value):
            return _per_task(value, rank, axis)

    def value(variable):
        return shaped(tf.cast(state[variable], x.dtype))

    gamma = value(layer.gamma) if layer.scale else None
    beta = value(layer.beta) if layer.center else None
    training = training and layer.trainable
    if training and _fusable(acts, x):
        return _fused_batch_norm(layer, acts, x, gamma, beta, state)
    if training:
        mean, variance = tf.nn.moments(x, axes)
        _update_moving(layer, state, acts.tasks, mean, variance, x.dtype)
        mean = shaped(tf.reshape(mean, [acts.tasks, -1]))
        variance = shaped(tf.reshape(variance, [acts.tasks, -1]))
    else:
        mean, variance = value(layer.moving_mean), value(layer.moving_variance)
    y = tf.nn.batch_normalization(x, mean, variance, beta, gamma, layer.epsilon)
    return _Acts(tf.cast(y, layer.compute_dtype), acts.tasks, acts.in_channels)


def _fusable(acts, x):
    """Whether `x` (tasks in the channels) can take one FusedBatchNormV3:
    float32, NHWC, more than one value per channel (statically)."""
    count = np.prod(x.shape[:-1]) if x.shape[:-1].is_fully_defined() else 0
    return acts.in_channels and x.shape.rank == 4 and x.dtype == tf.float32 and count > 1


def _update_moving(layer, state, tasks, mean, variance, dtype):
    """BatchNormalization's moving statistics, per task, from `[T*C]` batch moments."""
    for variable, batch in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
        moving = tf.cast(state[variable], dtype)
        batch = tf.reshape(batch, [tasks, -1])
        state[variable] = tf.cast(
            moving * layer.momentum + batch * (1.0 - layer.momentum), variable.dtype
        )


def _fused_batch_norm(layer, acts, x, gamma, beta, state):
    """Training-mode BatchNorm of tasks in the channels as one fused op.

    One FusedBatchNormV3 (forward and gradient) instead of Keras' moments
    and batch_normalization: the same function of x (equal to round-off),
    several times cheaper on T*C channels. Its batch variance has Bessel's
    correction; Keras updates the moving variance with the plain one.
    """
    channels = x.shape[-1]
    gamma = tf.ones([channels], x.dtype) if gamma is None else gamma
    beta = tf.zeros([channels], x.dtype) if beta is None else beta
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, epsilon=layer.epsilon, is_training=True, exponential_avg_factor=1.0
    )
    count = float(np.prod(x.shape[:-1]))
    _update_moving(layer, state, acts.tasks, mean, variance * ((count - 1.0) / count), x.dtype)
    return _Acts(tf.cast(y, layer.compute_dtype), acts.tasks, True)


def _folded(layer, acts, state, training):
    """A weightless per-example layer on the T * B examples as one batch."""
    del state, training
    many = isinstance(acts, (list, tuple))
    acts = list(acts) if many else [acts]
    tasks = acts[0].tasks
    x = [a.first() for a in acts]
    batch = _shape(x[0])[1]
    x = [tf.reshape(t, [-1, *_shape(t)[2:]]) for t in x]
    y = layer.call(x if many else x[0])
    return _Acts(tf.reshape(y, [tasks, batch, *_shape(y)[1:]]), tasks, False)


def _per_channel(layer, acts, state, training):
    """A weightless layer acting on each channel of each example alone: in either layout."""
    many = isinstance(acts, (list, tuple))
    layouts = {a.in_channels for a in acts} if many else {acts.in_channels}
    shapes = {tuple(a.value.shape) for a in acts} if many else set()
    elementwise = not isinstance(layer, L.Activation) or layer.activation in _ELEMENTWISE
    if layouts != {True} or len(shapes) > 1 or not elementwise:
        return _folded(layer, acts, state, training)
    tasks = acts[0].tasks if many else acts.tasks
    if type(layer) is L.MaxPooling2D:
        return _Acts(_max_pool_2d(layer, acts.value), tasks, True)
    y = layer.call([a.value for a in acts] if many else acts.value)
    return _Acts(y, tasks, True)


def _max_pool_2d(layer, x):
    """`layer.call(x)` (channels last), its gradient in a function of its own.

    oneDNN's MaxPoolGrad needs the forward MaxPool's output as its direct
    input; inside a `tf.while_loop` TensorFlow's oneDNN rewrite often misses
    that edge and falls back to the stock MaxPoolGrad, several times slower
    on T*C channels. A function that is not inlined recomputes the pool
    next to its gradient, where the rewrite always sees the pair. Same
    values: both kernels route each window's gradient to its first maximum.
    """
    pool, strides = list(layer.pool_size), list(layer.strides)
    padding = layer.padding.upper()

    @tf.function(autograph=False, experimental_attributes={"_noinline": True})
    def pool_grad(x, dy):
        y = tf.nn.max_pool2d(x, pool, strides, padding)
        return tf.raw_ops.MaxPoolGrad(
            orig_input=x, orig_output=y, grad=dy, ksize=[1, *pool, 1],
            strides=[1, *strides, 1], padding=padding,
        )

    @tf.custom_gradient
    def max_pool(x):
        return tf.nn.max_pool2d(x, pool, strides, padding), lambda dy: pool_grad(x, dy)

    return max_pool(x)


def _per_task_calls(layer, acts, state, training):
    """The layer's own call once per task (`tf.map_fn`), on that task's weights and state."""
    x = acts.first()
    variables = list(layer.trainable_variables) + list(layer.non_trainable_variables)
    kept = list(layer.non_trainable_variables)
    kwargs = {"training": training} if layer._call_has_training_arg else {}

    def one(args):
        x_t, values = args
        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            y = layer.call(x_t, **kwargs)
        return y, [scope.get_current_value(v) for v in kept]

    signature = (
        tf.TensorSpec(layer.compute_output_shape(tuple(x.shape[1:])), layer.compute_dtype),
        [tf.TensorSpec(v.shape, v.dtype) for v in kept],
    )
    y, values = tf.map_fn(
        one, (x, [state[v] for v in variables]), fn_output_signature=signature,
        parallel_iterations=acts.tasks,
    )
    for variable, value in zip(kept, values):
        state[variable] = value
    return _Acts(y, acts.tasks, False)


_KERNEL_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.NotFoundError)


def _conv_and_grads(x, kernel, dy, strides, padding, dilations, groups):
    """`[y, dx, dkernel]` of `y = conv(x, kernel)` and `sum(y * dy)`, for
    `groups` groups as one convolution each (`groups=1`: one grouped op when
    `kernel` has fewer input channels than `x`)."""
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        parts = zip(tf.split(x, groups, axis=-1), tf.split(kernel, groups, axis=-1))
        y = tf.concat(
            [tf.nn.convolution(a, k, strides, padding, dilations=dilations) for a, k in parts],
            axis=-1,
        )
        total = tf.reduce_sum(y * dy)
    return [y, *tape.gradient(total, [x, kernel])]


@functools.lru_cache(maxsize=None)
def _grouped_conv_probe(config, dtype, device, xla=False):
    """Why `device` cannot run this grouped convolution for T tasks (None: it can).

    TensorFlow's CPU kernels have grouped convolutions only with oneDNN, and
    oneDNN only in float32/bfloat16; without it the gradient kernels raise
    or, in a graph, may return garbage. So the probe compares, in a graph, one
    grouped op with one op per group on the layer's shapes (batch 1), twice:
    on finite values, and with the last group's input and output gradient
    NaN, as a diverged task's are. Then the other groups must come out as
    before: XLA's CPU kernels (`xla=True`: the grouped op compiled with
    XLA, as in a `jit_compile` inner loop) fill every group's filter
    gradient with NaN, so one diverged task would take every task of its
    batch down with it. `config` = (input `[H, W, C]`, kernel
    `[kh, kw, C / G, F]`, strides, padding, dilations, groups G). The reason
    completes "its grouped convolution ...".
    """
    shape, kernel_shape, strides, padding, dilations, groups = config
    rng = np.random.default_rng(0)
    x, kernel = rng.standard_normal([1, *shape]), rng.standard_normal(kernel_shape)
    grouped = functools.partial(
        _conv_and_grads, strides=strides, padding=padding, dilations=dilations, groups=1
    )
    if xla:
        grouped = tf.function(grouped, jit_compile=True, autograph=False)
    # A graph of its own: the probe runs while the caller is being traced,
    # with its tape recording (which tf.init_scope would switch off here).
    with tf.Graph().as_default() as graph, tf.device(device or None):
        inputs = [tf.compat.v1.placeholder(dtype, v.shape) for v in (x, kernel)]
        out_shape = _conv_and_grads(*inputs, 1.0, strides, padding, dilations, groups)[0].shape
        dy = tf.compat.v1.placeholder(dtype, out_shape)
        expected = _conv_and_grads(*inputs, dy, strides, padding, dilations, groups)
        got = grouped(*inputs, dy)
    dy_value = rng.standard_normal(out_shape)
    # The last group diverged: NaN in its input channels and its outputs' gradient.
    x_nan, dy_nan = x.copy(), dy_value.copy()
    x_nan[..., -(shape[-1] // groups):] = np.nan
    dy_nan[..., -(kernel_shape[-1] // groups):] = np.nan
    with tf.compat.v1.Session(graph=graph) as session:
        runs = []
        for values in ((x, dy_value), (x_nan, dy_nan)):
            feed = dict(zip([*inputs, dy], [values[0], kernel, values[1]]))
            expected_values = session.run(expected, feed)
            try:
                runs.append((session.run(got, feed), expected_values))
            except _KERNEL_ERRORS as error:
                return f"raises {type(error).__name__} in {dtype}"
    tolerance = 1e-3 if dtype in ("float16", "bfloat16") else 1e-4

    def same(got, expected):
        return all(
            g.shape == e.shape and np.allclose(g, e, rtol=tolerance, atol=tolerance * np.abs(e).max())
            for g, e in zip(got, expected)
        )

    def healthy(values):
        # y, dx and dkernel hold the groups one after another along their
        # last axis (outputs, inputs, outputs): all but the last group's.
        return [v[..., : v.shape[-1] // groups * (groups - 1)] for v in values]

    (clean, clean_expected), (nan, nan_expected) = runs
    if not same(clean, clean_expected):
        return f"gives wrong values in {dtype}"
    # One group (a shard of one task) has no other group to keep clean.
    if groups > 1 and not same(healthy(nan), healthy(nan_expected)):
        return "lets one task's NaN into the other tasks' gradients"
    return None


def _grouped_conv_works(layer, acts, kernel, xla=False):
    """Whether the T tasks' convolution runs as one grouped op here (cached);
    where not, one warning per reason says so and why.

    The probe has the layer's per-group shapes but at most 2 groups: whether
    the device's kernels compute grouped convolutions does not depend on how
    many groups there are, and a probe of T groups would make the trace's
    cost grow with T (one convolution per group).
    """
    tasks, *per_task = kernel.shape
    groups = tasks * layer.groups
    probed = min(groups, 2)
    channels = acts.value.shape[-1] if acts.in_channels else tasks * acts.value.shape[-1]
    height, width = acts.value.shape[-3:-1]
    config = (
        (height, width, channels // groups * probed),
        (*per_task[:3], tasks * per_task[3] // groups * probed), tuple(layer.strides),
        layer.padding.upper(), tuple(layer.dilation_rate), probed,
    )
    device = acts.value.device or "this device"
    kernels = "XLA's" if xla else "TensorFlow's"
    reason = _grouped_conv_probe(config, acts.value.dtype.name, acts.value.device, xla)
    if reason and (device, kernels, reason) not in _MAP_LOWERING_WARNED:
        _MAP_LOWERING_WARNED.add((device, kernels, reason))
        logging.getLogger("tfmeta").warning(
            "The batched tasks run Conv2D %r as a tf.map_fn over the tasks, not as one grouped "
            "convolution: %s grouped convolution on %s %s. Right, but slower; other Conv2D "
            "layers here do the same without another warning.", layer.name, kernels, device, reason,
        )
    return reason is None


_MAP_LOWERING_WARNED = set()  # (device, kernels, reason) already said


_HANDLERS = {
    L.InputLayer: lambda layer, acts, state, training: acts,
    L.Dense: _dense,
    L.Conv2D: _conv2d,
    L.DepthwiseConv2D: _depthwise_conv2d,
    L.BatchNormalization: _batch_norm,
    **{kind: _folded for kind in _FOLDED},
    **{kind: _per_channel for kind in _PER_CHANNEL},
    **{kind: _per_task_calls for kind in _RANDOM},
}
