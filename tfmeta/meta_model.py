"""`MetaModel`: a Keras model whose `fit` meta-learns an initialization.

The wrapped model's trainable weights are the initialization phi. Each
`train_step` reads the task states of a meta-batch of T tasks
(`tfmeta.task_state`), advances their inner trajectories by a chunk of S
inner steps (`tfmeta.inner_loop`), and, when the learner's schedule says so
(`tfmeta.schedule`), averages the tasks' meta-gradients and lets the outer
optimizer update phi; then it writes the task states back. They live in
variables between `train_step`s (parameters, inner optimizer slots,
non-trainable state such as BatchNorm statistics and seeds, learner
accumulators, the position in the trajectory), so Keras
`steps_per_execution` fuses many chunks into one call and checkpoints
capture everything. Keras runs whole executions, so `fit` refuses a
`steps_per_epoch` that is not a multiple of `steps_per_execution` unless the
stream is known to end within the epoch
(`tfmeta.replicas.check_whole_executions`): the last execution would run
train steps past the epoch's end.

Task batch format (what `fit` consumes): `(x, y)` with
`x.shape == [T, S, B, *input_shape]` and `y.shape == [T, S, B, *label_shape]`:
T tasks, S inner steps of this chunk, B examples per inner step. Every chunk
of a trajectory must hold the same tasks in the same order; the task
distributions in `tfmeta.tasks` produce this stream.

Distribution (`tf.distribute.MirroredStrategy`, `MultiWorkerMirroredStrategy`):
the T tasks of a task batch are split along the task axis, T / R per
replica; each runs its tasks' inner loops alone, and a meta-update averages
over all T tasks (`tfmeta.replicas`, `tfmeta.distribute`, docs/performance.md).
"""

import re

import keras
import numpy as np
import tensorflow as tf

from tfmeta import replicas, validation
from tfmeta.distribute import (
    check_jit_compile,
    check_steps_per_execution,
    inner_loop_xla,
    replica_devices,
)
from tfmeta.divergence import DEFAULT_MAX_TASK_LOSS, DivergenceGuard
from tfmeta.inner_loop import InnerLoop, check_vectorize, mean_loss
from tfmeta.inner_optimizer import make_stateless
from tfmeta.input_options import without_autotuning
from tfmeta.learners.base import MetaLearner
from tfmeta.outer_step import OuterStep
from tfmeta.task_heads import TaskHeads, unpack_task_batch
from tfmeta.task_state import TaskState
from tfmeta.validation import ConfigError


class MetaModel(replicas.SplitTaskBatches, keras.Model):
    """Meta-learn the initialization of `model` over a stream of task batches.

    Args:
        model: any built Keras model (Sequential, functional or subclassed)
            with trainable weights. They are phi; after `fit` they hold the
            learned initialization, and its non-trainable float state (e.g.
            BatchNorm moving statistics) holds the task average at the last
            meta-update.
        heads: a `tfmeta.TaskHeads` for one head per source task, trained in
            the inner loops and left out of meta-learning (task batches then
            carry task ids third: `(x, y, task_ids)`); None
            (default): the model's head is meta-learned like every weight.

    Under a `tf.distribute` strategy, create the model and the MetaModel in
    its scope; each task batch's T tasks are split over the replicas (T must
    be a multiple of their number) and one meta-step gives the phi of one
    replica (see `tfmeta.distribute`, docs/performance.md).

    With `steps_per_execution=N` (a `compile` argument), `fit`'s
    `steps_per_epoch` must be a multiple of N: Keras runs every execution
    whole, so `steps_per_epoch=10` with N=4 would run 12 train steps per
    epoch on an endless stream (more inner steps, and maybe meta-updates,
    than asked). `fit` raises a `ConfigError` before any step instead. It
    accepts what Keras runs exactly: no `steps_per_epoch`, or a stream of
    known length (a dataset's `cardinality()`, arrays) of at most
    `steps_per_epoch` task batches. A stream of unknown length (after
    `filter`, `flat_map`, `from_generator`) is refused too, naming its
    fixes: `ds.apply(tf.data.experimental.assert_cardinality(n))` if it
    ends within the epoch, else a multiple of N.

    Example:
        >>> net = keras.Sequential([keras.Input((28, 28, 1)), ...,
        ...                         keras.layers.Dense(20)])
        >>> meta = tfmeta.MetaModel(net)
        >>> meta.compile(optimizer=keras.optimizers.SGD(0.1),
        ...              inner_optimizer=keras.optimizers.SGD(0.1),
        ...              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...              learner=tfmeta.Leap(), inner_steps=100)
        >>> meta.fit(task_batches, steps_per_epoch=100, epochs=10)
        >>> net.save("init.keras")     # or tfmeta.export_initialization(...)
    """

    def __init__(self, model, name="meta_model", heads=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(model, keras.Model):
            raise TypeError(f"MetaModel wraps a keras.Model, got {type(model).__name__}.")
        if not model.built:
            raise ConfigError(
                "MetaModel needs a built model so that its weights (phi) exist: "
                "give the model an `Input`, or call `model.build(input_shape)` first."
            )
        validation.check_trainable(model)
        replicas.check_created_in_scope(model)
        self.model = model
        if heads is not None and not isinstance(heads, TaskHeads):
            made = isinstance(heads, type) and issubclass(heads, TaskHeads)
            raise ConfigError(
                f"heads={heads!r} must be a TaskHeads instance: "
                + ("call it, heads=tfmeta.TaskHeads(num_tasks)." if made else
                   "heads=tfmeta.TaskHeads(num_tasks), one head per source task."))
        self.heads = None if heads is None else heads.bind(model)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    # ------------------------------------------------------------------ setup
    def compile(
        self,
        optimizer="sgd",
        inner_optimizer="sgd",
        loss=None,
        learner=None,
        inner_steps=None,
        inner_unroll=1,
        vectorize_tasks=False,
        task_shards=1,
        max_task_loss=DEFAULT_MAX_TASK_LOSS,
        **kwargs,
    ):
        """Configure meta-training.

        Args:
            optimizer: the outer (meta) optimizer that updates phi.
            inner_optimizer: the optimizer of each task's inner loop; any
                Keras optimizer (SGD with momentum/Nesterov, Adam, weight
                decay, ...) run statelessly, one copy of its state per task.
            loss: the task loss, a Keras loss (name, function or object),
                computed in the dtype of the model's weights or wider (a
                float64 model needs e.g. `MeanSquaredError(dtype="float64")`).
            learner: a `tfmeta.learners.MetaLearner` (`Leap()`, `Reptile()`,
                `FOMAML()`, `ContinualTrajectoryShifting(...)`).
            inner_steps: K, the length of each task's inner trajectory.
            inner_unroll: inner steps unrolled per `tf.while_loop` iteration.
            vectorize_tasks: how the T tasks of a task batch run their inner
                step. False: T copies of the step in the graph (graph and
                build time grow with T). True: one computation whose graph
                does not grow with T (`tfmeta.task_batched`: Dense, Conv2D,
                DepthwiseConv2D, BatchNorm, pooling, dropout, ... for the T
                parameter sets at once; `tf.vectorized_map` for models it
                cannot walk, e.g. subclassed ones, which fails at trace time
                for ops it cannot batch). "auto": one computation where the
                model allows it, else copies, with a warning naming the
                layer. Equal to the copies to float rounding
                (docs/performance.md, "Tasks as one computation").
            task_shards: with `vectorize_tasks`, split the T tasks into this
                many computations that run side by side (an int >= 1, or
                "auto": the CPU cores over each op's threads and the
                replicas, at most T, so 1 under TensorFlow's default threads;
                1 where a GPU is visible). For a small convnet on 2 cores,
                `task_shards="auto"` with `TF_NUM_INTRAOP_THREADS=1` ran
                2.6-2.8x the T copies at default threads (docs/performance.md,
                "Shards, threads").
            max_task_loss: an inner loss above this (in absolute value) counts
                as diverged, like NaN or inf: the task is left out of the
                meta-update and of the logged loss (`tfmeta.divergence`).
                `None` leaves only NaN and inf out.
            **kwargs: passed to `keras.Model.compile` (`steps_per_execution`,
                `run_eagerly`, ...), except `jit_compile`: XLA compiles each
                replica's chunk of inner steps on the replica's device (the
                all-reduce, the outer update and the variables stay outside),
                with any number of replicas. `"auto"` (default): XLA when every
                replica is a GPU, none on CPU (measured 12-20x slower there);
                `True`: XLA on any device, CPUs included; `False`: none.
                `inner_jit_compile` tells which was chosen (Keras' own
                `jit_compile` stays False). Mixed precision works without loss
                scaling: `auto_scale_loss=True` is refused (docs/design.md,
                "Inner optimizers").
        """
        self._check_compile_arguments(loss, learner, inner_steps, inner_unroll, kwargs)
        if self.heads is not None:
            learner = self.heads.exclude(learner)  # the learner sees the body only
        jit_compile = kwargs.pop("jit_compile", "auto")
        check_jit_compile(jit_compile)
        self.inner_jit_compile = inner_loop_xla(
            jit_compile, replica_devices(self.distribute_strategy), kwargs.get("run_eagerly", False)
        )
        optimizer, self.inner_optimizer = self._optimizers(optimizer, inner_optimizer)
        self.task_loss = mean_loss(validation.resolve_loss(loss))
        validation.check_loss_dtype(self.task_loss, self.model)
        self.learner = learner
        self.inner_steps = int(inner_steps)
        self.inner_unroll = int(inner_unroll)
        self.vectorize_tasks = check_vectorize(vectorize_tasks)
        self.max_task_loss = validation.check_max_task_loss(max_task_loss)
        self.inner_loop = InnerLoop(
            self.model, self.task_loss, learner, self.inner_optimizer,
            unroll=self.inner_unroll, vectorize=self.vectorize_tasks, task_shards=task_shards,
            max_task_loss=self.max_task_loss, jit_compile=self.inner_jit_compile,
            heads=self.heads,
        )
        check_steps_per_execution(kwargs.get("steps_per_execution", 1), self.distribute_strategy)
        # Keras' own XLA would compile the whole train function, strategy.run,
        # all-reduce and variables of every replica included: the inner loop
        # is compiled per replica instead (`inner_jit_compile`).
        super().compile(optimizer=optimizer, auto_scale_loss=False, jit_compile=False, **kwargs)

    @property
    def schedule(self):
        """The learner's `tfmeta.schedule.Schedule`: when meta-updates happen."""
        return self.learner.schedule

    def _check_compile_arguments(self, loss, learner, inner_steps, inner_unroll, kwargs):
        if loss is None:
            raise ConfigError(
                "MetaModel.compile needs the task `loss`, e.g. "
                "loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)."
            )
        if learner is None or not isinstance(learner, MetaLearner):
            raise ConfigError(
                f"MetaModel.compile needs `learner`, a tfmeta meta-learner such as "
                f"tfmeta.Leap() or tfmeta.Reptile(); got {learner!r}."
            )
        # Not int(): inner_steps=2.5 would quietly become K = 2.
        if (isinstance(inner_steps, bool) or not isinstance(inner_steps, (int, np.integer))
                or inner_steps < 1):
            raise ConfigError(
                f"inner_steps (K) must be an integer >= 1, got {inner_steps!r}: set it to the "
                "length of each task's inner trajectory, e.g. inner_steps=100."
            )
        validation.check_positive_int("inner_unroll", inner_unroll)
        if inner_steps < learner.min_inner_steps:
            raise ConfigError(
                f"{type(learner).__name__} needs inner_steps >= {learner.min_inner_steps}, got "
                f"{inner_steps}: K inner steps give it K - 1 path increments (the first step "
                f"only records where the path starts), so K = {inner_steps} would never move "
                f"phi. Set inner_steps to {learner.min_inner_steps} or more."
            )
        learner.schedule.check_inner_steps(int(inner_steps))
        indices = getattr(learner, "head_indices", None)
        count = len(self.model.trainable_variables)
        if indices is not None and count and self.heads is None and (
                max(indices) >= count or len(indices) >= count):
            raise ConfigError(
                f"ExcludeHeads(head_indices={list(indices)}) must name some, not all, of the "
                f"model's {count} trainable variables (positions 0..{count - 1} in "
                "model.trainable_variables): give the head's positions, e.g. the last two.")
        for name in ("metrics", "weighted_metrics", "loss_weights"):
            if kwargs.get(name) is not None:
                # train_step never updates them: Keras fails at the first result().
                raise ConfigError(
                    f"MetaModel.compile does not take {name}=: meta-training logs loss, "
                    "meta_updates and skipped_tasks; measure accuracy by fine-tuning the "
                    "initialization (tfmeta.finetune, tfmeta.evaluation.heldout_finetuning)."
                )
        reduction = getattr(validation.resolve_loss(loss), "reduction", "sum_over_batch_size")
        if reduction not in ("sum_over_batch_size", "mean"):
            raise ConfigError(
                f"the task loss has reduction={reduction!r}: each inner step needs the batch "
                "mean (a sum scales the step by the batch size, None gives per-example "
                "losses); leave reduction at its default, 'sum_over_batch_size'."
            )
        execution = kwargs.get("steps_per_execution", 1)
        validation.check_positive_int(
            "steps_per_execution", execution,
            fix="it is the train steps (task-batch chunks) per call of the compiled train "
                "function, e.g. 1 or 10")
        if self.built and hasattr(self, "task_state"):
            # The task state and the inner optimizer were built for the first compile.
            raise ConfigError(
                "this MetaModel was already built by fit (its task states and inner optimizer "
                "belong to the first compile): to change the compile settings, wrap the "
                "network again, tfmeta.MetaModel(meta.model), and compile that."
            )
        if kwargs.pop("auto_scale_loss", False):
            raise ConfigError(
                "MetaModel.compile does not take auto_scale_loss=True: the outer optimizer "
                "steps with a meta-gradient, not a loss gradient, so there is no loss to "
                "scale; leave auto_scale_loss out."
            )

    def _optimizers(self, optimizer, inner_optimizer):
        """The outer and inner optimizers, checked, in the strategy, made stateless."""
        strategy = self.distribute_strategy
        optimizer = replicas.in_strategy(keras.optimizers.get(optimizer), strategy)
        inner_optimizer = replicas.in_strategy(keras.optimizers.get(inner_optimizer), strategy)
        validation.check_learning_rate(optimizer, "optimizer", allow_zero=True)
        validation.check_learning_rate(inner_optimizer, "inner_optimizer", allow_zero=True)
        if inner_optimizer is optimizer:
            raise ConfigError(
                "optimizer and inner_optimizer must be two optimizer objects: the "
                "inner one keeps one state per task, the outer one updates phi."
            )
        if optimizer.built:
            raise ConfigError(
                "The outer optimizer must not be built yet: pass a fresh optimizer "
                "object to MetaModel.compile (it is built on the wrapped model's weights)."
            )
        # The outer optimizer runs once per meta-update in cross-replica
        # context (see `tfmeta.outer_step`), through Keras' backend-agnostic update
        # path: Keras' TensorFlow optimizer needs a replica context there.
        return make_stateless(optimizer), make_stateless(inner_optimizer)

    def build(self, input_shape):
        """Create the task state for task batches of `input_shape`.

        `input_shape` is one replica's: under a strategy with R replicas Keras
        builds on the per-replica batch [T / R, S, B, ...], and the variables
        hold that replica's T / R tasks.
        """
        input_shape = tuple(input_shape)
        if len(input_shape) < 4:
            raise ConfigError(
                f"MetaModel expects task batches x of shape [tasks, steps, batch, "
                f"*input_shape]; got a batch of shape {input_shape}. Use a "
                "tfmeta.tasks distribution's `as_dataset`, or stack per-task "
                "mini-batches accordingly."
            )
        validation.check_task_batch(self.model, input_shape)
        tasks, steps = input_shape[0], input_shape[1]
        if tasks is None or steps is None:
            raise ConfigError(
                "The number of tasks and of inner steps per chunk must be static: "
                f"got x shape {input_shape}. Batch with drop_remainder=True."
            )
        if not hasattr(self, "learner"):
            raise RuntimeError("Call MetaModel.compile(...) before fitting or building.")
        self.schedule.check_chunk(int(steps), self.inner_steps, self.learner)
        if int(steps) % self.inner_unroll:
            raise ConfigError(
                f"inner_unroll={self.inner_unroll} does not divide the {steps} inner "
                "steps per chunk."
            )
        self.num_tasks = int(tasks)
        self.chunk_steps = int(steps)
        # Keras builds lazily, inside the first trace of the train function
        # when no distribution strategy is set: initial values are read eagerly.
        with tf.init_scope():
            self._build_state()
        super().build(input_shape)

    def _build_state(self):
        self.inner_optimizer.build(self.model.trainable_variables)
        self.task_state = TaskState(
            self, self.model, self.inner_optimizer, self.learner, self.num_tasks, self.heads
        )
        # Position in the current trajectory (steps since phi) and the current
        # trajectory length (grows 1..K for CTS's exact reference): identical
        # on every replica, each keeps its copy. The number of meta-updates is
        # written once per meta-update, in cross-replica context.
        self.position = replicas.local_variable(self, "position", (), "int32", "zeros")
        first_length = keras.initializers.Constant(self.schedule.first_length(self.inner_steps))
        self.trajectory_length = replicas.local_variable(
            self, "trajectory_length", (), "int32", first_length
        )
        # Tasks left out of meta-updates for diverging (NaN/inf), and the
        # meta-updates skipped because every task diverged (tfmeta.divergence).
        counters = {}
        for name in ("meta_updates", "skipped_tasks", "diverged_updates"):
            counters[name] = self.add_weight(
                name=name, shape=(), dtype="int64", initializer="zeros", trainable=False
            )
            setattr(self, name, counters[name])
        self.shift_seed = counters["shift_seed"] = keras.random.SeedGenerator(0, name="shift_seed")
        self.outer_step = OuterStep(
            self.model, self.learner, self.optimizer, self.task_state, self.global_num_tasks,
            counters, self.heads,
        )

    # The stacked task variables, by their names before `tfmeta.task_state`.
    task_params = property(lambda self: self.task_state.params)
    task_non_trainable = property(lambda self: self.task_state.non_trainable)
    task_optimizer = property(lambda self: self.task_state.optimizer)
    task_learner = property(lambda self: self.task_state.learner_state)

    @property
    def num_replicas(self):
        """R, the replicas the tasks of a task batch are split over."""
        return self.distribute_strategy.num_replicas_in_sync

    @property
    def global_num_tasks(self):
        """T, the tasks of a whole task batch (`num_tasks` per replica)."""
        return self.num_tasks * self.num_replicas

    def call(self, x, training=False):
        """Predictions of the initialization phi.

        Accepts plain batches `[B, *input_shape]` and task batches
        `[T, S, B, *input_shape]` (Keras builds the model on the latter).
        """
        rank = len(x.shape)
        model_rank = self._model_input_rank()
        if model_rank is not None and rank == model_rank + 2:
            lead = tf.shape(x)[:3]
            flat = tf.reshape(x, tf.concat([[-1], tf.shape(x)[3:]], 0))
            y = self.model(flat, training=training)
            return tf.reshape(y, tf.concat([lead, tf.shape(y)[1:]], 0))
        return self.model(x, training=training)

    def _model_input_rank(self):
        try:
            return len(self.model.inputs[0].shape)
        except (AttributeError, IndexError, TypeError, ValueError):
            return None

    # -------------------------------------------------------- the train step
    def train_step(self, data):
        """Read the task states, run the chunk, contribute, update phi, write the states."""
        x, task_ids, y = self._task_batch(data)
        y = self._checked_class_ids(y)
        first = replicas.first_task(self.num_tasks)  # global index of this replica's task 0
        phi = [tf.convert_to_tensor(v.value) for v in self.model.trainable_variables]
        tasks = self.task_state.read(
            restart=tf.equal(self.position.value, 0), first=first, task_ids=task_ids
        )
        tasks, loss = self.inner_loop.run(tasks, x, y, tf.convert_to_tensor(self.position.value))
        position = self.position.value + self.chunk_steps
        length = tf.convert_to_tensor(self.trajectory_length.value)
        due = self.schedule.due(position, length)
        # Synchronization points (all-reduce, optimizer) cannot sit inside a
        # tf.cond of a replica context: the cond is in the cross-replica merge.
        contribution = self.outer_step.contribution(tasks, phi, first, task_ids)
        seed = tf.distribute.get_replica_context().merge_call(
            self.outer_step.update, args=(due, *contribution)
        )
        tasks, position, length = tf.cond(
            due,
            lambda: self._after_update(tasks, phi, position, length, seed, first),
            lambda: (tasks, position, length),
        )
        self.task_state.write(tasks)
        self.position.assign(position)
        self.trajectory_length.assign(length)
        self.loss_tracker.update_state(loss)
        logs = {
            "loss": self.loss_tracker.result(),
            "meta_updates": self.meta_updates.value,
            "skipped_tasks": self.skipped_tasks.value,
        }
        return replicas.worker_logs(logs, self.distribute_strategy)

    def _checked_class_ids(self, y):
        """`y`, after an op that refuses labels outside the model's classes (sparse losses).

        Under XLA and on GPUs no kernel checks them: a task with such a label
        would only be skipped as diverged (`skipped_tasks`), with no reason given.
        """
        units = validation.output_units(self.model)
        if (units is None or not isinstance(y, tf.Tensor) or not y.dtype.is_integer
                or not validation.is_sparse_loss(self.task_loss)):
            return y
        with tf.control_dependencies([validation.assert_class_ids(y, units)]):
            return tf.identity(y)

    def _task_batch(self, data):
        """`(x, task_ids, y)` of a task batch, with the static task count (builds on first use)."""
        x, task_ids, y = unpack_task_batch(data, self.heads)
        if not self.built:
            self.build(x.shape)
        x = self._with_task_count(x)
        if isinstance(y, tf.Tensor):
            y = self._with_task_count(y)
        if task_ids is not None:
            task_ids = self._with_task_count(task_ids)
        return x, task_ids, y

    def _with_task_count(self, x):
        """`x` with its static task count (multi-worker input leaves it unknown)."""
        tasks = x.shape[0]
        if tasks is not None and tasks != self.num_tasks:
            raise ConfigError(
                f"This replica received task batches of {tasks} tasks, but the "
                f"MetaModel was built for {self.num_tasks} tasks per replica "
                f"({self.num_replicas} replica(s)): build it on the per-replica shape "
                "(or let fit build it) and keep the number of tasks per batch fixed."
            )
        return tf.ensure_shape(x, (self.num_tasks, *x.shape[1:]))

    def _after_update(self, tasks, phi, position, length, seed, first):
        """Shift the tasks (when the schedule does) and move on in the trajectory."""
        if self.schedule.shifts:
            params, non_trainable, opt_vars, learner_state = tasks
            params = self.outer_step.shift(params, phi, seed, first)
            tasks = (params, non_trainable, opt_vars, learner_state)
        position, length = self.schedule.after(position, length, self.inner_steps)
        return tasks, position, length

    # ------------------------------------------------------------------ fit
    def fit(self, *args, **kwargs):
        """`keras.Model.fit` on a stream of task batches (never shuffled).

        The chunks of a trajectory must arrive in order, so `shuffle` must stay
        False: task distributions shuffle tasks and examples themselves. A
        task stream (a `tf.data.Dataset`) carries its labels and batch size
        and has no example weights: `y`, `batch_size`, `sample_weight` and
        `class_weight` with one are a `ConfigError` (Keras would drop them
        under a strategy). The task batches are checked against the model
        and the loss first (`tfmeta.validation`). Under a strategy with R
        replicas, a `tf.data.Dataset` of task batches is split along the
        task axis (`tfmeta.distribute.distribute_task_batches`): T must be
        a multiple of R. A `tfmeta.divergence.DivergenceGuard` is added to
        the callbacks (unless one is there): training stops with
        `DivergenceError` when every task of a meta-update diverged.
        `steps_per_epoch` must be a multiple of `steps_per_execution` unless
        the stream is known to end within the epoch
        (`replicas.check_whole_executions`). Arguments count by position or
        name, as in `keras.Model.fit`. Refused before any step, in one line
        naming the fix: `validation_data` / `validation_split` (evaluate by
        fine-tuning instead), an endless stream without `steps_per_epoch`
        (unless `keras.config.max_steps_per_epoch` caps the epoch), a task
        distribution's stream built for another `inner_steps`, arrays without
        a `batch_size` (T) dividing their tasks; a label outside the model's
        classes or a task id beyond its `TaskHeads` found by a step ends
        `fit` with a `ConfigError` saying so.
        """
        if not hasattr(self, "learner"):
            raise ConfigError("Call MetaModel.compile(...) before fitting or building.")
        arguments = replicas.fit_arguments(self, *args, **kwargs)
        _check_epochs(arguments.get("epochs", 1), arguments.get("initial_epoch", 0))
        if arguments.setdefault("shuffle", False):
            raise ConfigError(
                "MetaModel.fit consumes each trajectory's chunks in order: leave "
                "shuffle=False and let the task distribution shuffle tasks."
            )
        for name in ("validation_data", "validation_split"):
            if arguments.get(name):
                # Keras would find out only at the end of the first epoch.
                raise ConfigError(
                    f"MetaModel.fit does not take {name}=: a meta-learned initialization is "
                    "evaluated by fine-tuning it on held-out tasks (tfmeta.finetune, or "
                    "tfmeta.evaluation.heldout_finetuning after fit); leave it out."
                )
        x = arguments.get("x")
        if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
            _check_stream_arguments(arguments)
            validation.check_inner_steps_of(x, self.inner_steps)
        _check_steps_per_epoch(x, arguments.get("steps_per_epoch"))
        _check_array_batch_size(x, arguments.get("batch_size"))
        replicas.check_fit_executions(self, arguments)
        callbacks = arguments.get("callbacks")
        if isinstance(callbacks, keras.callbacks.Callback):
            callbacks = [callbacks]  # as Keras takes it: it still gets its DivergenceGuard
        _check_callbacks(callbacks)
        if callbacks is None or isinstance(callbacks, (list, tuple)):
            callbacks = list(callbacks or [])
            if not any(isinstance(c, DivergenceGuard) for c in callbacks):
                callbacks.append(DivergenceGuard())
            arguments["callbacks"] = callbacks
        validation.check_task_batches(
            self.model, getattr(self, "task_loss", None), x, arguments.get("y")
        )
        arguments["x"] = without_autotuning(x)
        try:
            return super().fit(**arguments)
        except tf.errors.InvalidArgumentError as error:
            reason = _bad_task_batch(error, self.model)
            if reason is None:
                raise
            raise ConfigError(reason) from None

    def steps_for(self, meta_updates, steps_per_chunk=None):
        """How many task-batch chunks (train steps) `meta_updates` meta-updates take.

        Args:
            meta_updates: the number of meta-updates wanted.
            steps_per_chunk: S of the task batches (default: the built one).

        Example:
            >>> meta.fit(dataset, steps_per_epoch=meta.steps_for(1000, steps_per_chunk=10))
        """
        validation.check_positive_int("meta_updates", meta_updates)
        if not hasattr(self, "learner"):
            raise ConfigError("Call MetaModel.compile(...) before steps_for: it counts by the "
                              "learner's schedule and inner_steps.")
        chunk = steps_per_chunk or getattr(self, "chunk_steps", None)
        if chunk is None:
            raise ConfigError("steps_for needs steps_per_chunk until the MetaModel is built.")
        return self.schedule.steps_for(meta_updates, self.inner_steps, chunk)

    def checkpoint_settings(self):
        """What a run resumed from a checkpoint of this one must share, beyond the variables'
        shapes: K, the inner steps per chunk and the learner's settings (`tfmeta.checkpoint`)."""
        return {"inner_steps": self.inner_steps, "steps_per_chunk": self.chunk_steps,
                "learner": self.learner.settings()}

    def save(self, *args, **kwargs):
        raise ConfigError(
            "a MetaModel is not saved as a whole (Keras cannot serialize the wrapper): export "
            "the initialization, tfmeta.export_initialization(meta.model, path) (or "
            "meta.model.save(...)), and checkpoint runs with tfmeta.checkpoint.MetaCheckpoint."
        )

    def test_step(self, data):
        raise NotImplementedError(
            "MetaModel has no test_step: evaluate an initialization by fine-tuning "
            "it on held-out tasks (tfmeta.finetune)."
        )


_NO_WEIGHTS = ("meta-training weighs no examples (a task batch's third element is its task "
               "ids, for TaskHeads)")
#: `fit` arguments a task stream makes meaningless, and why.
_STREAM_CARRIES = {
    "y": "the task batches carry their labels ((x, y) or (x, y, task_ids))",
    "batch_size": "the task batches carry their B examples per inner step (the task "
                  "distribution's batch_size)",
    "sample_weight": _NO_WEIGHTS,
    "class_weight": _NO_WEIGHTS,
}


def _check_steps_per_epoch(x, steps):
    """Refuse a `steps_per_epoch` that is not a count, and none for an endless stream
    (Keras would run its first epoch forever)."""
    fix = ("pass steps_per_epoch=meta.steps_for(meta_updates, steps_per_chunk=S), the train "
           "steps (chunks) of that many meta-updates")
    if steps is not None:
        validation.check_positive_int("steps_per_epoch", steps, fix)
    elif (isinstance(x, tf.data.Dataset) and keras.config.max_steps_per_epoch() is None
          and int(x.cardinality()) == int(tf.data.INFINITE_CARDINALITY)):
        raise ConfigError(
            "MetaModel.fit got an endless stream of task batches (task distributions repeat "
            f"forever) and no steps_per_epoch, so its first epoch would never end: {fix}."
        )


def _check_array_batch_size(x, batch_size):
    """Arrays of tasks `[N, S, B, ...]` are batched by Keras along N: the batch is T
    tasks, and must be whole (a partial last batch has no static T)."""
    if isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)) or not hasattr(x, "shape"):
        return
    tasks = int(x.shape[0])
    whole = isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
    if not whole or batch_size < 1 or tasks % int(batch_size):
        raise ConfigError(
            f"MetaModel.fit on arrays takes each meta-batch's T tasks from their first axis "
            f"(batch_size={batch_size!r}): pass batch_size=T, a divisor of the {tasks} tasks "
            f"in x (e.g. batch_size={tasks})."
        )


def _bad_task_batch(error, model):
    """The one-line fix for `error` if a task batch's values are what the step refused
    (found only when it runs, e.g. in a later batch of a stream), else None: a
    sparse loss's label outside the model's classes, or a task id beyond `TaskHeads`."""
    heads = re.search(r"(task_ids must be [^\n\]]*)", str(error))
    if heads is not None:
        return f"a task batch has task ids out of range: {heads.group(1)}."
    ours = re.search(re.escape(validation.LABELS_OUT_OF_RANGE) + r"\] \[(-?\d+)\] \[(-?\d+)\] \[(\d+)\]",
                     str(error))
    if ours is not None:  # validation.assert_class_ids: the lowest and highest label
        low, high, units = (int(v) for v in ours.groups())
        label = high if high >= units else low
    else:  # the CPU kernel's own check
        match = re.search(r"label value of (-?\d+) which is outside the valid range of \[0, (\d+)\)",
                          str(error))
        if match is None:
            return None
        label, units = int(match.group(1)), int(match.group(2))
    if label >= units:
        fix = f"give the model's head at least {label + 1} units, or use tasks with fewer classes"
    else:
        fix = "labels must be class ids 0..units-1"
    return (f"a task batch has label {label} but the model {model.name!r} has {units} outputs "
            f"(classes 0..{units - 1}): {fix}.")


def _check_epochs(epochs, initial_epoch):
    """Refuse epochs that would run nothing (Keras returns an empty History)."""
    epochs = validation.check_positive_int("epochs", epochs)
    initial_epoch = validation.check_positive_int("initial_epoch", initial_epoch, minimum=0)
    if initial_epoch >= epochs:
        raise ConfigError(
            f"epochs={epochs} with initial_epoch={initial_epoch} would run no epoch: epochs is "
            f"the index to stop before, not a count; pass epochs=initial_epoch + n (e.g. "
            f"epochs={initial_epoch + 1})."
        )


def _check_callbacks(callbacks):
    """Refuse callbacks that would fail only after the first epoch's work."""
    for callback in callbacks or ():
        if isinstance(callback, keras.callbacks.ModelCheckpoint) and not callback.save_weights_only:
            raise ConfigError(
                "ModelCheckpoint would save the whole MetaModel, which Keras cannot serialize "
                "(it fails after the first epoch): checkpoint runs with "
                "tfmeta.checkpoint.MetaCheckpoint (resumable), or pass save_weights_only=True; "
                "save the initialization with tfmeta.export_initialization(meta.model, path)."
            )


def _check_stream_arguments(arguments):
    """Refuse `fit` arguments that a stream of task batches makes meaningless (`_STREAM_CARRIES`)."""
    given = [name for name in _STREAM_CARRIES if arguments.get(name) is not None]
    if given:
        name = given[0]
        raise ConfigError(
            f"MetaModel.fit got {name}= with a stream of task batches, which Keras would "
            f"ignore or misread: {_STREAM_CARRIES[name]}. Leave {name} out."
        )
