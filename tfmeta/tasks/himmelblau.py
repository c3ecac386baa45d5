"""The CTS paper's synthetic task family: rotated, translated Himmelblau functions.

Shin et al. (2021, section 4.1) build eight 2-D task losses from one template,
Himmelblau's function centred at (5, 5) (four global minima), translated to
eight points on a circle around (5, 5) and randomly rotated about each point.
The model has two parameters: the point phi = (x, y) itself.

Following the authors' code (the paper's formula, with the loss divided by 3,
diverges under its own inner learning rate 0.05 from the corners of the
domain), task t's loss is::

    (u, v) = R(angle_t) (p - target_t) / scale
    L_t(p) = a (u^2 + v - 11)^2 + c (u + v^2 - 7)^2

with `scale = 3`, targets on a radius-7 circle around (5, 5), and the same
(a, c) for all tasks. The authors draw a, c uniformly from [0, 1); we fix
their mean, a = c = 0.5, so that the family is deterministic given the seed
of the rotations.

In `MetaModel`'s terms, an example is the task's descriptor
`(cos angle, sin angle, target_x, target_y)`, the model maps it to the task's
frame (u, v) with its two weights, and `HimmelblauLoss` scores (u, v).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tfmeta.distribute import task_sharded
from tfmeta.tasks.base import TaskDistribution
from tfmeta.validation import check_positive_int, check_seed, mark_inner_steps


@keras.saving.register_keras_serializable(package="tfmeta")
class TaskFrame(keras.layers.Layer):
    """A trainable 2-D point, mapped into each example's task frame.

    Inputs are task descriptors `[B, 4] = (cos a, sin a, tx, ty)`; outputs
    `[B, 2]` are `R(a) (point - t) / scale`.
    """

    def __init__(self, start=(0.0, 0.0), scale=3.0, **kwargs):
        super().__init__(**kwargs)
        self.start = tuple(float(s) for s in start)
        self.scale = float(scale)

    def build(self, input_shape):
        self.point = self.add_weight(
            name="point",
            shape=(2,),
            initializer=keras.initializers.Constant(self.start),
        )

    def call(self, descriptors):
        cos, sin = descriptors[:, 0], descriptors[:, 1]
        dx = self.point[0] - descriptors[:, 2]
        dy = self.point[1] - descriptors[:, 3]
        u = (cos * dx - sin * dy) / self.scale
        v = (sin * dx + cos * dy) / self.scale
        return keras.ops.stack([u, v], axis=-1)

    def get_config(self):
        return {**super().get_config(), "start": self.start, "scale": self.scale}


@keras.saving.register_keras_serializable(package="tfmeta")
class HimmelblauLoss(keras.losses.Loss):
    """a (u^2 + v - 11)^2 + c (u + v^2 - 7)^2 of the predicted task-frame point.

    `y_true` is ignored: the task is fully described by its descriptor.
    """

    def __init__(self, a=0.5, c=0.5, name="himmelblau", **kwargs):
        super().__init__(name=name, **kwargs)
        self.a = float(a)
        self.c = float(c)

    def call(self, y_true, y_pred):
        del y_true
        u, v = y_pred[..., 0], y_pred[..., 1]
        return self.a * (u**2 + v - 11.0) ** 2 + self.c * (u + v**2 - 7.0) ** 2

    def get_config(self):
        return {**super().get_config(), "a": self.a, "c": self.c}


def point_model(start=(0.0, 0.0), scale=3.0):
    """A fresh two-parameter model (a `TaskFrame` point) starting at `start`."""
    return keras.Sequential(
        [keras.Input((4,)), TaskFrame(start=start, scale=scale, name="task_frame")],
        name="point",
    )


class RotatedHimmelblau(TaskDistribution):
    """The CTS synthetic task family (all tasks in every meta-batch).

    Args:
        num_tasks: tasks on the circle (the paper: 8).
        radius: radius of the circle of targets around `center`.
        center: centre of the circle.
        scale: coordinates are divided by this before the template.
        a, c: template coefficients.
        seed: seed of the random rotations.

    Example:
        >>> tasks = RotatedHimmelblau()
        >>> model = tasks.model(start=(15.0, -5.0))
        >>> meta = tfmeta.MetaModel(model)
        >>> meta.compile(optimizer=keras.optimizers.SGD(0.1),
        ...              inner_optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...              loss=tasks.loss(), learner=tfmeta.Reptile(), inner_steps=100)
        >>> meta.fit(tasks.as_dataset(tasks_per_batch=8, inner_steps=100,
        ...                           steps_per_chunk=100), steps_per_epoch=300)
    """

    def __init__(self, num_tasks=8, radius=7.0, center=(5.0, 5.0), scale=3.0, a=0.5, c=0.5, seed=0):
        self.num_tasks = check_positive_int("num_tasks", num_tasks)
        self.radius = float(radius)
        self.center = tuple(float(v) for v in center)
        self.scale = float(scale)
        self.a = float(a)
        self.c = float(c)
        self.seed = check_seed(seed)
        rng = np.random.default_rng(self.seed)
        self.angles = rng.uniform(0.0, 2.0 * math.pi, self.num_tasks)
        steps = 2.0 * math.pi * np.arange(self.num_tasks) / self.num_tasks
        self.targets = np.stack(
            [self.center[0] + self.radius * np.sin(steps), self.center[1] + self.radius * np.cos(steps)],
            axis=1,
        )
        self.descriptors = np.concatenate(
            [np.cos(self.angles)[:, None], np.sin(self.angles)[:, None], self.targets], axis=1
        ).astype("float32")

    def model(self, start=(0.0, 0.0)):
        """A fresh two-parameter model starting at `start`."""
        return point_model(start, self.scale)

    def loss(self):
        return HimmelblauLoss(self.a, self.c)

    def as_dataset(self, *, tasks_per_batch=None, inner_steps=100, batch_size=1, steps_per_chunk=1, seed=0,
                   start=0, task_shard=None):
        """Every chunk: all tasks' descriptors (tasks `[first, last)` of `task_shard`)."""
        del seed  # every meta-batch holds every task: nothing is sampled
        self.check_start(start)  # every chunk is the same: any start is the same stream
        tasks_per_batch = self.num_tasks if tasks_per_batch is None else tasks_per_batch
        if tasks_per_batch != self.num_tasks:
            raise ValueError(
                f"RotatedHimmelblau meta-trains on all its {self.num_tasks} tasks at once "
                f"(as in the CTS paper); got tasks_per_batch={tasks_per_batch}."
            )
        self.check_chunking(inner_steps, steps_per_chunk)
        first, last = self.check_task_shard(task_shard, self.num_tasks)
        x = np.broadcast_to(
            self.descriptors[first:last, None, None, :],
            (last - first, steps_per_chunk, batch_size, 4),
        ).copy()
        y = np.zeros((last - first, steps_per_chunk, batch_size), "float32")
        stream = tf.data.Dataset.from_tensors((x, y)).repeat()
        if task_shard is not None:
            return mark_inner_steps(stream, inner_steps)
        return mark_inner_steps(task_sharded(stream, lambda shard: self.as_dataset(
            inner_steps=inner_steps, batch_size=batch_size, steps_per_chunk=steps_per_chunk,
            task_shard=shard,
        )), inner_steps)

    def task_losses(self, points):
        """Each task's loss at its own point: `points` is `[num_tasks, 2]`."""
        points = tf.convert_to_tensor(points, tf.float32)
        d = tf.constant(self.descriptors)
        dx = points[:, 0] - d[:, 2]
        dy = points[:, 1] - d[:, 3]
        u = (d[:, 0] * dx - d[:, 1] * dy) / self.scale
        v = (d[:, 1] * dx + d[:, 0] * dy) / self.scale
        return self.a * (u**2 + v - 11.0) ** 2 + self.c * (u + v**2 - 7.0) ** 2

    def adapted_loss(self, starts, steps=100, optimizer=None):
        """Task-average loss after `steps` inner steps from each start point.

        This is the quality of an initialization (the CTS paper's figures 4-5):
        every task is trained from the start point independently, and the task
        losses after the last step are averaged.

        Args:
            starts: `[N, 2]` start points (initializations).
            steps: inner steps.
            optimizer: a Keras optimizer; default Adam(0.05), the authors'
                meta-test protocol (their `test()` uses Adam at the inner
                learning rate). With SGD with momentum 0.9 every task reaches a
                global minimum from anywhere in the domain within 100 steps, so
                that protocol cannot tell initializations apart.

        Returns:
            A numpy array `[N]` of task-average losses.
        """
        optimizer = optimizer or keras.optimizers.Adam(0.05)
        starts = np.asarray(starts, "float32").reshape(-1, 2)
        points = keras.Variable(np.repeat(starts[:, None, :], self.num_tasks, axis=1))
        optimizer.build([points])

        @tf.function
        def run():
            def loss_fn():
                flat = tf.reshape(points.value, (-1, self.num_tasks, 2))
                return tf.reduce_sum(tf.vectorized_map(self.task_losses, flat))

            for _ in tf.range(steps):
                with tf.GradientTape() as tape:
                    loss = loss_fn()
                optimizer.apply([tape.gradient(loss, points.value)], [points])
            return tf.vectorized_map(self.task_losses, points.value)

        return tf.reduce_mean(run(), axis=1).numpy()
