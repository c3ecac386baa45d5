"""Every gin registration of tfmeta, in one place.

Learners, tasks, models, Keras optimizers and losses, `MirroredStrategy`,
complexity measurement, the experiments, the evaluations and the
command-line jobs (`tfmeta.train`, `tfmeta.finetune`). Library modules never
import gin; bindings reach what gin hands out (`@name` in a gin file, or
`gin.get_configurable`).

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
# Named dataset-level tasks (tfmeta.tasks.domains): `train.tasks = @task_family()`.
gin.external_configurable(tasks.task_family, module="tfmeta.tasks")
# One head per source task, left out of meta-learning: `train.heads = @TaskHeads()`.
from tfmeta import task_heads  # noqa: E402
gin.external_configurable(task_heads.TaskHeads, module="tfmeta")

# Task complexity and its experiments (`tools/complexity.py`), all under the gin
# module "tfmeta.complexity", the names gin/complexity_*.gin use. Bindings reach
# only what gin passes (`@name`) or `gin.get_configurable` returns, not the
# library functions called directly (e.g. `complexity` calls plain `diagonal_fisher`).
from tfmeta import complexity  # noqa: E402
from tfmeta.experiments import (  # noqa: E402
    complexity_figures,
    complexity_kramers,
    complexity_prediction,
    complexity_ranking,
    complexity_reachability,
    complexity_relabel,
    complexity_run,
    complexity_tasks,
)

for _configurable in (
    complexity.diagonal_fisher, complexity.complexity, complexity.beta_from_weight_decay,
    complexity.sgd, complexity.TrainingRecipe, complexity.static_distance,
    complexity.reachability_matrix, complexity.rank_initializations,
    complexity.predict_steps, complexity.PredictorConstants,
    complexity_figures.plot_reachability, complexity_figures.plot_relabel,
    complexity_figures.plot_ranking, complexity_figures.plot_kramers,
    complexity_figures.plot_prediction, complexity_tasks.mlp_classifier,
    complexity_tasks.conv_classifier, complexity_tasks.task_arrays,
):
    gin.external_configurable(_configurable, module="tfmeta.complexity")
for _experiment in (
    complexity_relabel.relabel_experiment, complexity_reachability.reachability_experiment,
    complexity_ranking.ranking_experiment, complexity_kramers.kramers_experiment,
    complexity_prediction.prediction_experiment, complexity_run.run,
):
    gin.external_configurable(_experiment, module="tfmeta.complexity", denylist=["output_dir"])

# The command-line jobs (`tools/train.py`, `tools/finetune.py`), the evaluations
# they run, and a strategy object for `train.strategy = @MirroredStrategy()`.
import tensorflow as tf  # noqa: E402

from tfmeta import evaluation  # noqa: E402
from tfmeta.cli import finetune as finetune_cli  # noqa: E402
from tfmeta.cli import job as train_job  # noqa: E402

gin.external_configurable(
    train_job.train, name="train", module="tfmeta",
    denylist=["output_dir", "resume", "bindings", "operative_config"],
)
gin.external_configurable(finetune_cli.finetune, name="finetune", module="tfmeta", denylist=["init", "output_dir"])
gin.external_configurable(evaluation.heldout_finetuning, module="tfmeta.evaluation")
gin.external_configurable(evaluation.himmelblau_adaptation, module="tfmeta.evaluation")
gin.external_configurable(tf.distribute.MirroredStrategy, module="tf.distribute")

# The many-shot benchmark (`tools/many_shot.py`, gin/many_shot_*.gin): its
# shared setting and one method per gin file.
from tfmeta.experiments import many_shot  # noqa: E402

gin.external_configurable(many_shot.Benchmark, module="tfmeta.many_shot")
gin.external_configurable(many_shot.Method, module="tfmeta.many_shot")
