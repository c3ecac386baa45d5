"""How good is a learned initialization? Compare it with the one it started from.

An evaluation is a callable `evaluate(learned, baseline, tasks) -> dict`
mapping each candidate name ("meta-learned", "random init") to its metrics.
`tools/train.py` runs one after export; gin picks which (`train.evaluation`,
registered in `tfmeta.configurables`). The evaluations here carry
`checks_settings = True`: called with both candidates None they only check
their settings against the tasks and return `{}`, which `tools/train.py`
does before training, so that a bad setting costs seconds, not a run.

Example::

    heldout_finetuning(None, None, heldout, steps=0)
    # ValueError: heldout_finetuning.steps=0 must be an integer >= 1: ...
"""

import math
import os

import keras
import numpy as np

from tfmeta import finetune as finetuning
from tfmeta.validation import (ConfigError, check_positive_int, check_seed, is_meta_model,
                               model_input_shape, output_units)


def _check_learning_rate(name, value):
    try:
        rate = float("nan") if isinstance(value, bool) else float(value)  # True is no rate
    except (TypeError, ValueError):
        rate = float("nan")
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"{name}={value!r} must be a finite number > 0: set {name} to e.g. 0.1.")
    return rate


def check_finetuning_settings(steps, learning_rate, batch_size, names=None):
    """`(steps, learning_rate, batch_size)` checked, or a ValueError naming the binding to fix.

    `names` maps a setting to the gin binding it came from (default
    `heldout_finetuning.<setting>`).

    Example::

        check_finetuning_settings(0, 0.1, 10, names={"steps": "finetune.steps"})
        # ValueError: finetune.steps=0 must be an integer >= 1: ...
    """
    names = {k: f"heldout_finetuning.{k}" for k in ("steps", "learning_rate", "batch_size")} | (names or {})
    return (
        check_positive_int(names["steps"], steps),
        _check_learning_rate(names["learning_rate"], learning_rate),
        check_positive_int(names["batch_size"], batch_size),
    )


def himmelblau_adaptation(learned, baseline, tasks, steps=100):
    """Task-average loss after `steps` inner steps from each candidate point.

    For the two-parameter models of `tfmeta.tasks.RotatedHimmelblau`.
    """
    steps = check_positive_int("himmelblau_adaptation.steps", steps)
    if learned is None and baseline is None:
        return {}
    points = np.stack(
        [np.asarray(m.trainable_variables[0].numpy()) for m in (learned, baseline)]
    )
    losses = tasks.adapted_loss(points, steps=steps)
    return {
        "meta-learned": {"point": points[0].tolist(), "adapted_loss": float(losses[0])},
        "random init": {"point": points[1].tolist(), "adapted_loss": float(losses[1])},
    }


def heldout_finetuning(learned, baseline, tasks, steps=100, learning_rate=0.1, batch_size=20, seed=0):
    """Fine-tune each candidate on every held-out task with plain Keras `fit`.

    Reports the mean (and standard deviation over tasks) of Leap's metrics:
    area under the training-loss and training-error curves and the final
    held-out test error. Every task starts from a fresh copy of the candidate.
    Either candidate may be None to skip it (both: only check the settings).
    """
    steps, learning_rate, batch_size = check_finetuning_settings(steps, learning_rate, batch_size)
    check_seed(seed, "heldout_finetuning.seed")  # before training: tools/train.py checks first
    _check_tasks(tasks)
    _check_test_examples(tasks)
    results = {}
    for name, model in (("meta-learned", learned), ("random init", baseline)):
        if model is not None:
            runs = finetune_every_task(model, tasks, steps, learning_rate, batch_size, seed)
            results[name] = summary(runs)
    return results


himmelblau_adaptation.checks_settings = heldout_finetuning.checks_settings = True


def _check_test_examples(tasks):
    """Every held-out task needs test examples for its test error."""
    for i in range(getattr(tasks, "num_tasks", 0)):
        task = tasks.task(i) if hasattr(tasks, "task") else None
        if task is not None and len(task.x_test) == 0:
            raise ValueError(
                f"held-out task {task.name!r} has no test examples, so heldout_finetuning cannot "
                "measure its test error: give the held-out tasks test examples (e.g. "
                "digits_tasks.test_shots >= 1), or set train.evaluation = None."
            )


def _check_tasks(tasks):
    """Refuse what is not one family of tasks to fine-tune on, naming the fix."""
    if isinstance(tasks, tuple) and len(tasks) == 2 and all(hasattr(t, "finetune_data") for t in tasks):
        raise ConfigError(
            "tasks is a (pretrain, heldout) pair of task families, as digits_tasks() and "
            "omniglot_alphabets() return: pass the held-out one, e.g. "
            "pretrain, heldout = digits_tasks(); heldout_finetuning(..., heldout)")
    if not (hasattr(tasks, "num_tasks") and hasattr(tasks, "finetune_data")):
        raise ConfigError(
            f"tasks must be a family of tasks with num_tasks and finetune_data (e.g. "
            f"tfmeta.tasks.ClassificationTasks), got {type(tasks).__name__}: for one task, "
            "fine-tune it with tfmeta.finetune.finetune(model, task_data)")


def _check_candidate(model, tasks):
    """Refuse a model that cannot be fine-tuned on `tasks`, naming the fix."""
    if isinstance(model, (str, os.PathLike)):
        raise ConfigError(
            f"the candidate {str(model)!r} is a path: load it first, "
            f"tfmeta.load_initialization({str(model)!r}, num_classes=...)")
    if not is_meta_model(model) and not isinstance(model, keras.Model):
        raise ConfigError(f"the candidate must be a Keras model, got {type(model).__name__} "
                          "(are the arguments in the order (learned, baseline, tasks)?)")
    if not is_meta_model(model) and not model.built:
        raise ConfigError("the candidate model is not built: give it an Input (keras.Input(shape)) "
                          "or call model.build(input_shape) first")
    if is_meta_model(model):
        raise ValueError("the candidate is the MetaModel wrapper: fine-tune the network it "
                         "meta-trained, meta.model")
    expected = model_input_shape(model)
    shape = getattr(tasks, "input_shape", None)
    if expected is not None and shape is not None and tuple(expected) != tuple(shape):
        raise ValueError(f"the held-out tasks' images have shape {tuple(shape)} but the model "
                         f"takes {tuple(expected)}: use a model (or an export) for this input shape")
    units, classes = output_units(model), getattr(tasks, "num_classes", None)
    if units is not None and classes is not None and units < classes:
        raise ValueError(
            f"the held-out tasks have {classes} classes but the model has {units} outputs: give "
            f"it a head with {classes} classes, e.g. load_initialization(path, num_classes="
            f"{classes}) or tfmeta.heads.with_new_head(model, {classes})")


def finetune_every_task(model, tasks, steps=100, learning_rate=0.1, batch_size=20, seed=0):
    """One `tfmeta.finetune.FinetuneResult` per task of `tasks`, each from a copy of `model`.

    The settings are checked as `check_finetuning_settings` does, and `model`
    against the tasks (its input shape, enough outputs for their classes, not
    the `MetaModel` wrapper), each in one line naming the fix.
    """
    import keras

    check_finetuning_settings(steps, learning_rate, batch_size, names={
        k: f"finetune_every_task.{k}" for k in ("steps", "learning_rate", "batch_size")})
    check_seed(seed, "finetune_every_task.seed")
    _check_tasks(tasks)
    _check_candidate(model, tasks)

    # One trace of Keras' train and test functions for all the tasks.
    tune = finetuning.Finetuner(steps, optimizer=keras.optimizers.SGD(learning_rate))
    runs = []
    for task in range(tasks.num_tasks):
        candidate = keras.models.clone_model(model)
        candidate.set_weights(model.get_weights())
        runs.append(tune(
            candidate,
            tasks.finetune_data(task, split="train", batch_size=batch_size, seed=seed),
            tasks.finetune_data(task, split="test", batch_size=batch_size, seed=seed),
        ))
    return runs


def summary(runs):
    """Mean and standard deviation over tasks of Leap's metrics."""
    out = {}
    for metric in ("loss_auc", "error_auc", "test_error"):
        values = np.array([getattr(r, metric) for r in runs], dtype=float)
        out[metric] = float(values.mean())
        out[f"{metric}_std"] = float(values.std())
    out["tasks"] = len(runs)
    return out


def mean_curves(runs):
    """The task-average curves of several runs, as one `FinetuneResult` (for plots)."""
    losses = np.mean([r.losses for r in runs], axis=0)
    errors = np.mean([r.errors for r in runs], axis=0)
    return finetuning.FinetuneResult(
        losses=losses.tolist(),
        errors=errors.tolist(),
        loss_auc=finetuning.area_under_curve(losses),
        error_auc=finetuning.area_under_curve(errors),
        test_error=float(np.mean([r.test_error for r in runs])),
    )
