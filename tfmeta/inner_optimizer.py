"""Run any Keras optimizer statelessly, one copy of its state per task.

Keras 3's `Optimizer.stateless_apply` refuses the TensorFlow backend because
its update path goes through `tf.distribute` merge calls. An inner loop needs
exactly the stateless form: the optimizer's variables (iterations, momentum,
Adam moments, ...) become per-task values that `MetaModel` carries through its
`tf.while_loop`. `stateless_apply` below maps the optimizer's variables to
given values in a `keras.StatelessScope` and runs the optimizer's own,
backend-agnostic update rule, so every built-in optimizer (SGD with
momentum/Nesterov, Adam, AdamW, weight decay, gradient clipping, ...) and
any user optimizer that implements `update_step` with `self.assign*` works.
"""

import types

import keras
from keras.src.optimizers.base_optimizer import BaseOptimizer


_BACKEND_AGNOSTIC = (
    "_var_key",
    "assign",
    "assign_add",
    "assign_sub",
    "_apply_weight_decay",
    "_backend_update_step",
    "_backend_increment_gradient_accumulators",
    "_overwrite_model_variables_with_average_value",
)


def make_stateless(optimizer):
    """Route `optimizer` through the backend-agnostic update path.

    The optimizer object becomes private to one `MetaModel`: it is only ever
    applied inside a `StatelessScope` from then on.
    """
    if not isinstance(optimizer, BaseOptimizer):
        raise TypeError(
            f"The inner optimizer must be a Keras optimizer, got {type(optimizer).__name__}."
        )
    if optimizer.built:
        raise ValueError(
            "The inner optimizer must not be built yet: pass a fresh optimizer "
            "object (MetaModel builds it on the wrapped model's weights)."
        )
    # The TensorFlow optimizer overrides these to unwrap variables into
    # tf.Variables and to go through tf.distribute; in a StatelessScope the
    # base versions act on the scope's values instead.
    for name in _BACKEND_AGNOSTIC:
        setattr(optimizer, name, types.MethodType(getattr(BaseOptimizer, name), optimizer))
    return optimizer


def stateless_apply(optimizer, optimizer_values, grads, params):
    """One optimizer step on values, not variables.

    Args:
        optimizer: a built Keras optimizer passed through `make_stateless`.
        optimizer_values: values for `optimizer.variables`, in order.
        grads: gradients aligned with the variables the optimizer was built on.
        params: current values of those variables.

    Returns:
        `(new_params, new_optimizer_values)`.

    Example:
        >>> opt = make_stateless(keras.optimizers.SGD(0.1, momentum=0.9))
        >>> opt.build(model.trainable_variables)
        >>> slots = [v.value for v in opt.variables]
        >>> params, slots = stateless_apply(opt, slots, grads, params)
    """
    mapping = list(zip(optimizer._trainable_variables, params)) + list(
        zip(optimizer.variables, optimizer_values)
    )
    with keras.StatelessScope(state_mapping=mapping) as scope:
        optimizer.apply(grads)
    new_params = [scope.get_current_value(v) for v in optimizer._trainable_variables]
    new_values = [scope.get_current_value(v) for v in optimizer.variables]
    return new_params, new_values
