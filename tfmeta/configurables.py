"""What gin can configure: tfmeta's learners, tasks, models and Keras pieces.

Import this module (the `tools/` scripts do) before parsing gin files. Keras
classes are registered with `gin.external_configurable`: decorating a Keras 3
`Layer`/`Model` subclass with `@gin.configurable` breaks Keras' config
capture, so tfmeta never does.
"""

import gin
import keras

from tfmeta import learners, models
from tfmeta import tasks
from tfmeta.tasks import himmelblau

for _optimizer in (
    keras.optimizers.SGD,
    keras.optimizers.Adam,
    keras.optimizers.AdamW,
    keras.optimizers.RMSprop,
):
    gin.external_configurable(_optimizer, module="keras.optimizers")
gin.external_configurable(keras.losses.SparseCategoricalCrossentropy, module="keras.losses")
gin.external_configurable(keras.losses.MeanSquaredError, module="keras.losses")

for _learner in (
    learners.Leap,
    learners.Reptile,
    learners.FOMAML,
    learners.ContinualTrajectoryShifting,
):
    gin.external_configurable(_learner, module="tfmeta")

gin.external_configurable(models.convnet, module="tfmeta.models")
gin.external_configurable(models.mlp, module="tfmeta.models")
gin.external_configurable(himmelblau.RotatedHimmelblau, module="tfmeta.tasks")
gin.external_configurable(himmelblau.HimmelblauLoss, module="tfmeta.tasks")
gin.external_configurable(himmelblau.point_model, module="tfmeta.tasks")
for _family in (tasks.digits_tasks, tasks.omniglot_alphabets, tasks.datasets_as_tasks, tasks.random_affine):
    gin.external_configurable(_family, module="tfmeta.tasks")

# The evaluations register themselves when imported.
from tfmeta import evaluation  # noqa: E402,F401
