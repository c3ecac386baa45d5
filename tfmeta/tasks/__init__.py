"""Task distributions: the streams of task batches `MetaModel.fit` consumes."""

from tfmeta.tasks.base import TaskDistribution
from tfmeta.tasks.himmelblau import HimmelblauLoss, RotatedHimmelblau, TaskFrame

__all__ = ["HimmelblauLoss", "RotatedHimmelblau", "TaskDistribution", "TaskFrame"]
