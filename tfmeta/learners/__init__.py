"""Meta-learners: small objects with one rule each (see `MetaLearner`)."""

from tfmeta.learners.base import InnerStep, MetaLearner, Schedule
from tfmeta.learners.cts import ContinualTrajectoryShifting
from tfmeta.learners.exclude import ExcludeHeads
from tfmeta.learners.fomaml import FOMAML
from tfmeta.learners.leap import Leap
from tfmeta.learners.reptile import Reptile

__all__ = [
    "ContinualTrajectoryShifting", "ExcludeHeads", "FOMAML", "InnerStep", "Leap", "MetaLearner",
    "Reptile", "Schedule",
]
