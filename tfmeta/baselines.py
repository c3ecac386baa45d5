"""Pretraining baselines that meta-learned initializations are compared with.

`multihead_pretraining` is Leap's "multi-headed fine-tuning" baseline (and
CTS's multi-task learning baseline): one shared network with a head per
pretraining task, trained on all tasks jointly; its body then starts
fine-tuning on a new task with a fresh head. No pretraining at all is
`tfmeta.finetune.random_initialization`.
"""

import keras
import numpy as np
import tensorflow as tf


def multihead_pretraining(
    model,
    tasks,
    steps=1000,
    tasks_per_step=None,
    batch_size=20,
    learning_rate=0.1,
    seed=0,
    verbose=0,
):
    """Train `model`'s body with one head per task of `tasks`; return a copy with a fresh head.

    Every step draws `tasks_per_step` tasks (all by default), a mini-batch of
    each, and takes one SGD step on the sum of their losses, each through its
    own head. The returned model has `model`'s architecture: the trained body
    and a newly initialized last layer (the head), ready to fine-tune.

    Args:
        model: a Sequential or functional Keras model whose last layer is the
            (Dense) head; it is not modified.
        tasks: a `tfmeta.tasks.ClassificationTasks`.
        steps: SGD steps.
        tasks_per_step: tasks per step (default: every task).
        batch_size: examples per task per step.
        learning_rate: SGD learning rate.
        seed: seed of the task and example draws and of the heads.

    Example:
        >>> pretrain, heldout = tfmeta.tasks.omniglot_alphabets(num_pretrain=10)
        >>> init = multihead_pretraining(convnet(20), pretrain, steps=500)
    """
    T = int(tasks_per_step or tasks.num_tasks)
    classes = int(tasks.num_classes)
    pretrained = keras.models.clone_model(model)
    pretrained.build((None, *tasks.input_shape))
    pretrained.set_weights(model.get_weights())
    # The body shares its layers with `pretrained`: training one trains the other.
    body = keras.Model(pretrained.inputs, pretrained.layers[-2].output)
    heads = keras.layers.Dense(
        tasks.num_tasks * classes, kernel_initializer=keras.initializers.GlorotUniform(seed)
    )
    heads.build(body.output_shape)
    variables = body.trainable_variables + heads.trainable_variables
    optimizer = keras.optimizers.SGD(learning_rate)
    optimizer.build(variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    stream = tasks.as_dataset(
        tasks_per_batch=T, inner_steps=1, batch_size=batch_size, steps_per_chunk=1, seed=seed
    )
    # Element m of the stream is meta-batch m: its tasks are `task_ids(m)`.
    ids = np.stack([tasks.task_ids(m, T, seed=seed) for m in range(steps)]).astype("int32")
    data = tf.data.Dataset.zip((stream.take(steps), tf.data.Dataset.from_tensor_slices(ids)))

    @tf.function
    def step(batch, task_ids):
        x, y = batch
        x = tf.reshape(x, [T * batch_size, *tasks.input_shape])
        with tf.GradientTape() as tape:
            logits = tf.reshape(heads(body(x, training=True)), [T, batch_size, tasks.num_tasks, classes])
            # Each task's examples go through that task's head only.
            own = tf.gather(logits, task_ids, axis=2, batch_dims=1)
            loss = tf.add_n([loss_fn(y[t, 0], own[t]) for t in range(T)])
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss / T

    progress = keras.utils.Progbar(steps, verbose=verbose)
    for i, (batch, task_ids) in enumerate(data):
        progress.update(i + 1, [("loss", float(step(batch, task_ids)))])

    head = pretrained.layers[-1]
    fresh = head.__class__.from_config(head.get_config())
    fresh.build(body.output_shape)
    head.set_weights(fresh.get_weights())
    return pretrained
