"""Checks of a meta-training setup that fail early, in one line, naming the fix.

Everything here runs before the first train step (`tools/train.py` calls
these right after building the model and the task stream, `MetaModel`
calls the model-level ones in `compile` and `build`), so a wrong setting
costs seconds, not a training run. Each error is a one-line message that
says what is wrong and what to change.

Example::

    from tfmeta import validation

    validation.check_learning_rate(keras.optimizers.SGD(-0.1), "inner_optimizer")
    # ValueError: inner_optimizer has learning rate -0.1; it must be > 0 ...
"""

from __future__ import annotations

import difflib
import inspect
import math

import numpy as np

__all__ = [
    "ConfigError",
    "check_labels",
    "check_learning_rate",
    "check_positive_int",
    "check_task_batch",
    "explain_gin_error",
]


class ConfigError(ValueError):
    """A gin configuration names a configurable or parameter that does not exist."""


def check_positive_int(name, value, fix=None, minimum=1):
    """`value` as an int >= `minimum`, or a ValueError naming `fix`."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum
    if not ok:
        hint = fix or f"set {name} to an integer >= {minimum}"
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}: {hint}.")
    return int(value)


def _learning_rate_value(optimizer):
    rate = getattr(optimizer, "learning_rate", None)
    if rate is None:
        return None
    schedule = getattr(optimizer, "_learning_rate", None)
    if callable(schedule) and not hasattr(schedule, "numpy"):
        rate = schedule(0)
    try:
        return float(np.asarray(rate))
    except (TypeError, ValueError):
        return None


def check_learning_rate(optimizer, name, setting=None, allow_zero=False):
    """Raise a ValueError if `optimizer`'s learning rate (at step 0) is not > 0 and finite.

    Args:
        optimizer: a Keras optimizer (or None: nothing to check).
        name: what the optimizer is ("inner_optimizer", "optimizer").
        setting: the setting to change, for the message (e.g.
            "inner/SGD.learning_rate").
        allow_zero: accept 0 (a frozen loop: `MetaModel` allows it for
            experiments; `tools/train.py` does not).
    """
    if optimizer is None:
        return
    rate = _learning_rate_value(optimizer)
    if rate is None:
        return
    if not (math.isfinite(rate) and (rate > 0 or (allow_zero and rate == 0))):
        where = setting or f"the learning_rate of {name}"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name} ({type(optimizer).__name__}) has learning rate {rate}; it must be a "
            f"finite number {bound}: set {where} to e.g. 0.1."
        )


def _model_input_shape(model):
    inputs = getattr(model, "inputs", None)
    if inputs:
        return tuple(inputs[0].shape[1:])
    shape = (model.get_build_config() or {}).get("input_shape")
    if isinstance(shape, (tuple, list)):
        return tuple(shape[1:])
    return None


def check_task_batch(model, x_shape, y_shape=None):
    """Check task batches `[T, S, B, *input_shape]` against `model`'s input.

    Raises a ValueError naming the expected shape when the rank or the
    per-example shape differs.
    """
    x_shape = tuple(None if d is None else int(d) for d in x_shape)
    expected = _model_input_shape(model)
    layout = "[tasks T, steps per chunk S, batch B, *input_shape]"
    if expected is None:
        if len(x_shape) < 4:
            raise ValueError(
                f"task batches must be {layout}; got shape {x_shape}: produce them "
                "with a tfmeta.tasks distribution's as_dataset."
            )
        return
    want = 3 + len(expected)
    if len(x_shape) != want:
        raise ValueError(
            f"task batches have shape {x_shape} (rank {len(x_shape)}) but the model "
            f"takes inputs {expected}, so task batches must be {layout} = "
            f"[T, S, B, {', '.join(str(d) for d in expected)}] (rank {want}): build the "
            "stream with a tfmeta.tasks distribution's as_dataset, or give the model "
            f"Input(shape={x_shape[3:]})."
        )
    for have, need in zip(x_shape[3:], expected):
        if need is not None and have is not None and have != need:
            raise ValueError(
                f"task batch examples have shape {x_shape[3:]} but the model takes "
                f"{expected}: make the model's input shape {x_shape[3:]} (e.g. "
                "mlp.input_shape / convnet.input_shape) or resize the tasks' images "
                "(e.g. image_size=...)."
            )
    if y_shape is not None:
        y_shape = tuple(y_shape)
        if tuple(y_shape[:3]) != tuple(x_shape[:3]):
            raise ValueError(
                f"labels have shape {y_shape} but inputs {x_shape}: y must be "
                "[T, S, B, ...] with the same T, S, B as x."
            )


def _output_units(model):
    outputs = getattr(model, "outputs", None)
    if outputs:
        return outputs[0].shape[-1]
    return None


def check_labels(model, y, loss):
    """Check that integer labels `y` index the model's outputs (sparse losses).

    For `SparseCategoricalCrossentropy` (or any loss named "sparse..."), the
    labels must lie in `0..units-1` where `units` is the model's last output
    dimension.
    """
    name = getattr(loss, "name", None) or getattr(loss, "__name__", "") or str(loss)
    if "sparse" not in str(name).lower() and "Sparse" not in type(loss).__name__:
        return
    units = _output_units(model)
    y = np.asarray(y)
    if units is None or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= units:
        raise ValueError(
            f"task labels range over {low}..{high} but the model has {units} outputs "
            f"(classes 0..{units - 1}): give the model's head {high + 1} units (e.g. "
            f"mlp.num_classes = {high + 1} / convnet.num_classes = {high + 1}) or use "
            "tasks with fewer classes."
        )


def _registry():
    try:
        from gin import config

        return config._REGISTRY
    except (ImportError, AttributeError):
        return None


def explain_gin_error(error, bindings=()):
    """Turn a gin parse error into a one-line `ConfigError` naming the fix, or None.

    Handles unknown configurables ("No configurable matching 'trian'"),
    unknown parameters ("Configurable 'train' doesn't have a parameter named
    'meta_update'") and missing gin files, suggesting the closest names.
    """
    import re

    text = str(error)
    first = text.splitlines()[0] if text else ""
    registry = _registry()
    match = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
    if match and registry is not None:
        configurable, parameter = match.groups()
        known = []
        try:
            found = registry.get_match(configurable)
            known = [
                p for p in inspect.signature(found.wrapped).parameters
                if p not in (found.denylist or ()) and p not in ("self", "args", "kwargs")
            ]
        except Exception:  # noqa: BLE001 - suggestions are best effort
            pass
        close = difflib.get_close_matches(parameter, known, n=1)
        hint = f"did you mean {configurable}.{close[0]}?" if close else (
            f"its parameters are: {', '.join(known)}" if known else "check the spelling"
        )
        return ConfigError(
            f"gin binding {configurable}.{parameter}: {configurable} has no parameter "
            f"{parameter!r}; {hint}"
        )
    match = re.search(r"No configurable matching (?:reference )?'@?([^'(]+)", text)
    if match:
        name = match.group(1)
        known = []
        if registry is not None:
            try:
                known = [selector.split(".")[-1] for selector, _ in registry.items()]
            except Exception:  # noqa: BLE001 - suggestions are best effort
                known = []
        close = difflib.get_close_matches(name.split(".")[-1], known, n=1)
        hint = f"did you mean {close[0]}?" if close else (
            "register it with gin.external_configurable or import the module that "
            "defines it (tfmeta.configurables registers tfmeta's)"
        )
        return ConfigError(f"gin: no configurable named {name!r}; {hint}")
    if isinstance(error, OSError) and "Unable to open file" in text:
        return ConfigError(
            f"gin: {first.rstrip('.')}; pass an existing --gin_file (e.g. gin/digits.gin)."
        )
    return None
