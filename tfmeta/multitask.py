"""Multi-task pretraining: one shared body, one head per source task, trained jointly with Keras `fit`.

The CTS paper's "multi-task learning (MTL)" baseline and Leap's multi-headed
fine-tuning: every step takes a mini-batch of each of T source tasks, sends
each through the shared body and its own source's head, and steps every
weight with the mean of the T task losses. Its body then starts fine-tuning
on a new task with a fresh head, like a meta-learned initialization.

`MultiTaskModel` consumes the meta-learning stream itself,
`ClassificationTasks.as_dataset(tasks_per_batch=T, inner_steps=1,
steps_per_chunk=1, with_task_ids=True)`: x `[T, 1, B, ...]`, y `[T, 1, B]`,
task ids `[T]`, so a step spends T task-steps, as T tasks' inner steps do in a
meta-learner, and any Keras optimizer trains it (SGD with momentum and weight
decay like the meta-learners' inner optimizer). Heads are one stacked kernel
`[num_heads, features, max_classes]`: a source with fewer classes than the
widest gets a constant -1e4 on its unused logits, so they never win and get
exactly zero gradient (as in `tfmeta.TaskHeads`).

Example::

    sources = task_family(["mnist", "omniglot/background_a"])
    net = convnet(sources.num_classes, filters=16)
    mtl = MultiTaskModel(net, num_classes=sources.task_classes, seed=0)
    mtl.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, weight_decay=5e-4))
    mtl.fit(sources.as_dataset(tasks_per_batch=2, inner_steps=1, batch_size=32,
                               steps_per_chunk=1, with_task_ids=True), steps_per_epoch=1000)
    net   # its body is trained (its own head is not): fine-tune it with a fresh head
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from tfmeta.heads import features_model, find_head
from tfmeta.replicas import check_fit_executions, fit_arguments
from tfmeta.task_heads import UNUSED_CLASS_BIAS
from tfmeta.validation import ConfigError

__all__ = ["MultiTaskModel"]

# What the train steps past an epoch are (the budget counts task-steps).
_OVERRUN = "more multi-task steps (T task-steps each) than asked"


class MultiTaskModel(keras.Model):
    """`model`'s body with one head per source task, trained on `(x, y, task_ids)` task batches.

    Args:
        model: a built Keras model whose last layer is a Dense head (the
            body is every layer before it, shared with `model`: training
            trains `model`'s body; its own head is left untouched).
        num_classes: one class count per source (head), each <= the head's units.
        seed: seed of the heads' Glorot-uniform kernels (biases start at 0).

    Example::

        mtl = MultiTaskModel(convnet(95), num_classes=[10, 10, 95])
        mtl.heads_kernel.shape          # (3, features, 95)
    """

    def __init__(self, model, num_classes, seed=0, name="multi_task", **kwargs):
        super().__init__(name=name, **kwargs)
        head, _ = find_head(model)
        if isinstance(num_classes, (str, bytes)) or not isinstance(num_classes, Iterable) or not all(
                isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in num_classes):
            raise ConfigError(
                f"MultiTaskModel(num_classes={num_classes!r}) needs one whole class count per "
                "source task (one head each), e.g. num_classes=[5] * num_tasks.")
        num_classes = [int(n) for n in num_classes]
        if not num_classes or min(num_classes) < 1 or max(num_classes) > head.units:
            raise ConfigError(
                f"MultiTaskModel(num_classes={num_classes}) needs one count >= 1 per source, "
                f"none above the head's {head.units} units: build the model with "
                f"num_classes={max(num_classes) if num_classes else 'max(classes)'}."
            )
        self.body = features_model(model)
        self.num_classes = num_classes
        features, units = int(head.input.shape[-1]), int(head.units)
        self.heads_kernel = self.add_weight(
            shape=(len(num_classes), features, units), name="heads_kernel",
            initializer=keras.initializers.GlorotUniform(seed),
        )
        self.heads_bias = self.add_weight(
            shape=(len(num_classes), units), name="heads_bias", initializer="zeros"
        )
        unused = np.arange(units)[None, :] >= np.array(num_classes)[:, None]
        self._mask = tf.constant(np.where(unused, UNUSED_CLASS_BIAS, 0.0), dtype=self.heads_bias.dtype)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, inputs, training=False):
        """Logits `[N, units]` of images `x` `[N, ...]` through the heads of `task_ids` `[N]`."""
        x, task_ids = inputs
        features = self.body(x, training=training)
        kernel = tf.gather(self.heads_kernel, task_ids)
        logits = tf.einsum("nf,nfc->nc", features, kernel)
        return logits + tf.gather(self.heads_bias + self._mask, task_ids)

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`; `steps_per_epoch` must be a multiple of `steps_per_execution`.

        Keras runs whole executions: with `steps_per_execution=4`,
        `steps_per_epoch=10` on an endless stream would run 12 multi-task
        steps an epoch. `fit` raises a `ConfigError` before any step instead
        (`tfmeta.replicas.check_whole_executions`, as `MetaModel.fit` does),
        unless the stream is known to end within the epoch. Arguments count
        by position or name, as in `keras.Model.fit`.
        """
        arguments = fit_arguments(self, *args, **kwargs)
        _check_stream(arguments.get("x"))
        # Task streams are shuffled by their distribution; Keras ignores
        # `shuffle` for a dataset but warns on its default True.
        arguments.setdefault("shuffle", False)
        check_fit_executions(self, arguments, overrun=_OVERRUN)
        return super().fit(**arguments)

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """`keras.Model.compile` with the optimizer only: the loss is each head's cross-entropy."""
        if loss is not None or metrics is not None:
            raise ConfigError(
                "MultiTaskModel.compile takes no loss= or metrics=: it trains every head with "
                "its cross-entropy on logits; measure the body by fine-tuning it "
                "(tfmeta.finetune) with a new head.")
        super().compile(optimizer=optimizer, **kwargs)

    def test_step(self, data):
        raise ConfigError(
            "MultiTaskModel trains only: evaluate the shared body by fine-tuning it with a new "
            "head, e.g. tfmeta.finetune.finetune(with_new_head(model, n), data).")

    def predict_step(self, data):
        raise ConfigError(
            "MultiTaskModel trains only: predict with the network it trains (its body is "
            "shared with the model you passed in), e.g. model.predict(x).")

    def train_step(self, data):
        x, y, task_ids = keras.utils.unpack_x_y_sample_weight(data)
        tasks, batch = tf.shape(y)[0], tf.shape(y)[2]
        # [T, 1, B, ...] -> [T * B, ...]: one forward pass over all tasks' examples.
        images = tf.reshape(x, tf.concat([[tasks * batch], tf.shape(x)[3:]], 0))
        labels = tf.reshape(y, [-1])
        ids = tf.repeat(tf.cast(task_ids, tf.int32), batch)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            logits = self((images, ids), training=True)
            # Each task's mean loss, then their mean: equal to the mean over
            # all examples, since every task has B of them.
            loss = self.loss_fn(labels, logits)
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


_STREAM = ("as_dataset(..., inner_steps=1, steps_per_chunk=1, with_task_ids=True) of the "
           "source task family")


def _check_stream(x):
    """Refuse a task stream without task ids, or with more than one step per task."""
    if not isinstance(x, tf.data.Dataset):
        return
    spec = x.element_spec
    if not isinstance(spec, (tuple, list)) or len(spec) != 3:
        raise ConfigError(f"MultiTaskModel.fit needs (x, y, task_ids) task batches: pass {_STREAM}.")
    steps = spec[0].shape[1] if isinstance(spec[0], tf.TensorSpec) and spec[0].shape.rank else None
    if steps not in (None, 1):
        raise ConfigError(f"MultiTaskModel.fit takes one step per task and batch, got task batches of "
                          f"{steps} steps: pass {_STREAM}.")
