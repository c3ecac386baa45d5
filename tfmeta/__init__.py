"""tfmeta: meta-learned initializations across long learning processes.

Meta-learners (Leap, Reptile, FOMAML, Continual Trajectory Shifting) run as a
Keras `MetaModel` whose `fit` learns the initialization of any Keras model from
a stream of task batches (`tfmeta.tasks`).
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

__all__ = [
    "ContinualTrajectoryShifting",
    "FOMAML",
    "InnerStep",
    "Leap",
    "MetaLearner",
    "MetaModel",
    "Reptile",
    "Schedule",
]
