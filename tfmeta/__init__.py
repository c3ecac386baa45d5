"""tfmeta: meta-learned initializations across long learning processes.

Meta-learners (Leap, Reptile, FOMAML, Continual Trajectory Shifting) run as a
Keras `MetaModel` whose `fit` learns the initialization of any Keras model from
a stream of task batches (`tfmeta.tasks`). The learned initialization is
exported with `export_initialization` and reloaded, with a fresh head, by
`load_initialization`; fine-tuning is then plain Keras `fit`::

    meta = tfmeta.MetaModel(net)
    meta.compile(learner=tfmeta.Leap(), inner_steps=100, ...)
    meta.fit(task_batches, steps_per_epoch=meta.steps_for(100))
    tfmeta.export_initialization(net, "runs/init")
    model = tfmeta.load_initialization("runs/init", num_classes=5)  # fresh head
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_new_task, y_new_task)

`tfmeta.finetune` measures fine-tuning as the Leap paper does (loss and
error AUC over the steps). `TaskHeads` gives every source task its own
head, trained in the inner loops and left out of meta-learning
(`MetaModel(net, heads=tfmeta.TaskHeads(num_sources))`).
"""

__version__ = "0.1.0"

# Public names are imported on first use (PEP 562), so that `import tfmeta`
# and the command-line tools' `--help` do not pay TensorFlow's import.
_EXPORTS = {
    "ContinualTrajectoryShifting": "tfmeta.learners",
    "ExcludeHeads": "tfmeta.learners",
    "FOMAML": "tfmeta.learners",
    "InnerStep": "tfmeta.learners",
    "Leap": "tfmeta.learners",
    "MetaLearner": "tfmeta.learners",
    "Reptile": "tfmeta.learners",
    "Schedule": "tfmeta.learners",
    "AfterUpdate": "tfmeta.schedule",
    "MetaModel": "tfmeta.meta_model",
    "TaskHeads": "tfmeta.task_heads",
    "export_initialization": "tfmeta.export",
    "load_initialization": "tfmeta.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfmeta' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
