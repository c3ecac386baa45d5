"""How a `MetaModel` train step runs on each of R synchronized replicas.

The T tasks of every task batch are split along the task axis, T / R per
replica (`tfmeta.distribute.distribute_task_batches`). Each replica keeps the
state of its own tasks in per-replica variables (`local_variable`) and runs
their inner loops without communication, its task t being global task
`first_task(...) + t`. At a meta-update each replica contributes the sums of
its finite tasks' meta-gradients and float state (`finite_sum`), and
`all_reduce_sum` adds them over the replicas. With one replica (no strategy)
the same code runs and every function here is the identity on one copy.

What Keras does for ordinary models and a MetaModel must undo lives here too:
the division of mean losses by R (`task_loss`: a task's inner loss is not a
shard of a global batch), the build on the replicas' averaged first batch
(`SplitTaskBatches._maybe_symbolic_build`), the reduction of scalar logs
across workers (`worker_logs`), the length of a distributed finite stream
(`SplitTaskBatches.fit`), and the check that Keras' whole executions of
`steps_per_execution` train steps end with the epoch (`check_fit_executions`,
also `MultiTaskModel`'s).

Example (what `MetaModel` does)::

    first = first_task(num_tasks)                     # this replica's task 0
    loss = task_loss(loss_fn, y, y_pred)              # not divided by R
    sums = all_reduce_sum(strategy, [(count, var), ...])
"""

from __future__ import annotations

import contextlib
import math

import keras
import tensorflow as tf
from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter

from tfmeta.distribute import distribute_task_batches
from tfmeta.validation import ConfigError

__all__ = [
    "META_OVERRUN",
    "SplitTaskBatches",
    "all_reduce_sum",
    "batches_per_pass",
    "check_created_in_scope",
    "check_fit_executions",
    "check_whole_executions",
    "finite_sum",
    "first_task",
    "in_strategy",
    "local_variable",
    "task_loss",
    "worker_logs",
]

# Under a strategy with R replicas, Keras divides losses reduced to a mean by
# R (keras.losses.loss.scale_loss_for_distribution, applied to non-scalar
# per-example values): each replica would hold a shard of one global batch.
# A task's inner loss is not a shard.
_SCALED_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def task_loss(loss_fn, y_true, y_pred):
    """`loss_fn(y_true, y_pred)` without Keras' division by the replicas."""
    value = loss_fn(y_true, y_pred)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1 and getattr(loss_fn, "reduction", None) in _SCALED_REDUCTIONS:
        if _per_example(loss_fn, y_true, y_pred):
            value = value * tf.cast(replicas, value.dtype)
    return value


def _per_example(loss_fn, y_true, y_pred):
    """Whether `loss_fn.call` returns non-scalar values (which Keras then scales).

    Found from static shapes in a scratch graph: nothing is computed.
    """
    dtype = getattr(loss_fn, "dtype", None) or "float32"
    try:
        with tf.Graph().as_default():
            values = loss_fn.call(
                tf.compat.v1.placeholder(dtype, y_true.shape),
                tf.compat.v1.placeholder(dtype, y_pred.shape),
            )
        return tuple(values.shape) not in ((), (0,))
    except Exception:  # noqa: BLE001  (an unusual loss: assume Keras' convention)
        return True


def local_variable(owner, name, shape, dtype, initializer, scope=None):
    """A variable of `owner` that each replica keeps its own copy of.

    `synchronization="on_read"`: reads and writes in a replica stay on that
    replica; read outside (checkpoints, `numpy()`) it gives replica 0's
    copy. Without a strategy it is a plain variable. Its path is
    `<owner>/<scope>/<name>`, and `owner` tracks it (so checkpoints hold it).
    """
    inner = keras.name_scope(scope) if scope else contextlib.nullcontext()
    with keras.name_scope(owner.name, caller=owner), inner:
        variable = keras.Variable(
            initializer=initializer,
            shape=shape,
            dtype=dtype,
            trainable=False,
            name=name,
            synchronization="on_read",
            aggregation="only_first_replica",
        )
    owner._track_variable(variable)
    return variable


def check_created_in_scope(model):
    """Refuse a model whose variables were created outside the current strategy's scope."""
    strategy = tf.distribute.get_strategy()
    outside = [
        v.path for v in model.variables
        if not strategy.extended.variable_created_in_scope(getattr(v, "value", v))
    ]
    if outside:
        raise ConfigError(
            f"MetaModel is created under {type(strategy).__name__}, but the wrapped "
            f"model's variables (e.g. {outside[0]}) were created outside its scope: "
            "create the model and the MetaModel inside the same `with strategy.scope():` "
            "(or copy the model there with tfmeta.distribute.in_scope(model, strategy))."
        )


def in_strategy(optimizer, strategy):
    """`optimizer`, or a fresh copy from its config if made outside `strategy`.

    Keras' TensorFlow optimizer keeps the strategy current at its creation
    and creates its variables there; gin builds optimizers before training
    enters the strategy's scope.
    """
    made_in = getattr(optimizer, "_distribution_strategy", strategy)
    if made_in is strategy or optimizer.built:
        return optimizer
    with strategy.scope():
        return type(optimizer).from_config(optimizer.get_config())


def first_task(num_tasks):
    """The global index of this replica's first task (a Python int when static)."""
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    static = tf.get_static_value(replica)
    replica = int(static) if static is not None else tf.cast(replica, tf.int32)
    return replica * num_tasks


def finite_sum(stacked, finite):
    """The sum over the task axis of `stacked`, counting only tasks where `finite`."""
    mask = tf.reshape(finite, [-1] + [1] * (stacked.shape.rank - 1))
    return tf.reduce_sum(tf.where(mask, stacked, tf.zeros_like(stacked)), axis=0)


def all_reduce_sum(strategy, pairs):
    """Sum each value over the replicas, in cross-replica context.

    Args:
        strategy: the current `tf.distribute.Strategy`.
        pairs: `(per-replica value, destination variable)` pairs; the
            destination only places the result.

    Returns:
        The sums, as plain tensors (replica 0's copy of each).
    """
    reduced = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, pairs)
    return [strategy.experimental_local_results(r)[0] for r in reduced]


def worker_logs(logs, strategy):
    """`logs` as Keras can reduce them across the workers of a multi-worker strategy."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and getattr(
        strategy.extended, "_in_multi_worker_mode", lambda: False
    )():
        # Keras 3 reduces logs across workers along axis 0, which scalars
        # lack (tensorflow/tensorflow#72388): give them one.
        return {k: v[None] for k, v in logs.items()}
    return logs


def batches_per_pass(x, batch_size=None, steps_per_epoch=None):
    """How many task batches one pass over `x` gives, counted as Keras' data adapters do.

    None when the stream is infinite or its length unknown (a repeated or
    filtered `tf.data.Dataset`, a generator, a distributed dataset).

    Example::

        batches_per_pass(dataset.take(10))                           # 10
        batches_per_pass(np.zeros((100, 5, 2, 3, 4)), batch_size=8)  # 13
    """
    if isinstance(x, tf.data.Dataset):
        size = int(x.cardinality())
        return size if size >= 0 else None
    leaves = tf.nest.flatten(x) if x is not None else []
    shape = getattr(leaves[0], "shape", None) if leaves else None
    if shape is None or len(shape) == 0 or shape[0] is None:
        return None
    examples = int(shape[0])
    if not batch_size:
        # Keras' ArrayDataAdapter: split into `steps_per_epoch` batches, else 32 a batch.
        batch_size = math.ceil(examples / steps_per_epoch) if steps_per_epoch else 32
    return math.ceil(examples / batch_size)


#: What the train steps past the epoch are, in a MetaModel.
META_OVERRUN = "more inner steps, and maybe meta-updates, than asked"


def check_whole_executions(steps_per_epoch, steps_per_execution, batches=None,
                           overrun=META_OVERRUN):
    """Refuse a `steps_per_epoch` that Keras would round up to whole executions.

    Keras' `fit` runs ceil(steps_per_epoch / steps_per_execution) executions
    of `steps_per_execution` train steps each, stopping early only where the
    data ends: with a stream longer than the epoch, the last execution runs
    past `steps_per_epoch`, and every extra train step is a chunk of inner
    steps, and meta-updates, nobody asked for. `batches` is the stream's
    length (`batches_per_pass`, None: infinite or unknown); a stream of at
    most `steps_per_epoch` batches ends first, so it passes. Without
    `steps_per_epoch` Keras runs exactly the stream's batches: nothing to check.
    `keras.config.max_steps_per_epoch()` caps the epoch as Keras does.
    `overrun` says in the error what the extra train steps are.

    Example::

        check_whole_executions(12, 4)   # fine: 3 executions of 4
        check_whole_executions(10, 4)   # ConfigError: fit would run 12 train steps per epoch
    """
    cap = keras.config.max_steps_per_epoch()
    if cap and (not steps_per_epoch or cap < steps_per_epoch):
        steps_per_epoch = cap
    per_call = int(steps_per_execution or 1)
    if not steps_per_epoch or steps_per_epoch % per_call == 0:
        return
    if batches is not None and batches <= steps_per_epoch:
        return
    runs = math.ceil(steps_per_epoch / per_call) * per_call
    lower, higher = runs - per_call, runs
    multiples = f"{higher}" if lower == 0 else f"{lower} or {higher}"
    raise ConfigError(
        f"steps_per_epoch={steps_per_epoch} is not a multiple of steps_per_execution="
        f"{per_call}: Keras runs whole executions of {per_call} train steps, so fit would run "
        f"{runs} train steps (task batches) per epoch instead of {steps_per_epoch}: {overrun}. "
        f"Choose steps_per_epoch a multiple of "
        f"{per_call} (e.g. {multiples}), or compile with steps_per_execution dividing "
        f"{steps_per_epoch} (e.g. {math.gcd(steps_per_epoch, per_call)})."
    )


def check_fit_executions(model, x, fit_kwargs, overrun=META_OVERRUN):
    """`check_whole_executions` for `model.fit(x, **fit_kwargs)`, before any train step.

    Example::

        check_fit_executions(meta, stream, {"steps_per_epoch": 10})  # ConfigError under spe=4
    """
    steps = fit_kwargs.get("steps_per_epoch")
    check_whole_executions(
        steps,
        getattr(model, "steps_per_execution", 1),
        batches_per_pass(x, fit_kwargs.get("batch_size"), steps),
        overrun,
    )


class _KnownLength(TFDatasetAdapter):
    """A distributed stream of task batches, for `fit`, whose length is `batches` per pass.

    TensorFlow gives a dataset distributed from a function the cardinality of
    its per-worker stream, counted in per-replica elements (unknown here:
    they come from `flat_map`). Keras' `EpochIterator` starts a fresh pass
    each epoch only over a stream of known length; over one of unknown
    length with `steps_per_epoch` it keeps one iterator across epochs, which
    runs out after the first. With the length, Keras runs the distributed
    stream as the undistributed dataset. A Keras data adapter is what
    `fit` takes in place of a dataset to get it.

    Example::

        fit(_KnownLength(distribute_task_batches(dataset, strategy), 4), epochs=3)
    """

    def __init__(self, dataset, batches):
        super().__init__(dataset)
        self._batches = batches

    @property
    def num_batches(self):
        return self._batches


class SplitTaskBatches:
    """`keras.Model` mixin: under a strategy, `fit` splits task batches over the replicas.

    A `tf.data.Dataset` of task batches becomes a distributed one whose
    replica r gets tasks `[r * T / R, (r + 1) * T / R)` of every element
    (T must be a multiple of R), and the model is built on that per-replica
    shape. On several workers, a task distribution's stream is made on each
    worker for that worker's tasks only (`tfmeta.distribute.task_sharded`).
    A finite dataset's epochs are those of no strategy: each is one pass over
    it (`steps_per_epoch` counts as without a strategy). Without a strategy
    nothing changes.
    """

    def fit(self, x=None, *args, **kwargs):
        strategy = self.distribute_strategy
        if self._distribute_strategy is not None or strategy.num_replicas_in_sync > 1:
            if isinstance(x, tf.data.Dataset):
                size = int(x.cardinality())
                replicas = strategy.num_replicas_in_sync
                spec = x.element_spec
                x = distribute_task_batches(x, strategy)  # checks T % R
                if size >= 0:
                    x = _KnownLength(x, size)
                self._replica_spec = tf.nest.map_structure(
                    lambda s: tf.TensorSpec((s.shape[0] // replicas, *s.shape[1:]), s.dtype),
                    spec,
                )
            elif not isinstance(x, tf.distribute.DistributedDataset):
                raise ConfigError(
                    f"Under {type(strategy).__name__} MetaModel.fit needs task batches as "
                    "a tf.data.Dataset (e.g. a task distribution's as_dataset), got "
                    f"{type(x).__name__}: wrap arrays with tf.data.Dataset.from_tensor_slices."
                )
        return super().fit(x, *args, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy Keras builds on the first batch averaged over the
        # replicas (`strategy.reduce`), which fails for (x, y) batches under
        # MultiWorkerMirroredStrategy (TF 2.21: reduce takes one tensor, not
        # a structure). The per-replica spec is all the task state needs.
        spec = getattr(self, "_replica_spec", None)
        if self._distribute_strategy is not None and data_batch is None and spec is not None:
            with self.distribute_strategy.scope():
                self._symbolic_build(data_batch=spec)
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
