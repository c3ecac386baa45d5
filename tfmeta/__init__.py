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
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_new_task, y_new_task)

`tfmeta.finetune` measures fine-tuning as the Leap paper does (loss and
error AUC over the steps).
"""

__version__ = "0.1.0"

from tfmeta.learners import (  # noqa: E402
    FOMAML,
    ContinualTrajectoryShifting,
    InnerStep,
    Leap,
    MetaLearner,
    Reptile,
    Schedule,
)
from tfmeta.meta_model import MetaModel  # noqa: E402
from tfmeta.export import export_initialization, load_initialization  # noqa: E402

__all__ = [
    "ContinualTrajectoryShifting",
    "FOMAML",
    "InnerStep",
    "Leap",
    "MetaLearner",
    "MetaModel",
    "Reptile",
    "Schedule",
    "export_initialization",
    "load_initialization",
]
