"""Per-task heads: one head per source task, trained in the inner loops, never meta-learned.

Meta-learning over sources with their own label spaces (MNIST digits,
Fashion-MNIST garments, Omniglot alphabets as datasets) needs a classifier
per source: the CTS reference code keeps one per source and leaves these
parameters ("fc") out of meta-learning, and Leap's Multi-CV experiment and
multi-headed baselines do the same. With `MetaModel(model,
heads=TaskHeads(num_heads))`:

- task batches carry the source-task index of each of their T tasks third,
  `(x, y, task_ids)`, with int32 `task_ids` of shape `[T]` (the same on
  every chunk of a trajectory), as `ClassificationTasks.as_dataset(...,
  with_task_ids=True)` yields them: the ids ride along the task axis when
  a strategy splits the tasks over replicas or workers;
- the head (the model's last Dense layer, `tfmeta.heads.find_head`) has a
  bank of `num_heads` heads, variables `[num_heads, *shape]` of the
  MetaModel (so checkpoints and resume capture them). At a trajectory
  restart task t's head starts from `bank[task_ids[t]]` while its body
  starts from phi; after every chunk the tasks' current heads are written
  back to their rows;
- the learner sees the body only (`tfmeta.learners.ExcludeHeads`) and the
  outer optimizer steps the body's variables only: phi's own head
  variables never move;
- an export of the model records that its head is not meta-learned, and
  `load_initialization` then always makes a fresh head.

Plain `(x, y)` batches without `TaskHeads` keep one shared head that is
meta-learned like every other weight (Omniglot's 20-way alphabets).

Example::

    heads = tfmeta.TaskHeads(num_heads=12, num_classes=[10] * 10 + [50, 50])
    meta = tfmeta.MetaModel(net, heads=heads)       # net ends in Dense(50)
    meta.compile(learner=tfmeta.Leap(), ...)
    meta.fit(tasks.as_dataset(..., with_task_ids=True))   # (x, y, task_ids)
    kernel, bias = heads.head_weights(3)             # source 3's head
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

from tfmeta.heads import find_head, mark_not_meta_learned
from tfmeta.inner_optimizer import stateless_apply
from tfmeta.learners.exclude import ExcludeHeads
from tfmeta.replicas import all_reduce_sum
from tfmeta.validation import ConfigError, check_seed

__all__ = ["TaskHeads", "UNUSED_CLASS_BIAS", "unpack_task_batch"]

#: The bias of a head's unused classes: its logits sit ~1e4 below the
#: others, so its softmax probability is 0 in float32 and float64 and the
#: class's bias and kernel column get exactly zero gradient.
UNUSED_CLASS_BIAS = -1e4


def unpack_task_batch(data, heads):
    """`(x, task_ids, y)` of one task batch for a MetaModel with `heads` (a TaskHeads or None).

    Task ids come third, `(x, y, task_ids)` (the place of Keras' sample
    weights, which meta-training does not use). Without heads they are not
    used: the model's one head is meta-learned like every weight.

    Example::

        x, task_ids, y = unpack_task_batch(data, meta.heads)
    """
    x, y, task_ids = keras.utils.unpack_x_y_sample_weight(data)
    if heads is None:
        return x, None, y
    return x, task_ids, y


def _slot_lists(optimizer):
    """The optimizer's per-variable slot lists: its attributes aligned with the
    variables it was built on, each entry an optimizer variable or None.

    Keras optimizers keep every slot kind so (`add_optimizer_variables`:
    Adam's `_momentums` and `_velocities`, SGD's `momentums`, the gradient
    accumulators, the EMA averages, ...).
    """
    built, own = optimizer._trainable_variables, optimizer._variables
    ids = {id(v) for v in own}
    for value in vars(optimizer).values():
        if (isinstance(value, (list, tuple)) and value is not built and value is not own
                and len(value) == len(built) and any(s is not None for s in value)
                and all(s is None or id(s) in ids for s in value)):
            yield value


def _seeded(initializer, seed):
    """`initializer` re-made with `seed` (unchanged when it draws nothing, e.g. Zeros)."""
    config = initializer.get_config()
    if "seed" not in config:
        return initializer
    return type(initializer).from_config({**config, "seed": seed})


class TaskHeads:
    """A bank of `num_heads` heads for the model's last Dense layer, one per source task.

    Args:
        num_heads: the number of source tasks (task ids are 0..num_heads-1).
        num_classes: None (every head uses all the Dense layer's units), one
            count for every head, or one count per head, each <= the units:
            sources with different label spaces share one head shape of
            max-units. A head's unused classes (units >= its count) get the
            bias `UNUSED_CLASS_BIAS`
            (-1e4), so their softmax probability is ~0 (0 in float32): they
            never win, get zero gradients and never move. The bank
            re-imposes that bias at every write, so inner weight decay
            cannot drift it; their kernel columns keep their initial values
            (weight decay shrinks them). Labels of a task must be below its
            head's count. The head must produce logits (no activation) or
            probabilities (softmax).
        seed: head h is initialized with the Dense layer's own initializers
            re-seeded with `seed + h` (initializers that draw nothing, such
            as Zeros, as they are).

    How the bank is kept: after every chunk each task's current head is
    written to `bank[task_id]`. Several tasks of one meta-batch with the same
    id (on any replica) all start from that row and it becomes the MEAN of
    their heads. A task that diverged (NaN/inf, `tfmeta.divergence`) writes
    nothing: its row keeps its last finite value. Under a `tf.distribute`
    strategy each replica trains its own tasks' heads; the bank is one
    mirrored copy per replica, written in cross-replica context from
    all-reduced sums (in the merge call every train step already makes),
    so it stays identical everywhere: a head trained on replica 0 and
    sampled later on replica 1 is the same. With schedules that keep the
    inner optimizer's state across restarts (CTS without `hard_reset`), the
    heads' optimizer slots restart anyway (next trajectory, a task slot may
    hold another source's head), found by identity (`optimizer_slots`),
    and the heads count their own steps from there (`own_step_count`):
    Adam's bias correction restarts for a head as for a fresh optimizer,
    while the body's moments and step count carry over.

    Example:
        >>> net = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
        ...                         keras.layers.Dense(64, "relu"), keras.layers.Dense(10)])
        >>> heads = tfmeta.TaskHeads(3, num_classes=[10, 10, 5])
        >>> meta = tfmeta.MetaModel(net, heads=heads)
    """

    def __init__(self, num_heads, num_classes=None, seed=0):
        if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
            raise ConfigError(
                f"TaskHeads(num_heads={num_heads!r}): give the number of source tasks, an "
                "integer >= 1 (task ids are 0..num_heads-1)."
            )
        if isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool):
            num_classes = [num_classes] * int(num_heads)
        if num_classes is not None:
            try:
                num_classes = list(num_classes)
            except TypeError:
                num_classes = [num_classes]  # refused just below, by name
            if len(num_classes) != num_heads or not all(
                isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
                for n in num_classes
            ):
                raise ConfigError(
                    f"TaskHeads(num_classes={num_classes!r}) needs one integer >= 1 per head "
                    f"({num_heads} of them), or None for all units of the head."
                )
            num_classes = [int(n) for n in num_classes]
        self.num_heads = int(num_heads)
        self.num_classes = num_classes
        self.seed = check_seed(seed)
        self.model = None
        self.head = None
        self.indices = ()
        self.bank = []
        self._bias = None  # the bank entry of the head's bias
        self._slots = (None, None)  # (optimizer, its head slots): found once, warned once

    def __repr__(self):
        return (f"TaskHeads(num_heads={self.num_heads}, num_classes={self.num_classes!r}, "
                f"seed={self.seed})")

    # ------------------------------------------------------------ setup
    def bind(self, model):
        """Attach to `model` (its last Dense layer is the head); return self.

        `MetaModel(model, heads=...)` calls this, and hands this TaskHeads
        to its `InnerLoop` (which counts the heads' own steps,
        `own_step_count`). Marks the head as not meta-learned
        (`tfmeta.heads.head_meta_learned`), so exports record it.
        """
        if self.model is not None:
            if self.model is model:
                return self
            raise ConfigError(
                "This TaskHeads is already bound to another model: make one TaskHeads per MetaModel."
            )
        try:
            head, _ = find_head(model)
        except TypeError as error:
            raise ConfigError(
                f"TaskHeads needs a Sequential or functional model whose last layer is its "
                f"Dense head: {error}."
            ) from error
        trainable = model.trainable_variables
        owned = head.trainable_variables
        indices = tuple(i for i, v in enumerate(trainable) if any(v is w for w in owned))
        if not owned or len(indices) != len(owned):
            raise ConfigError(
                f"The head {head.name!r} is not trainable: per-task heads are trained in the "
                "inner loops. Set head.trainable = True."
            )
        if len(indices) == len(trainable):
            raise ConfigError(
                f"The model {model.name!r} has no trainable weights besides its head, so with "
                "TaskHeads there is no body to meta-learn: unfreeze the body."
            )
        if self.num_classes is not None:
            self._check_num_classes(head)
        self.model, self.head, self.indices = model, head, indices
        mark_not_meta_learned(head)
        return self

    def _check_num_classes(self, head):
        too_many = [n for n in self.num_classes if n > head.units]
        if too_many:
            raise ConfigError(
                f"TaskHeads(num_classes=...) asks for {max(too_many)} classes but the head "
                f"{head.name!r} has {head.units} units: make the head Dense(max(num_classes))."
            )
        if not head.use_bias:
            raise ConfigError(
                f"TaskHeads(num_classes=...) masks unused classes with the bias, but the head "
                f"{head.name!r} has use_bias=False: give it a bias."
            )
        activation = getattr(head.activation, "__name__", "")
        if activation not in ("linear", "softmax"):
            raise ConfigError(
                f"TaskHeads(num_classes=...) needs a head that outputs logits (no activation) "
                f"or softmax probabilities; {head.name!r} has activation {activation!r}."
            )

    def _bound(self):
        if self.model is None:
            raise RuntimeError("TaskHeads is not bound to a model: MetaModel(model, heads=...) binds it.")

    def exclude(self, learner):
        """`learner` transformed to meta-learn the body only (`ExcludeHeads`)."""
        self._bound()
        if isinstance(learner, ExcludeHeads) and learner.head_indices == self.indices:
            return learner
        return ExcludeHeads(learner, self.indices)

    def build(self, owner):
        """Create the bank: one variable `[num_heads, *shape]` of `owner` per head weight.

        Head h's rows are the head's initializers re-seeded with `seed + h`;
        unused classes get `UNUSED_CLASS_BIAS`. Made in the strategy's scope
        they are mirrored: one identical copy per replica.
        """
        self._bound()
        if self.bank:
            return self.bank
        trainable = self.model.trainable_variables
        for i in self.indices:
            variable = trainable[i]
            is_bias = variable is self.head.bias
            initializer = self.head.bias_initializer if is_bias else self.head.kernel_initializer
            value = np.stack([
                np.asarray(_seeded(initializer, self.seed + h)(variable.shape, variable.dtype))
                for h in range(self.num_heads)
            ])
            if is_bias:
                self._bias = len(self.bank)
                value = np.where(self.unused_classes(), UNUSED_CLASS_BIAS, value).astype(value.dtype)
            self.bank.append(owner.add_weight(
                name=f"task_heads_{variable.name}",
                shape=value.shape,
                dtype=variable.dtype,
                initializer=lambda shape, dtype, value=value: tf.constant(value, dtype),
                trainable=False,
            ))
        return self.bank

    def unused_classes(self):
        """`[num_heads, units]` bool: True where a head's class is unused (none without num_classes)."""
        self._bound()
        units = np.arange(self.head.units)
        counts = self.num_classes or [self.head.units] * self.num_heads
        return units[None, :] >= np.asarray(counts)[:, None]

    def head_weights(self, index):
        """Head `index`'s weights from the bank, as NumPy arrays aligned with the head's weights.

        Example::

            kernel, bias = heads.head_weights(0)
        """
        if not self.bank:
            raise RuntimeError("The bank does not exist yet: it is made when the MetaModel is built.")
        return [np.asarray(v.numpy()[index]) for v in self.bank]

    def optimizer_slots(self, optimizer):
        """Positions in `optimizer.variables` of the heads' slots (momentum, moments, ...).

        Found by identity, not by name: the optimizer (built on the model's
        trainable variables) keeps one list per slot kind aligned with those
        variables, and the heads' entries of every such list are theirs. An
        optimizer variable outside these lists that has a head weight's
        shape (a custom optimizer keeping slots its own way) cannot be told
        apart: a warning names it, and it is not restarted with the heads.

        Example::

            # Adam on [W1, b1, W2, b2]: [iterations, lr, m, v of W1, m, v of b1, ...]
            heads.optimizer_slots(adam)   # [6, 7, 8, 9]: m, v of W2 and b2
        """
        self._bound()
        if self._slots[0] is optimizer:
            return list(self._slots[1])
        trainable = self.model.trainable_variables
        try:
            rows = [optimizer._get_variable_index(trainable[i]) for i in self.indices]
        except KeyError:
            raise ConfigError(
                f"The optimizer {optimizer.name!r} was not built on the model's trainable "
                "variables: build it with optimizer.build(model.trainable_variables)."
            ) from None
        position = {id(v): j for j, v in enumerate(optimizer.variables)}
        lists = list(_slot_lists(optimizer))
        slots = sorted({position[id(kind[r])] for kind in lists for r in rows
                        if kind[r] is not None})
        listed = {id(s) for kind in lists for s in kind if s is not None}
        shapes = {tuple(trainable[i].shape) for i in self.indices}
        unknown = [v.name for v in optimizer.variables
                   if id(v) not in listed and tuple(v.shape) in shapes
                   and v is not optimizer._iterations]
        if unknown:
            logging.getLogger("tfmeta").warning(
                "TaskHeads: the inner optimizer %r has variables %s of a head weight's shape "
                "outside its per-variable slot lists, so they cannot be told to be the heads' "
                "and do not restart with them. Keep slots in lists aligned with the variables "
                "(Optimizer.add_optimizer_variables).", optimizer.name, unknown,
            )
        self._slots = (optimizer, slots)
        return list(slots)

    def own_step_count(self, optimizer, opt_vars, grads, params, index, stepped):
        """`stepped` (one inner step's `(params, opt_vars)`) with the heads' entries
        taken at the heads' own step count `index`.

        Used when the schedule keeps the inner optimizer's state across
        restarts (CTS without `hard_reset`): the heads' slots restart there,
        but the optimizer's one `iterations` counter does not. A head's steps
        since its slots restarted are the steps since the trajectory began,
        `index`, so the heads' update is the optimizer's step with
        `iterations = index`: Adam's bias correction (and a learning-rate
        schedule) starts afresh for a head, as for a new optimizer, while
        the body's continues. The counter in the result stays the body's.

        Example::

            params, opt_vars = heads.own_step_count(opt, opt_vars, grads, params, index,
                                                    stateless_apply(opt, opt_vars, grads, params))
        """
        self._bound()
        counter = next(j for j, v in enumerate(optimizer.variables)
                       if v is optimizer._iterations)
        own = list(opt_vars)
        own[counter] = tf.cast(index, own[counter].dtype)
        head_params, head_vars = stateless_apply(optimizer, own, grads, params)
        new_params, new_vars = (list(v) for v in stepped)
        for i in self.indices:
            new_params[i] = head_params[i]
        for j in self.optimizer_slots(optimizer):
            new_vars[j] = head_vars[j]
        return new_params, new_vars

    # ------------------------------------------------------------ the loop
    def check_ids(self, task_ids, num_tasks):
        """`task_ids` as int32 `[num_tasks]`, checked (a ConfigError names the fix)."""
        if task_ids is None:
            raise ConfigError(
                "This MetaModel has TaskHeads, so task batches must carry each task's source "
                "index: (x, y, task_ids), int32 task_ids of shape [T] "
                "(e.g. as_dataset(..., with_task_ids=True))."
            )
        task_ids = tf.convert_to_tensor(task_ids)
        if not task_ids.dtype.is_integer or task_ids.shape.rank != 1 or task_ids.shape[0] not in (
            None, num_tasks
        ):
            raise ConfigError(
                f"task_ids must be integers of shape [T] = [{num_tasks}] (one source index per "
                f"task), got {task_ids.dtype.name} of shape {task_ids.shape}."
            )
        task_ids = tf.cast(task_ids, tf.int32)
        in_range = tf.debugging.assert_less(
            task_ids, self.num_heads,
            message=f"task_ids must be in 0..{self.num_heads - 1} (TaskHeads(num_heads="
                    f"{self.num_heads})): give every source task an index below num_heads",
        )
        positive = tf.debugging.assert_non_negative(task_ids, message="task_ids must be >= 0")
        with tf.control_dependencies([in_range, positive]):
            return tf.identity(task_ids)

    def restart_params(self, phi, task_ids, num_tasks):
        """Where a trajectory restarts: phi, with each task's head from `bank[task_id]`.

        Returns a list aligned with phi: phi's body entries (unstacked) and,
        at the head entries, the gathered rows `[num_tasks, *shape]`.
        """
        ids = self.check_ids(task_ids, num_tasks)
        rows = iter([tf.gather(tf.convert_to_tensor(v.value), ids) for v in self.bank])
        return [next(rows) if i in self.indices else p for i, p in enumerate(phi)]

    def rows(self, params, finite, task_ids):
        """This replica's share of the bank write: per head weight the sum, per id, of its
        finite tasks' heads, and the count of those tasks per id (replica context)."""
        ids = self.check_ids(task_ids, finite.shape[0])
        sums = [
            tf.math.unsorted_segment_sum(
                tf.where(tf.reshape(finite, [-1] + [1] * (params[i].shape.rank - 1)),
                         params[i], tf.zeros_like(params[i])),
                ids, self.num_heads,
            )
            for i in self.indices
        ]
        counts = tf.math.unsorted_segment_sum(tf.cast(finite, tf.float32), ids, self.num_heads)
        return [*sums, counts]

    def write(self, strategy, rows):
        """Write the all-reduced `rows` into the bank (cross-replica context, via `merge_call`).

        Every row written is the mean of the finite heads with its id; rows
        no task had keep their value; unused classes get their bias back.
        """
        reduced = all_reduce_sum(
            strategy, [(r, v.value) for r, v in zip(rows, [*self.bank, self.bank[0]])]
        )
        *sums, counts = reduced
        for j, (variable, total) in enumerate(zip(self.bank, sums)):
            old = tf.convert_to_tensor(variable.value)
            count = tf.reshape(counts, [-1] + [1] * (old.shape.rank - 1))
            new = tf.where(count > 0, total / tf.cast(tf.maximum(count, 1.0), total.dtype), old)
            if j == self._bias and self.num_classes is not None:
                new = tf.where(self.unused_classes(), tf.cast(UNUSED_CLASS_BIAS, new.dtype), new)
            variable.assign(new)

