"""`MetaModel`: a Keras model whose `fit` meta-learns an initialization.

The wrapped model's trainable weights are the initialization phi. Each
`train_step` advances the inner trajectories of a meta-batch of T tasks by a
chunk of S inner steps (a `tf.while_loop`, so the graph does not grow with the
chunk or with the trajectory length K), then, when the learner's schedule says
so, averages the tasks' meta-gradients and lets the outer optimizer update
phi. Task states (parameters, inner optimizer slots, non-trainable state such
as BatchNorm statistics and seeds, learner accumulators, the position in the
trajectory) live in variables between `train_step`s, so Keras
`steps_per_execution` fuses many chunks into one call and checkpoints capture
everything.

Task batch format (what `fit` consumes): `(x, y)` with
`x.shape == [T, S, B, *input_shape]` and `y.shape == [T, S, B, *label_shape]`:
T tasks, S inner steps of this chunk, B examples per inner step. Every chunk
of a trajectory must hold the same tasks in the same order; the task
distributions in `tfmeta.tasks` produce this stream.

Distribution (`tf.distribute.MirroredStrategy`, `MultiWorkerMirroredStrategy`;
see `tfmeta.distribute` and docs/performance.md): the T tasks of a task batch
are split along the task axis, T / R per replica. Each replica keeps the
states of ITS tasks in per-replica (`synchronization="on_read"`) variables
and runs their inner loops without communication; at a meta-update the
per-replica sums of the meta-gradients and of the float non-trainable state
(BatchNorm statistics) over finite tasks, and their counts, are all-reduced,
giving means over all T tasks (diverging tasks left out, see
`tfmeta.divergence`), and the outer optimizer updates phi once, in
cross-replica context. With one replica (no strategy) the same code runs.
"""

import contextlib
import math

import keras
import tensorflow as tf

from tfmeta.distribute import (
    check_jit_compile,
    check_steps_per_execution,
    distribute_task_batches,
)
from tfmeta import validation
from tfmeta.divergence import DivergenceGuard
from tfmeta.inner_optimizer import make_stateless, stateless_apply
from tfmeta.learners.base import InnerStep, MetaLearner


def _mean_loss(loss):
    """The task loss as a `keras.losses.Loss`, i.e. reduced to the batch mean.

    `keras.losses.get("mse")` is a per-example function; its gradient would be
    that of the batch sum.
    """
    loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss
    return _BatchMean(loss)


class _BatchMean(keras.losses.Loss):
    """A per-example loss function reduced to its mean over the batch."""

    def __init__(self, fn):
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


# Under a strategy with R replicas, Keras divides losses reduced to a mean by
# R (keras.losses.loss.scale_loss_for_distribution, applied to non-scalar
# per-example values): each replica would hold a shard of one global batch.
# A task's inner loss is not a shard.
_SCALED_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _unscaled(loss_fn, y_true, y_pred, value):
    """`value` = `loss_fn(y_true, y_pred)` without Keras' division by the replicas."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1 and getattr(loss_fn, "reduction", None) in _SCALED_REDUCTIONS:
        if _per_example(loss_fn, y_true, y_pred):
            value = value * tf.cast(replicas, value.dtype)
    return value


def _per_example(loss_fn, y_true, y_pred):
    """Whether `loss_fn.call` returns non-scalar values (which Keras then scales).

    Found from static shapes in a scratch graph: nothing is computed.
    """
    dtype = getattr(loss_fn, "dtype", None) or "float32"
    try:
        with tf.Graph().as_default():
            values = loss_fn.call(
                tf.compat.v1.placeholder(dtype, y_true.shape),
                tf.compat.v1.placeholder(dtype, y_pred.shape),
            )
        return tuple(values.shape) not in ((), (0,))
    except Exception:  # noqa: BLE001  (an unusual loss: assume Keras' convention)
        return True


def _is_seed_state(variable):
    return variable.path.endswith("seed_generator_state")


def _seed_offset(index):
    """The offset of task `index`'s seed state: `[index, 0]` (stacked if a vector)."""
    index = tf.convert_to_tensor(index)
    return tf.stack([index, tf.zeros_like(index)], axis=-1)


class MetaModel(keras.Model):
    """Meta-learn the initialization of `model` over a stream of task batches.

    Args:
        model: any built Keras model (Sequential, functional or subclassed).
            Its trainable weights are phi; after `fit` they hold the learned
            initialization, and its non-trainable float state (e.g. BatchNorm
            moving statistics) holds the task average at the last meta-update.

    Under a `tf.distribute` strategy, create the model and the MetaModel in
    its scope; each task batch's T tasks are split over the replicas (T must
    be a multiple of their number) and one meta-step gives the phi of one
    replica (see `tfmeta.distribute`, docs/performance.md).

    Example:
        >>> net = keras.Sequential([keras.Input((28, 28, 1)), ...,
        ...                         keras.layers.Dense(20)])
        >>> meta = tfmeta.MetaModel(net)
        >>> meta.compile(optimizer=keras.optimizers.SGD(0.1),
        ...              inner_optimizer=keras.optimizers.SGD(0.1),
        ...              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...              learner=tfmeta.Leap(), inner_steps=100)
        >>> meta.fit(task_batches, steps_per_epoch=100, epochs=10)
        >>> net.save("init.keras")     # or meta.export_initialization(...)
    """

    def __init__(self, model, name="meta_model", **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"MetaModel wraps a keras.Model, got {type(model).__name__}."
            )
        if not model.built:
            raise ValueError(
                "MetaModel needs a built model so that its weights (phi) exist: "
                "give the model an `Input`, or call `model.build(input_shape)` first."
            )
        strategy = tf.distribute.get_strategy()
        outside = [
            v.path for v in model.variables
            if not strategy.extended.variable_created_in_scope(getattr(v, "value", v))
        ]
        if outside:
            raise ValueError(
                f"MetaModel is created under {type(strategy).__name__}, but the wrapped "
                f"model's variables (e.g. {outside[0]}) were created outside its scope: "
                "create the model and the MetaModel inside the same `with strategy.scope():` "
                "(or copy the model there with tfmeta.distribute.in_scope(model, strategy))."
            )
        self.model = model
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
        **kwargs,
    ):
        """Configure meta-training.

        Args:
            optimizer: the outer (meta) optimizer that updates phi.
            inner_optimizer: the optimizer of each task's inner loop; any
                Keras optimizer (SGD with momentum/Nesterov, Adam, weight
                decay, ...) run statelessly, one copy of its state per task.
            loss: the task loss, a Keras loss (name, function or object).
            learner: a `tfmeta.learners.MetaLearner` (`Leap()`, `Reptile()`,
                `FOMAML()`, `ContinualTrajectoryShifting(...)`).
            inner_steps: K, the length of each task's inner trajectory.
            inner_unroll: inner steps unrolled per `tf.while_loop` iteration.
            vectorize_tasks: run the T tasks' inner steps as one vectorized
                computation (`tf.vectorized_map`) instead of T copies of the
                step in the graph. Much faster for small models; fails at trace
                time for ops `tf.vectorized_map` cannot batch over per-task
                weights (e.g. convolutions).
            **kwargs: passed to `keras.Model.compile` (`steps_per_execution`,
                `run_eagerly`, ...). `jit_compile` follows Keras: `"auto"`
                (default) compiles with XLA on a GPU and not on CPU-only
                machines (where XLA measured 2-10x slower) nor under a
                multi-replica strategy; `True`/`False` force it. `True` with
                more than one replica raises (see `tfmeta.distribute`).
        """
        if loss is None:
            raise ValueError(
                "MetaModel.compile needs the task `loss`, e.g. "
                "loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)."
            )
        if learner is None or not isinstance(learner, MetaLearner):
            raise ValueError(
                f"MetaModel.compile needs `learner`, a tfmeta meta-learner such as "
                f"tfmeta.Leap() or tfmeta.Reptile(); got {learner!r}."
            )
        if inner_steps is None or int(inner_steps) < 1:
            raise ValueError(
                f"inner_steps (K) must be an integer >= 1, got {inner_steps!r}."
            )
        if int(inner_unroll) < 1:
            raise ValueError(f"inner_unroll must be >= 1, got {inner_unroll!r}.")
        optimizer = self._in_strategy(keras.optimizers.get(optimizer))
        inner_optimizer = self._in_strategy(keras.optimizers.get(inner_optimizer))
        validation.check_learning_rate(optimizer, "optimizer", allow_zero=True)
        validation.check_learning_rate(inner_optimizer, "inner_optimizer", allow_zero=True)
        if inner_optimizer is optimizer:
            raise ValueError(
                "optimizer and inner_optimizer must be two optimizer objects: the "
                "inner one keeps one state per task, the outer one updates phi."
            )
        schedule = learner.schedule
        if schedule.update_every is not None and int(inner_steps) % schedule.update_every:
            raise ValueError(
                f"inner_steps={inner_steps} is not a multiple of the learner's "
                f"meta-update period ({schedule.update_every} steps): choose K as a "
                "multiple of it, so that every inner process ends on a meta-update."
            )
        if optimizer.built:
            raise ValueError(
                "The outer optimizer must not be built yet: pass a fresh optimizer "
                "object to MetaModel.compile (it is built on the wrapped model's weights)."
            )
        # The outer optimizer runs once per meta-update in cross-replica
        # context (see `_outer_update`), through Keras' backend-agnostic update
        # path: Keras' TensorFlow optimizer needs a replica context there.
        optimizer = make_stateless(optimizer)
        self.inner_optimizer = make_stateless(inner_optimizer)
        self.task_loss = _mean_loss(loss)
        self.learner = learner
        self.inner_steps = int(inner_steps)
        self.inner_unroll = int(inner_unroll)
        self.vectorize_tasks = bool(vectorize_tasks)
        check_jit_compile(kwargs.get("jit_compile", "auto"), self.distribute_strategy)
        check_steps_per_execution(kwargs.get("steps_per_execution", 1), self.distribute_strategy)
        super().compile(optimizer=optimizer, **kwargs)

    def _in_strategy(self, optimizer):
        """`optimizer`, or a fresh copy from its config if made outside the strategy.

        Keras' TensorFlow optimizer keeps the strategy current at its creation
        and creates its variables there; gin builds optimizers before training
        enters the strategy's scope.
        """
        strategy = self.distribute_strategy
        made_in = getattr(optimizer, "_distribution_strategy", strategy)
        if made_in is strategy or optimizer.built:
            return optimizer
        with strategy.scope():
            return type(optimizer).from_config(optimizer.get_config())

    def build(self, input_shape):
        """Create the task state for task batches of `input_shape`.

        `input_shape` is one replica's: under a strategy with R replicas Keras
        builds on the per-replica batch [T / R, S, B, ...], and the variables
        hold that replica's T / R tasks.
        """
        input_shape = tuple(input_shape)
        if len(input_shape) < 4:
            raise ValueError(
                f"MetaModel expects task batches x of shape [tasks, steps, batch, "
                f"*input_shape]; got a batch of shape {input_shape}. Use a "
                "tfmeta.tasks distribution's `as_dataset`, or stack per-task "
                "mini-batches accordingly."
            )
        validation.check_task_batch(self.model, input_shape)
        tasks, steps = input_shape[0], input_shape[1]
        if tasks is None or steps is None:
            raise ValueError(
                "The number of tasks and of inner steps per chunk must be static: "
                f"got x shape {input_shape}. Batch with drop_remainder=True."
            )
        self._check_chunk(int(steps))
        self.num_tasks = int(tasks)
        self.chunk_steps = int(steps)
        if not hasattr(self, "learner"):
            raise RuntimeError("Call MetaModel.compile(...) before fitting or building.")
        # Keras builds lazily, inside the first trace of the train function
        # when no distribution strategy is set: initial values are read eagerly.
        with tf.init_scope():
            self._build_task_state()
        super().build(input_shape)

    @property
    def num_replicas(self):
        """R, the replicas the tasks of a task batch are split over."""
        return self.distribute_strategy.num_replicas_in_sync

    @property
    def global_num_tasks(self):
        """T, the tasks of a whole task batch (`num_tasks` per replica)."""
        return self.num_tasks * self.num_replicas

    def _local_weight(self, name, shape, dtype, initializer, scope=None):
        """A variable each replica keeps its own copy of (its tasks, its position).

        `synchronization="on_read"`: reads and writes in a replica stay on that
        replica; read outside (checkpoints, `numpy()`) it gives replica 0's
        copy. Without a strategy it is a plain variable.
        """
        inner = keras.name_scope(scope) if scope else contextlib.nullcontext()
        with keras.name_scope(self.name, caller=self), inner:
            variable = keras.Variable(
                initializer=initializer,
                shape=shape,
                dtype=dtype,
                trainable=False,
                name=name,
                synchronization="on_read",
                aggregation="only_first_replica",
            )
        self._track_variable(variable)
        return variable

    def _build_task_state(self):
        self.inner_optimizer.build(self.model.trainable_variables)
        phi = self.model.trainable_variables
        state = self.learner.init_state([v.value for v in phi])
        self._learner_structure = state

        def stacked(name, value, dtype=None):
            value = tf.convert_to_tensor(value, dtype=dtype)
            return self._local_weight(
                name,
                (self.num_tasks, *value.shape),
                value.dtype.name,
                lambda shape, dtype: tf.stack([value] * self.num_tasks),
                scope="task_state",
            )

        self.task_params = [stacked(f"params_{i}", v.value) for i, v in enumerate(phi)]
        self.task_non_trainable = [
            stacked(f"non_trainable_{i}", v.value)
            for i, v in enumerate(self.model.non_trainable_variables)
        ]
        self.task_optimizer = [
            stacked(f"inner_optimizer_{i}", v.value)
            for i, v in enumerate(self.inner_optimizer.variables)
        ]
        self.task_learner = [
            stacked(f"learner_{i}", t) for i, t in enumerate(tf.nest.flatten(state))
        ]
        # Position in the current trajectory (steps since phi) and the current
        # trajectory length (grows 1..K for CTS's exact reference): identical
        # on every replica, each keeps its copy. The number of meta-updates is
        # written once per meta-update, in cross-replica context.
        self.position = self._local_weight("position", (), "int32", "zeros")
        self.trajectory_length = self._local_weight(
            "trajectory_length", (), "int32", keras.initializers.Constant(self._first_length())
        )
        self.meta_updates = self.add_weight(
            name="meta_updates", shape=(), dtype="int64", initializer="zeros", trainable=False
        )
        # Tasks left out of meta-updates for diverging (NaN/inf), and the
        # meta-updates skipped because every task diverged (tfmeta.divergence).
        self.skipped_tasks = self.add_weight(
            name="skipped_tasks", shape=(), dtype="int64", initializer="zeros", trainable=False
        )
        self.diverged_updates = self.add_weight(
            name="diverged_updates", shape=(), dtype="int64", initializer="zeros", trainable=False
        )
        self.shift_seed = keras.random.SeedGenerator(0, name="shift_seed")
        self._initial_optimizer_state = [
            tf.convert_to_tensor(v.value) for v in self.inner_optimizer.variables
        ]

    def _first_length(self):
        return 1 if self.learner.schedule.after_update == "grow" else self.inner_steps

    def _check_chunk(self, steps):
        schedule = self.learner.schedule
        if schedule.after_update == "grow":
            period = 1
        elif schedule.update_every is not None:
            period = schedule.update_every
        else:
            period = self.inner_steps
        if period % steps:
            raise ValueError(
                f"Task batches hold {steps} inner steps per chunk, which does not "
                f"divide the meta-update period of {period} steps "
                f"({self.learner!r}, inner_steps={self.inner_steps}). Produce chunks "
                f"of a divisor of {period} steps (e.g. steps_per_chunk={math.gcd(period, steps)})."
            )
        if steps % self.inner_unroll:
            raise ValueError(
                f"inner_unroll={self.inner_unroll} does not divide the {steps} inner "
                "steps per chunk."
            )

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

    # ------------------------------------------------------------- the loop
    def _task_step(self, state, x, y, index):
        """One inner step of one task. `state` = (params, non_trainable, opt, learner)."""
        params, non_trainable, opt_vars, learner_state = state
        with tf.GradientTape() as tape:
            tape.watch(params)
            y_pred, new_non_trainable, losses = self.model.stateless_call(
                params, non_trainable, x, training=True, return_losses=True
            )
            loss = _unscaled(self.task_loss, y, y_pred, self.task_loss(y, y_pred))
            if losses:
                loss = loss + tf.add_n(losses)
        grads = tape.gradient(loss, params)
        grads = [tf.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        learner_state = self.learner.observe(
            learner_state, InnerStep(list(params), grads, loss, index)
        )
        new_params, new_opt_vars = stateless_apply(
            self.inner_optimizer, opt_vars, grads, params
        )
        return (list(new_params), list(new_non_trainable), list(new_opt_vars), learner_state), loss

    def _read_tasks(self, start, first):
        """The stacked task states, restarted from phi where `start` is true.

        Every leaf has a leading task axis (this replica's tasks, the first of
        which has the global index `first`).
        """
        phi = [v.value for v in self.model.trainable_variables]
        fresh_learner = tf.nest.flatten(self.learner.init_state(phi))
        reset_opt = self.learner.schedule.reset_optimizer

        def read(variables, fresh, restart=True):
            values = []
            for var, value in zip(variables, fresh):
                stored = tf.convert_to_tensor(var.value)
                if restart:
                    value = tf.cast(value, stored.dtype)
                    if value.shape.rank < stored.shape.rank:
                        value = value[None]
                    stored = tf.where(start, tf.broadcast_to(value, tf.shape(stored)), stored)
                values.append(stored)
            return values

        params = read(self.task_params, phi)
        non_trainable = read(self.task_non_trainable, self._fresh_non_trainable(first))
        opt_vars = read(self.task_optimizer, self._initial_optimizer_state, reset_opt)
        if not reset_opt:
            opt_vars = self._reset_diverged(opt_vars, self._initial_optimizer_state, start)
        learner = read(self.task_learner, fresh_learner)
        learner = tf.nest.pack_sequence_as(self._learner_structure, learner)
        return (params, non_trainable, opt_vars, learner)

    def _reset_diverged(self, stored, fresh, start):
        """Inner optimizer states kept across a restart, except a diverged task's.

        Without `reset_optimizer` (CTS without hard_reset) a task keeps its
        slots (momentum, moments) when it restarts from phi; a task that
        diverged holds NaN/inf there and would diverge again at once, so its
        state restarts too (`tfmeta.divergence`).
        """
        if not stored:
            return stored
        finite = tf.reduce_all(
            tf.stack([
                tf.reduce_all(
                    tf.math.is_finite(tf.reshape(tf.cast(v, tf.float32), [self.num_tasks, -1])),
                    axis=1,
                )
                for v in stored
            ]),
            axis=0,
        )
        diverged = tf.logical_and(start, tf.logical_not(finite))
        values = []
        for value, initial in zip(stored, fresh):
            mask = tf.reshape(diverged, [-1] + [1] * (value.shape.rank - 1))
            initial = tf.broadcast_to(tf.cast(initial, value.dtype)[None], tf.shape(value))
            values.append(tf.where(mask, initial, value))
        return values

    def _fresh_non_trainable(self, first):
        """The model's non-trainable state for a restart, with one random stream per task.

        Every task gets the model's seed-generator states offset by its GLOBAL
        index (`first` + its index on this replica) in the first component, so
        the T tasks of a meta-batch draw different dropout masks (and each keeps
        advancing its own stream), whatever the number of replicas.
        """
        offsets = first + tf.range(self.num_tasks)
        values = []
        for var in self.model.non_trainable_variables:
            value = tf.convert_to_tensor(var.value)
            tiled = tf.broadcast_to(value[None], (self.num_tasks, *value.shape))
            if _is_seed_state(var):
                tiled = tiled + tf.cast(_seed_offset(offsets), tiled.dtype)
            values.append(tiled)
        return values

    def _write_tasks(self, tasks):
        variables = (
            self.task_params + self.task_non_trainable + self.task_optimizer + self.task_learner
        )
        for var, value in zip(variables, tf.nest.flatten(tasks)):
            var.assign(value)

    def _task(self, tasks, t):
        return tf.nest.map_structure(lambda v: v[t], tasks)

    def _inner_step(self, tasks, x, y, index):
        """One inner step of every task (stacked in, stacked out)."""

        def step(args):
            task, x_t, y_t = args
            return self._task_step(task, x_t, y_t, index)

        if self.vectorize_tasks:
            try:
                return tf.vectorized_map(step, (tasks, x, y), fallback_to_while_loop=False)
            except ValueError as error:
                raise ValueError(
                    "vectorize_tasks=True cannot batch this model's inner step over "
                    f"per-task weights ({error}). Compile with vectorize_tasks=False."
                ) from error
        outputs = [step((self._task(tasks, t), x[t], y[t])) for t in range(self.num_tasks)]
        return tf.nest.map_structure(lambda *v: tf.stack(v), *outputs)

    def _run_chunk(self, tasks, x, y):
        """Advance every task by the chunk's S inner steps."""
        position = tf.convert_to_tensor(self.position.value)

        def body(s, tasks, loss_sum, count):
            for u in range(self.inner_unroll):
                tasks, losses = self._inner_step(tasks, x[:, s + u], y[:, s + u], position + s + u)
                # The logged loss averages the finite losses: one diverged
                # task's NaN would hide every other task's progress.
                losses = tf.cast(losses, tf.float32)
                finite = tf.math.is_finite(losses)
                loss_sum = loss_sum + tf.reduce_sum(tf.where(finite, losses, 0.0))
                count = count + tf.reduce_sum(tf.cast(finite, tf.float32))
            return s + self.inner_unroll, tasks, loss_sum, count

        zero = tf.zeros((), tf.float32)
        if self.chunk_steps == self.inner_unroll:
            _, tasks, loss_sum, count = body(tf.constant(0), tasks, zero, zero)
        else:
            _, tasks, loss_sum, count = tf.while_loop(
                lambda s, *_: s < self.chunk_steps,
                body,
                (tf.constant(0), tasks, zero, zero),
                maximum_iterations=self.chunk_steps // self.inner_unroll,
            )
        # NaN when every loss diverged.
        return tasks, tf.math.divide_no_nan(loss_sum, count) + tf.where(count > 0, 0.0, float("nan"))

    def _contribution(self, tasks, phi, first):
        """This replica's share of a meta-update, over its FINITE tasks.

        A task whose meta-gradient, parameters or float state hold a NaN or
        inf (a diverging inner loop, bad data) is left out. Returns the sums
        over this replica's finite tasks of their meta-gradients and of their
        float non-trainable state (BatchNorm statistics), their number, and for
        integer state (seeds) the value of global task 0: seed states are task
        0's plus the task's offset, so every replica recovers it from its own
        first task. The sums and counts are summed over replicas, so the
        meta-gradient is the mean over every finite task of the meta-batch.
        """
        params, non_trainable, _, learner_state = tasks
        variables = self.model.non_trainable_variables
        floats = [i for i, v in enumerate(non_trainable) if v.dtype.is_floating]
        per_task, finite = [], []
        for t in range(self.num_tasks):
            grads = self.learner.meta_gradient(
                self._task(learner_state, t), phi, self._task(params, t)
            )
            values = [*grads, *(p[t] for p in params), *(non_trainable[i][t] for i in floats)]
            per_task.append(grads)
            finite.append(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values]))
        finite = tf.stack(finite)

        def finite_sum(stacked):
            mask = tf.reshape(finite, [-1] + [1] * (stacked.shape.rank - 1))
            return tf.reduce_sum(tf.where(mask, stacked, tf.zeros_like(stacked)), axis=0)

        grads = [finite_sum(tf.stack(g)) for g in zip(*per_task)]
        count = tf.reduce_sum(tf.cast(finite, tf.float32))
        state = []
        for i, (var, value) in enumerate(zip(variables, non_trainable)):
            if i in floats:
                state.append(finite_sum(value))
            elif _is_seed_state(var):
                state.append(value[0] - tf.cast(_seed_offset(first), value.dtype))
            else:
                state.append(value[0])
        return grads, count, state

    def _outer_update(self, strategy, due, grads, count, state):
        """The meta-update of phi, in cross-replica context (via `merge_call`).

        `due` is identical on every replica. When it holds, the replicas'
        sums of finite tasks' meta-gradients and their counts are all-reduced,
        and the outer optimizer steps phi once with the mean over every finite
        task; the float non-trainable state becomes the mean over them too.
        With no finite task the update is skipped (`diverged_updates` counts
        it; `tfmeta.divergence.DivergenceGuard` stops training).

        A replica context cannot hold this: Keras' TensorFlow optimizer and
        all-reduces call `merge_call`, which is not allowed inside a `tf.cond`,
        and an optimizer applied on every chunk is not a no-op when no update
        is due (Adam's moments, iterations). Here the optimizer runs its
        backend-agnostic rule on the averaged gradient; each variable
        assignment in cross-replica context updates every replica's copy.
        Returns the seed of this meta-update's shifts.
        """
        due = strategy.experimental_local_results(due)[0]
        phi_vars = self.model.trainable_variables
        variables = self.model.non_trainable_variables
        floats = [i for i, v in enumerate(variables) if "float" in v.dtype]
        shifts = self.learner.schedule.after_update == "shift"
        total = float(self.global_num_tasks)
        zero_seed = tf.zeros((2,), "int64")

        def first_replica(value):
            return strategy.experimental_local_results(value)[0]

        def update():
            reduced = strategy.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM,
                [(count, phi_vars[0].value)]
                + [(g, v.value) for g, v in zip(grads, phi_vars)]
                + [(state[i], variables[i].value) for i in floats],
            )
            reduced = [first_replica(r) for r in reduced]
            finite, sums = reduced[0], reduced[1:]
            self.skipped_tasks.assign_add(tf.cast(total - finite, "int64"))

            def apply():
                mean = [t / tf.cast(finite, t.dtype) for t in sums]
                self.optimizer.apply(mean[: len(phi_vars)], phi_vars)
                # The initialization's non-trainable state is the task average
                # of the float state (BatchNorm statistics); integer state
                # (seeds) follows global task 0 so that random streams keep
                # advancing across trajectories.
                for i, value in zip(floats, mean[len(phi_vars):]):
                    variables[i].assign(value)
                self.meta_updates.assign_add(1)
                return self.shift_seed.next() if shifts else zero_seed

            def skip():
                self.diverged_updates.assign_add(1)
                return zero_seed

            seed = tf.cond(finite > 0, apply, skip)
            for i, var in enumerate(variables):
                if i not in floats:
                    var.assign(first_replica(state[i]))
            return tf.cast(seed, "int64")  # the SeedGenerator's dtype

        return tf.cond(due, update, lambda: zero_seed)

    def _after_update(self, tasks, phi, position, length, seed, first):
        """Reset, shift or grow the tasks once phi has moved."""
        params, non_trainable, opt_vars, learner_state = tasks
        schedule = self.learner.schedule
        if schedule.after_update == "shift":
            # Delta is what the outer optimizer did to phi: identical on
            # every replica after the synchronized update.
            new_phi = [tf.convert_to_tensor(v.value) for v in self.model.trainable_variables]
            delta = [n - o for n, o in zip(new_phi, phi)]
            shifted = [
                self.learner.shift(
                    self._task(params, t),
                    delta,
                    tf.random.experimental.stateless_fold_in(seed, first + t),
                )
                for t in range(self.num_tasks)
            ]
            params = [tf.stack(v) for v in zip(*shifted)]
            position = tf.where(position >= self.inner_steps, 0, position)
        else:
            position = tf.zeros_like(position)
            if schedule.after_update == "grow":
                length = length % self.inner_steps + 1
        return (params, non_trainable, opt_vars, learner_state), position, length

    def _check_task_batch(self, x):
        """`x` with its static task count (multi-worker input leaves it unknown)."""
        tasks = x.shape[0]
        if tasks is not None and tasks != self.num_tasks:
            raise ValueError(
                f"This replica received task batches of {tasks} tasks, but the "
                f"MetaModel was built for {self.num_tasks} tasks per replica "
                f"({self.num_replicas} replica(s)): build it on the per-replica shape "
                "(or let fit build it) and keep the number of tasks per batch fixed."
            )
        return tf.ensure_shape(x, (self.num_tasks, *x.shape[1:]))

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if not self.built:
            self.build(x.shape)
        x = self._check_task_batch(x)
        if isinstance(y, tf.Tensor):
            y = self._check_task_batch(y)
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group
        static = tf.get_static_value(replica)
        replica = int(static) if static is not None else tf.cast(replica, tf.int32)
        first = replica * self.num_tasks  # global index of this replica's task 0
        phi = [tf.convert_to_tensor(v.value) for v in self.model.trainable_variables]
        tasks = self._read_tasks(tf.equal(self.position.value, 0), first)
        tasks, loss = self._run_chunk(tasks, x, y)
        position = self.position.value + self.chunk_steps

        schedule = self.learner.schedule
        if schedule.after_update == "shift":
            due = tf.equal(position % schedule.update_every, 0)
        else:
            due = position >= self.trajectory_length.value
        length = tf.convert_to_tensor(self.trajectory_length.value)
        # Synchronization points (all-reduce, optimizer) cannot sit inside a
        # tf.cond of a replica context: the cond is in the cross-replica merge.
        grads, count, state = self._contribution(tasks, phi, first)
        seed = context.merge_call(self._outer_update, args=(due, grads, count, state))
        tasks, position, length = tf.cond(
            due,
            lambda: self._after_update(tasks, phi, position, length, seed, first),
            lambda: (tasks, position, length),
        )
        self._write_tasks(tasks)
        self.position.assign(position)
        self.trajectory_length.assign(length)
        self.loss_tracker.update_state(loss)
        logs = {
            "loss": self.loss_tracker.result(),
            "meta_updates": self.meta_updates.value,
            "skipped_tasks": self.skipped_tasks.value,
        }
        strategy = self.distribute_strategy
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and getattr(
            strategy.extended, "_in_multi_worker_mode", lambda: False
        )():
            # Keras 3 reduces logs across workers along axis 0, which scalars
            # lack (tensorflow/tensorflow#72388): give them one.
            logs = {k: v[None] for k, v in logs.items()}
        return logs

    def fit(self, x=None, *args, shuffle=False, **kwargs):
        """`keras.Model.fit` on a stream of task batches (never shuffled).

        The chunks of a trajectory must arrive in order, so `shuffle` must stay
        False: task distributions shuffle tasks and examples themselves. Under
        a strategy with R replicas, a `tf.data.Dataset` of task batches is
        split along the task axis (`tfmeta.distribute.distribute_task_batches`):
        T must be a multiple of R. A `tfmeta.divergence.DivergenceGuard` is
        added to the callbacks (unless one is there): training stops with
        `DivergenceError` when every task of a meta-update diverged.
        """
        callbacks = kwargs.get("callbacks")
        if callbacks is None or isinstance(callbacks, (list, tuple)):
            callbacks = list(callbacks or [])
            if not any(isinstance(c, DivergenceGuard) for c in callbacks):
                callbacks.append(DivergenceGuard())
            kwargs["callbacks"] = callbacks
        if shuffle:
            raise ValueError(
                "MetaModel.fit consumes each trajectory's chunks in order: leave "
                "shuffle=False and let the task distribution shuffle tasks."
            )
        strategy = self.distribute_strategy
        if self._distribute_strategy is not None or strategy.num_replicas_in_sync > 1:
            if isinstance(x, tf.data.Dataset):
                # The distributed stream's cardinality is unknown: an epoch
                # is still the dataset once.
                size = int(x.cardinality())
                if size > 0 and kwargs.get("steps_per_epoch") is None:
                    kwargs["steps_per_epoch"] = size
                replicas = strategy.num_replicas_in_sync
                spec = x.element_spec
                x = distribute_task_batches(x, strategy)  # checks T % R
                self._replica_spec = tf.nest.map_structure(
                    lambda s: tf.TensorSpec((s.shape[0] // replicas, *s.shape[1:]), s.dtype),
                    spec,
                )
            elif not isinstance(x, tf.distribute.DistributedDataset):
                raise ValueError(
                    f"Under {type(strategy).__name__} MetaModel.fit needs task batches as "
                    "a tf.data.Dataset (e.g. a task distribution's as_dataset), got "
                    f"{type(x).__name__}: wrap arrays with tf.data.Dataset.from_tensor_slices."
                )
        return super().fit(x, *args, shuffle=False, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy Keras builds on the first batch averaged over the
        # replicas (`strategy.reduce`), which fails for (x, y) batches under
        # MultiWorkerMirroredStrategy (TF 2.21: reduce takes one tensor, not
        # a structure). The per-replica spec is all the task state needs.
        spec = getattr(self, "_replica_spec", None)
        if self._distribute_strategy is not None and data_batch is None and spec is not None:
            with self.distribute_strategy.scope():
                self._symbolic_build(data_batch=spec)
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def steps_for(self, meta_updates, steps_per_chunk=None):
        """How many task-batch chunks (train steps) `meta_updates` meta-updates take.

        Args:
            meta_updates: the number of meta-updates wanted.
            steps_per_chunk: S of the task batches (default: the built one).

        Example:
            >>> meta.fit(dataset, steps_per_epoch=meta.steps_for(1000, steps_per_chunk=10))
        """
        schedule = self.learner.schedule
        chunk = steps_per_chunk or getattr(self, "chunk_steps", None)
        if chunk is None:
            raise ValueError("steps_for needs steps_per_chunk until the MetaModel is built.")
        if schedule.after_update == "grow":
            K = self.inner_steps
            cycles, rest = divmod(int(meta_updates), K)
            inner = cycles * K * (K + 1) // 2 + rest * (rest + 1) // 2
        elif schedule.after_update == "shift":
            inner = int(meta_updates) * schedule.update_every
        else:
            inner = int(meta_updates) * self.inner_steps
        return -(-inner // chunk)

    def test_step(self, data):
        raise NotImplementedError(
            "MetaModel has no test_step: evaluate an initialization by fine-tuning "
            "it on held-out tasks (tfmeta.finetune)."
        )
