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
also `MultiTaskModel`'s; `execution_size`, the largest execution that does).

Example (what `MetaModel` does)::

    first = first_task(num_tasks)                     # this replica's task 0
    loss = task_loss(loss_fn, y, y_pred)              # not divided by R
    sums = all_reduce_sum(strategy, [(count, var), ...])
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import keras
import tensorflow as tf

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
    "execution_size",
    "finite_sum",
    "fit_arguments",
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


def fit_arguments(model, *args, **kwargs):
    """The arguments of the call `model.fit(*args, **kwargs)` by name, as `keras.Model.fit` binds them.

    Positional arguments get their names (x, y, batch_size, epochs, ...);
    arguments left out are absent. A name `fit` does not take is Python's
    TypeError, as in `keras.Model.fit`.

    Example::

        fit_arguments(meta, stream, None, None, 3)
        # {'x': stream, 'y': None, 'batch_size': None, 'epochs': 3}
    """
    bound = _FIT_SIGNATURE.bind(model, *args, **kwargs)
    return {name: value for name, value in bound.arguments.items() if name != "self"}


def _keras_fit_signature():
    """The signature of the `fit` Keras defines, skipping wrappers set on `keras.Model`.

    A callback library or a test spy may replace `keras.Model.fit` by a
    `(*args, **kwargs)` function, possibly before this module is first
    imported (`tfmeta` imports it lazily), so the signature is taken from
    the first class of `keras.Model`'s MRO whose `fit` Keras itself wrote.
    """
    for klass in keras.Model.__mro__:
        fit = vars(klass).get("fit")
        if fit is not None and getattr(inspect.unwrap(fit), "__module__", "").startswith("keras."):
            return inspect.signature(fit)
    return inspect.signature(keras.Model.fit)


_FIT_SIGNATURE = _keras_fit_signature()


def _stream_length(x, batch_size=None, steps_per_epoch=None):
    """Task batches per pass over `x`, `tf.data.INFINITE_CARDINALITY` or `tf.data.UNKNOWN_CARDINALITY`.

    Counted as Keras' data adapters count (a distributed dataset's
    `cardinality` is a number, as `TFDatasetAdapter` reads it). A stream
    that is neither a dataset nor arrays (a generator, ...) has an unknown
    length.
    """
    if isinstance(x, tf.data.Dataset):
        return int(x.cardinality())
    if isinstance(x, tf.distribute.DistributedDataset):
        return int(x.cardinality)
    leaves = tf.nest.flatten(x) if x is not None else []
    shape = getattr(leaves[0], "shape", None) if leaves else None
    if shape is None or len(shape) == 0 or shape[0] is None:
        return int(tf.data.UNKNOWN_CARDINALITY)
    examples = int(shape[0])
    if not batch_size:
        # Keras' ArrayDataAdapter: split into `steps_per_epoch` batches, else 32 a batch.
        batch_size = math.ceil(examples / steps_per_epoch) if steps_per_epoch else 32
    return math.ceil(examples / batch_size)


def batches_per_pass(x, batch_size=None, steps_per_epoch=None):
    """How many task batches one pass over `x` gives, counted as Keras' data adapters do.

    None when the stream is infinite or its length unknown (a repeated or
    filtered `tf.data.Dataset`, a generator).

    Example::

        batches_per_pass(dataset.take(10))                           # 10
        batches_per_pass(np.zeros((100, 5, 2, 3, 4)), batch_size=8)  # 13
    """
    size = _stream_length(x, batch_size, steps_per_epoch)
    return size if size >= 0 else None


#: What the train steps past the epoch are, in a MetaModel.
META_OVERRUN = "more inner steps, and maybe meta-updates, than asked"


def execution_size(steps, steps_per_execution):
    """The largest number of train steps per execution, at most `steps_per_execution`, that divides `steps`.

    Keras runs whole executions, so a fit of `steps` train steps per epoch
    needs an execution size that divides them (`check_whole_executions`
    refuses another, and suggests this one); the largest one makes the
    fewest calls. `steps` must be >= 1 (ValueError).

    Example::

        execution_size(12, 5)   # 4: three executions of 4
        execution_size(9, 10)   # 9: one execution
        execution_size(7, 3)    # 1: 7 is prime
    """
    if steps < 1:
        raise ValueError(
            f"execution_size(steps={steps}): an epoch of train steps needs steps >= 1."
        )
    per_call = max(1, int(steps_per_execution or 1))
    return next(size for size in range(min(per_call, steps), 0, -1) if steps % size == 0)


def check_whole_executions(steps_per_epoch, steps_per_execution, batches=None,
                           overrun=META_OVERRUN):
    """Refuse a `steps_per_epoch` that Keras would round up to whole executions.

    Keras' `fit` runs ceil(steps_per_epoch / steps_per_execution) executions
    of `steps_per_execution` train steps each, stopping early only where the
    data ends: with a stream longer than the epoch, the last execution runs
    past `steps_per_epoch` (to the rounded-up count, or the stream's end if
    that comes first), and every extra train step is a chunk of inner steps,
    and meta-updates, nobody asked for. `batches` is the stream's task
    batches per pass (`batches_per_pass`): a stream of at most
    `steps_per_epoch` of them ends first, so it passes. None or
    `tf.data.INFINITE_CARDINALITY`: the stream never ends.
    `tf.data.UNKNOWN_CARDINALITY` (after `filter`, `flat_map`,
    `from_generator`, ...): it may end within the epoch or not, so it is
    refused with the length as a third fix
    (`ds.apply(tf.data.experimental.assert_cardinality(n))`). Without
    `steps_per_epoch` Keras runs exactly the stream's batches: nothing to
    check. `keras.config.max_steps_per_epoch()` caps the epoch as Keras
    does. `overrun` says in the error what the extra train steps are.

    Example::

        check_whole_executions(12, 4)               # fine: 3 executions of 4
        check_whole_executions(10, 4, batches=10)   # fine: the stream ends at step 10
        check_whole_executions(10, 4)               # ConfigError: fit would run 12 train steps per epoch
        check_whole_executions(10, 4, batches=11)   # ConfigError: fit would run 11 train steps per epoch
    """
    cap = keras.config.max_steps_per_epoch()
    if cap and (not steps_per_epoch or cap < steps_per_epoch):
        steps_per_epoch = cap
    per_call = int(steps_per_execution or 1)
    if not steps_per_epoch or steps_per_epoch % per_call == 0:
        return
    known = batches is not None and batches >= 0
    if known and batches <= steps_per_epoch:
        return
    whole = math.ceil(steps_per_epoch / per_call) * per_call
    lower = whole - per_call
    multiples = f"{whole}" if lower == 0 else f"{lower} or {whole}"
    fixes = (
        f"steps_per_epoch a multiple of {per_call} (e.g. {multiples}), or compile with "
        f"steps_per_execution dividing {steps_per_epoch} "
        f"(e.g. {execution_size(steps_per_epoch, per_call)})"
    )
    if batches == tf.data.UNKNOWN_CARDINALITY:
        raise ConfigError(
            f"steps_per_epoch={steps_per_epoch} is not a multiple of steps_per_execution="
            f"{per_call} and the stream's length is unknown (e.g. after filter, flat_map or "
            f"from_generator): Keras runs whole executions of {per_call} train steps, so on a "
            f"stream longer than the epoch fit would run up to {whole} train steps (task "
            f"batches) per epoch instead of {steps_per_epoch}: {overrun}. If the stream ends "
            f"within the epoch, give it its length (n <= {steps_per_epoch} task batches: "
            f"ds.apply(tf.data.experimental.assert_cardinality(n))); otherwise choose {fixes}."
        )
    runs = min(whole, batches) if known else whole
    raise ConfigError(
        f"steps_per_epoch={steps_per_epoch} is not a multiple of steps_per_execution="
        f"{per_call}: Keras runs whole executions of {per_call} train steps, so fit would run "
        f"{runs} train steps (task batches) per epoch instead of {steps_per_epoch}: {overrun}. "
        f"Choose {fixes}."
    )


def check_fit_executions(model, arguments, overrun=META_OVERRUN):
    """`check_whole_executions` for `model.fit(**arguments)`, before any train step.

    `arguments` are the call's, by name (`fit_arguments`), so positional ones count too.

    Example::

        check_fit_executions(meta, fit_arguments(meta, stream, steps_per_epoch=10))  # ConfigError under spe=4
    """
    steps = arguments.get("steps_per_epoch")
    check_whole_executions(
        steps,
        getattr(model, "steps_per_execution", 1),
        _stream_length(arguments.get("x"), arguments.get("batch_size"), steps),
        overrun,
    )


@functools.cache
def _known_length_adapter():
    """The class `_KnownLength`, made on first use: it extends a Keras-internal class.

    A Keras without it fails here, in `fit` under a strategy, not at `import tfmeta`.
    """
    try:
        from keras.src.trainers.data_adapters.tf_dataset_adapter import TFDatasetAdapter
    except ImportError as error:
        raise ConfigError(
            f"MetaModel.fit under a strategy hands Keras a finite task stream with its length "
            f"through keras.src.trainers.data_adapters.tf_dataset_adapter.TFDatasetAdapter "
            f"(tfmeta is tested with Keras 3.15), which Keras {keras.__version__} lacks "
            f"({error}): install Keras 3.15 (pip install 'keras==3.15.*'), or fit an endless "
            "stream (ds.repeat()), which needs no length."
        ) from error

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

            fit(_known_length_adapter()(distribute_task_batches(dataset, strategy), 4), epochs=3)
        """

        def __init__(self, dataset, batches):
            super().__init__(dataset)
            self._batches = batches

        @property
        def num_batches(self):
            return self._batches

    return _KnownLength


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
                    x = _known_length_adapter()(x, size)
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
