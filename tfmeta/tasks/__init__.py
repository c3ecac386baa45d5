"""Task distributions: the streams of task batches `MetaModel.fit` consumes.

| family | what | data |
|---|---|---|
| `digits_tasks` | 5-way tasks over scikit-learn's digits (no download) | sklearn |
| `omniglot_alphabets` | Leap's Omniglot: one 20-way task per alphabet | TFDS `omniglot` |
| `datasets_as_tasks` | whole datasets as tasks (Leap Multi-CV, CTS large-scale) | any TFDS image dataset |
| `task_family`, `load_task` | 41 named dataset-level tasks: MNIST, Fashion-MNIST, digits, Omniglot groups, domain transforms (`domains.NAMES`) | TFDS + sklearn |
| `RotatedHimmelblau` | the CTS paper's synthetic 2-D family | none |
"""

from tfmeta.tasks.augment import RandomAffine, random_affine
from tfmeta.tasks.base import TaskDistribution
from tfmeta.tasks.classification import ClassificationTask, ClassificationTasks
from tfmeta.tasks.datasets import datasets_as_tasks
from tfmeta.tasks.digits import digits_tasks
from tfmeta.tasks.domains import DatasetTask, load_task, load_tasks, task_family
from tfmeta.tasks.himmelblau import HimmelblauLoss, RotatedHimmelblau, TaskFrame, point_model
from tfmeta.tasks.omniglot import omniglot_alphabets

__all__ = [
    "ClassificationTask",
    "ClassificationTasks",
    "DatasetTask",
    "HimmelblauLoss",
    "RandomAffine",
    "RotatedHimmelblau",
    "TaskDistribution",
    "TaskFrame",
    "datasets_as_tasks",
    "digits_tasks",
    "load_task",
    "load_tasks",
    "omniglot_alphabets",
    "point_model",
    "random_affine",
    "task_family",
]
