"""Scale meta-training out: replicas on one machine, workers on several.

`MetaModel` runs under any `tf.distribute` strategy whose replicas are
synchronous: `MirroredStrategy` (the GPUs of one machine) and
`MultiWorkerMirroredStrategy` (several machines, configured by `TF_CONFIG`).
The T tasks of every task batch are split along the task axis, T / R per
replica (R = `strategy.num_replicas_in_sync`); each replica runs its tasks'
inner loops on its own, and a meta-update all-reduces the mean meta-gradient
and BatchNorm statistics. One meta-step therefore gives the same phi with
R replicas as with one (tests/test_distribute.py checks it to 1e-5).
On several workers, a task distribution's stream makes on each worker only
that worker's tasks (`task_sharded`, `worker_task_batches`): input work per
worker is T / workers.

    strategy = tfmeta.distribute.get_strategy("mirrored")
    with strategy.scope():
        model = build_model()               # phi: created under the scope
        meta = tfmeta.MetaModel(model)
        meta.compile(...)
    meta.fit(task_batches, ...)             # T must be a multiple of R

With gin (tools/train.py): `train.strategy = "mirrored"` (or
`"multi_worker"`, `"default"`). See docs/performance.md for what to expect
and the multi-worker commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

import tensorflow as tf

from tfmeta.input_options import without_autotuning

__all__ = [
    "STRATEGIES",
    "check_jit_compile",
    "check_steps_per_execution",
    "cross_device_ops",
    "distribute_task_batches",
    "get_strategy",
    "in_scope",
    "inner_loop_xla",
    "is_chief",
    "local_tf_configs",
    "replica_devices",
    "task_sharded",
    "use_logical_cpus",
    "uses_collectives",
    "worker_count",
    "worker_index",
    "worker_task_batches",
]

STRATEGIES = ("default", "mirrored", "multi_worker")

# One strategy object per kind and process: MultiWorkerMirroredStrategy can be
# created only once per process, before TensorFlow runs anything else.
_CREATED = {}


def get_strategy(strategy="default", devices=None):
    """A `tf.distribute.Strategy` from its gin name (or the strategy itself).

    Args:
        strategy: `"default"` (no distribution: the current strategy, i.e. one
            replica), `"mirrored"` (`MirroredStrategy` over `devices`, default
            all local GPUs, else the CPU), `"multi_worker"`
            (`MultiWorkerMirroredStrategy`, cluster from `TF_CONFIG`), or a
            `tf.distribute.Strategy`, returned as is.
        devices: devices of the mirrored strategy. Its all-reduce fits them
            (`cross_device_ops`): NCCL over GPUs, `ReductionToOneDevice` on CPUs.

    The same name gives the same object within a process. Create a
    `"multi_worker"` strategy before anything else runs TensorFlow ops
    (`tools/train.py` does so before building the model).
    """
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy in (None, "default"):
        return tf.distribute.get_strategy()
    if strategy not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {strategy!r}: choose one of {STRATEGIES} "
            "(train.strategy in gin)."
        )
    key = (strategy, tuple(devices) if devices else None)
    if key in _CREATED:
        return _CREATED[key]
    if strategy == "mirrored":
        # Not TensorFlow's default collective all-reduce: inside Keras'
        # steps_per_execution loop its deferred instance keys are never fed
        # (see `uses_collectives`). NCCL on GPUs, one device's sum elsewhere.
        created = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=cross_device_ops(list(devices or _local_devices()))
        )
    else:
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "strategy='multi_worker' needs the cluster in TF_CONFIG: set e.g. "
                'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}\' on every worker '
                "(docs/performance.md)."
            )
        try:
            created = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:
            raise RuntimeError(
                f"Could not create MultiWorkerMirroredStrategy ({error}). Create it at "
                "program start, before any TensorFlow op or model is built: "
                "tfmeta.distribute.get_strategy('multi_worker') first."
            ) from error
    _CREATED[key] = created
    return created


def _cluster():
    """`(task_type, task_index, cluster dict)` from `TF_CONFIG` (or Nones)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    return task.get("type"), task.get("index"), config.get("cluster", {})


def worker_index(strategy=None):
    """This process's task index in the cluster (0 without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.task_type:
        return int(resolver.task_id or 0)
    _, index, _ = _cluster()
    return int(index or 0)


def worker_count(strategy=None):
    """How many workers (processes) train together: 1 without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.task_type:
        cluster = resolver.cluster_spec().as_dict()
    else:
        cluster = _cluster()[2]
    return max(1, sum(len(cluster.get(job, [])) for job in ("chief", "worker")))


def is_chief(strategy=None):
    """Whether this process writes checkpoints, exports and logs.

    The chief is the `"chief"` task, or worker 0 when the cluster has no chief
    (TensorFlow's convention); without a cluster every process is its own chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.task_type:
        task_type, index = resolver.task_type, resolver.task_id
        cluster = resolver.cluster_spec().as_dict()
    else:
        task_type, index, cluster = _cluster()
    if not task_type:
        return True
    if task_type == "chief":
        return True
    return task_type == "worker" and int(index or 0) == 0 and "chief" not in cluster


def check_jit_compile(jit_compile, strategy=None):
    """Refuse a `jit_compile` other than `True`, `False` or `"auto"` (one line: what to pass).

    Any number of replicas works: `MetaModel` compiles each replica's inner
    loop on the replica's device (`inner_loop_xla`). `strategy` is accepted
    for callers that check a run's settings before compiling.
    """
    del strategy  # every strategy takes every setting
    if isinstance(jit_compile, str) and jit_compile == "auto":
        return
    if not isinstance(jit_compile, bool):
        raise ValueError(
            f"jit_compile={jit_compile!r} is not a jit_compile setting: pass True (XLA on the "
            "inner loop of every replica), False (no XLA) or 'auto' (XLA on GPU replicas only)."
        )


def replica_devices(strategy=None):
    """The devices of `strategy`'s replicas on this worker (the current strategy's by default).

    Without a strategy: the device TensorFlow places ops on, the first GPU if
    there is one, else the CPU.
    """
    strategy = strategy or tf.distribute.get_strategy()
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list
        return _local_devices()[:1]


def _local_devices():
    """What `MirroredStrategy()` mirrors over by default: every local GPU, else the CPU."""
    return [d.name for d in tf.config.list_logical_devices("GPU")] or ["/cpu:0"]


def _is_gpu(device):
    return tf.DeviceSpec.from_string(device).device_type == "GPU"


def inner_loop_xla(jit_compile, devices, run_eagerly=False):
    """Whether `MetaModel` compiles each replica's inner loop with XLA.

    Args:
        jit_compile: `True` (XLA on any device, CPUs included), `False`, or
            `"auto"`: XLA when every replica is on a GPU; off on CPU, where
            XLA measured 12-20x slower on Leap's convnet (docs/performance.md).
        devices: the replicas' devices (`replica_devices(strategy)`).
        run_eagerly: Keras' `run_eagerly`; it turns XLA off, as in Keras.

    Example:
        >>> inner_loop_xla("auto", ["/gpu:0", "/gpu:1"]), inner_loop_xla("auto", ["/cpu:0"])
        (True, False)
    """
    check_jit_compile(jit_compile)
    if run_eagerly or jit_compile is False:
        return False
    if jit_compile is True:
        return True
    return bool(devices) and all(_is_gpu(d) for d in devices)  # "auto"


def cross_device_ops(devices, nccl=None):
    """The all-reduce `get_strategy("mirrored")` uses over `devices`.

    `NcclAllReduce` when there are several devices, all GPUs, and NCCL is
    usable (`nccl`; default: this TensorFlow build registers its kernel and
    the GPUs are not split into logical ones, which NCCL does not support);
    `ReductionToOneDevice` otherwise (CPUs, mixed devices, one device).
    Neither is TensorFlow's default collective all-reduce, which breaks
    Keras' `steps_per_execution > 1` loop (see `uses_collectives`); NCCL's
    all-reduce does not use collective instance keys.

    Example:
        >>> type(cross_device_ops(["/gpu:0", "/gpu:1"], nccl=True)).__name__
        'NcclAllReduce'
        >>> type(cross_device_ops(["/cpu:0", "/cpu:1"])).__name__
        'ReductionToOneDevice'
    """
    if len(devices) > 1 and all(_is_gpu(d) for d in devices):
        if nccl is None:
            nccl = _nccl_usable()
        if nccl:
            return tf.distribute.NcclAllReduce()
    return tf.distribute.ReductionToOneDevice()


def _nccl_usable():
    """Whether this TensorFlow build has NCCL's kernel and the GPUs are whole (not logical)."""
    from tensorflow.python.framework import kernels  # no public API lists kernels

    whole = len(tf.config.list_logical_devices("GPU")) == len(tf.config.list_physical_devices("GPU"))
    return whole and bool(kernels.get_registered_kernels_for_op("NcclAllReduce").kernel)


def uses_collectives(strategy):
    """Whether `strategy` all-reduces with collective ops across replicas.

    `MultiWorkerMirroredStrategy` always does, and so does
    `MirroredStrategy()` by default in TF 2.21 (GPUs and CPUs). Inside a
    `tf.function` that calls another one, as Keras' `steps_per_execution > 1`
    loop does, their call-time instance keys are never fed: "You must feed a
    value for placeholder tensor 'while/cond/Placeholder'", with any Keras
    model. `get_strategy("mirrored")` uses NCCL or `ReductionToOneDevice`
    instead (`cross_device_ops`).
    """
    if strategy.num_replicas_in_sync < 2:
        return False
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    ops = getattr(strategy.extended, "_cross_device_ops", None)
    return type(ops).__name__ == "CollectiveAllReduce"


def check_steps_per_execution(steps_per_execution, strategy=None):
    """Refuse `steps_per_execution > 1` where TensorFlow's collectives break it."""
    strategy = strategy or tf.distribute.get_strategy()
    if int(steps_per_execution or 1) > 1 and uses_collectives(strategy):
        raise ValueError(
            f"steps_per_execution={steps_per_execution} fails under {type(strategy).__name__} "
            "with collective all-reduce (TensorFlow never feeds their instance keys inside "
            "Keras' multi-step loop): use steps_per_execution=1 and fuse inner steps with a "
            "larger steps_per_chunk, or, on one machine, tfmeta.distribute.get_strategy('mirrored')."
        )


def in_scope(model, strategy):
    """`model`, or a copy with the same weights whose variables live in `strategy`.

    Gin builds the model before `train` enters the strategy's scope; Keras
    needs the variables created under it (mirrored on every replica). The
    copy uses `keras.models.clone_model` (Sequential, functional, and
    subclassed models with `get_config`).
    """
    import keras

    if all(strategy.extended.variable_created_in_scope(v.value) for v in model.variables):
        return model
    with strategy.scope():
        clone = keras.models.clone_model(model)
        if not clone.built:
            clone.build_from_config(model.get_build_config())
        clone.set_weights(model.get_weights())
    return clone


# The attribute of a stream that holds its shard maker (see `task_sharded`).
_SHARD_MAKER = "_tfmeta_task_shard"


def task_sharded(dataset, make_shard):
    """`dataset`, marked as able to make one worker's share of its tasks.

    `make_shard((index, count))` must return the stream of tasks
    `[index * T / count, (index + 1) * T / count)` of every element of
    `dataset`, equal to those tasks' values (task distributions'
    `as_dataset(..., task_shard=...)`). On several workers
    `distribute_task_batches` then gives each worker its shard, so a worker
    reads and augments T / workers tasks, not T. Any transformation of the
    returned dataset drops the mark (it is then split as a whole stream).

    Example::

        stream = task_sharded(full, lambda shard: tasks.as_dataset(..., task_shard=shard))
    """
    # Autotuning off now, as MetaModel.fit would do (tfmeta.input_options):
    # fit then keeps this very object, and with it the shard maker.
    dataset = without_autotuning(dataset)
    setattr(dataset, _SHARD_MAKER, make_shard)
    return dataset


def distribute_task_batches(dataset, strategy):
    """Split every task batch of `dataset` along its task axis over the replicas.

    Replica r (global index, across workers) gets tasks
    `[r * T / R, (r + 1) * T / R)` of every element, whatever the number of
    workers (see `worker_task_batches`). `MetaModel.fit` calls this for you.

    Raises:
        ValueError: when T is unknown or not a multiple of R.
    """
    replicas = strategy.num_replicas_in_sync
    tasks = _tasks(dataset)
    if tasks is None:
        raise ValueError(
            "The number of tasks per task batch must be static to split it over "
            f"{replicas} replicas: got x of shape {_x_spec(dataset).shape}. Batch the tasks "
            "with drop_remainder=True."
        )
    if tasks % replicas:
        raise ValueError(
            f"A task batch of {tasks} tasks does not split evenly over {replicas} "
            f"replicas: choose tasks_per_batch a multiple of {replicas} (e.g. "
            f"{-(-tasks // replicas) * replicas}). tfmeta does not pad task batches."
        )
    return strategy.distribute_datasets_from_function(
        lambda context: worker_task_batches(dataset, context)
    )


def _x_spec(dataset):
    spec = dataset.element_spec
    return spec[0] if isinstance(spec, (tuple, list)) else spec


def _tasks(dataset):
    """T, the static number of tasks of the stream's task batches (None if unknown)."""
    shape = _x_spec(dataset).shape
    return shape[0] if shape.rank else None


def worker_task_batches(dataset, context):
    """The task batches of one worker's replicas: each element split over them in turn.

    `context` is the worker's `tf.distribute.InputContext`. With `local`
    replicas per worker, worker w's replica j (global replica
    r = w * local + j) gets tasks `[r * T / R, (r + 1) * T / R)`. A stream
    marked by `task_sharded` makes only this worker's tasks when there are
    several workers (its input work is T / workers); any other stream is
    read whole by every worker, which keeps its replicas' tasks (no
    sharding of the elements themselves, which would break trajectories
    into chunks on different workers).

    Example::

        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                             num_replicas_in_sync=2)
        worker_task_batches(stream, context)    # tasks T/2..T-1 of every element
    """
    replicas, workers = context.num_replicas_in_sync, context.num_input_pipelines
    local = replicas // workers
    per_replica = _tasks(dataset) // replicas
    make_shard = getattr(dataset, _SHARD_MAKER, None)
    if make_shard is not None and workers > 1:
        dataset, first = make_shard((context.input_pipeline_id, workers)), 0
    else:
        first = context.input_pipeline_id * local
    groups = _tasks(dataset) // per_replica  # replicas whose tasks `dataset` holds

    def part(t):  # [groups * T / R, ...] -> [local, T / R, ...]: this worker's replicas
        shape = tf.concat([[groups, per_replica], tf.shape(t)[1:]], 0)
        return tf.reshape(t, shape)[first:first + local]

    def split(*element):
        element = element[0] if len(element) == 1 else element
        return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(part, element))

    # Each element becomes `local` consecutive elements, one per local
    # replica, in replica order (local replicas take elements in turn).
    return dataset.flat_map(split)


def use_logical_cpus(count):
    """Split the CPU into `count` logical devices (replicas for tests and benchmarks).

    Must run before TensorFlow initializes its devices (before any op);
    afterwards it raises with that advice. Returns the device names.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is None or len(current) != count:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * count
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"Cannot split the CPU into {count} logical devices once TensorFlow "
                "has initialized its devices: call use_logical_cpus first thing in the "
                "process (e.g. in a subprocess)."
            ) from error
    return [f"/cpu:{i}" for i in range(count)]


def _free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("localhost", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock.getsockname()[1]


def local_tf_configs(num_workers):
    """`TF_CONFIG` values for `num_workers` workers on localhost (free ports).

    Example (two shells, or see docs/performance.md)::

        configs = local_tf_configs(2)
        # worker i: TF_CONFIG=configs[i] python tools/train.py ...
    """
    ports = set()
    while len(ports) < num_workers:
        ports.add(_free_port())
    cluster = {"worker": [f"localhost:{port}" for port in sorted(ports)]}
    return [
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(num_workers)
    ]
