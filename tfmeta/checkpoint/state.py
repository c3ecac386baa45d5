"""What a checkpoint holds: a `MetaModel`'s variables, per replica where they are per replica.

Reads only public attributes of the MetaModel (``built``, ``optimizer``,
``model``, ``variables``, ``metrics_variables``, ``distribute_strategy``).

Example::

    from tfmeta.checkpoint.state import read_value, training_variables

    arrays = [read_value(v)[0] for v in training_variables(meta)]
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmeta.checkpoint.errors import CheckpointError, IncompatibleCheckpointError

__all__ = ["assign_value", "metric_variables", "read_value", "training_variables"]


def _unique(variables):
    seen, out = set(), []
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            out.append(variable)
    return out


def training_variables(meta):
    """The variables a checkpoint holds, in a fixed order.

    The MetaModel's variables (the wrapped model's phi and non-trainable
    state, the task state, position, trajectory length, meta-update count,
    shift seed) and the outer optimizer's (iterations, learning rate, slots).
    Metric accumulators are saved apart (`metric_variables`): they only
    matter within an epoch, for the logs.

    Example::

        names = [v.path for v in training_variables(meta)]
    """
    if not meta.built:
        raise CheckpointError(
            "The MetaModel is not built yet, so its task state does not exist: call "
            "meta.build(x_shape) (the per-replica task-batch shape) before saving or "
            "restoring a checkpoint."
        )
    optimizer = meta.optimizer
    if optimizer is None:
        raise CheckpointError("Compile the MetaModel before saving or restoring a checkpoint.")
    if not optimizer.built:
        with meta.distribute_strategy.scope():
            optimizer.build(meta.model.trainable_variables)
    return _unique(list(meta.variables) + list(optimizer.variables))


def metric_variables(meta):
    """The metric accumulators (e.g. the epoch's running mean loss), deduplicated.

    Example::

        [v.path for v in metric_variables(meta)]
    """
    return _unique(meta.metrics_variables)


def _components(variable):
    """Per-replica copies of a per-replica (`on_read`) variable, else None."""
    value = getattr(variable, "value", variable)
    if isinstance(value, tf.distribute.DistributedValues):
        if getattr(value, "synchronization", None) == tf.VariableSynchronization.ON_READ:
            return list(value.values)
    return None


def read_value(variable):
    """`(array, replicas)`: the value, stacked over replicas for per-replica state.

    Example::

        array, replicas = read_value(meta.position)
    """
    parts = _components(variable)
    if parts is not None and len(parts) > 1:
        return np.stack([np.asarray(p.numpy()) for p in parts]), len(parts)
    return np.array(variable.numpy()), 1


def assign_value(variable, array, replicas):
    """Assign `array` as saved by `read_value` from `replicas` replicas.

    Per-replica state saved from one replica is copied to every replica;
    from several, it needs the same number of replicas now.

    Example::

        assign_value(meta.position, *read_value(meta.position))
    """
    parts = _components(variable)
    if replicas > 1:
        if parts is None or len(parts) != replicas:
            raise IncompatibleCheckpointError(
                f"{variable.path} was saved from {replicas} replicas but this run has "
                f"{1 if parts is None else len(parts)}: resume with the same number of "
                "replicas (devices) as the run that wrote the checkpoint."
            )
        for part, value in zip(parts, array):
            part.assign(value)
    elif parts is not None and len(parts) > 1:
        for part in parts:  # per-replica state saved from one replica
            part.assign(array)
    else:
        variable.assign(array)
