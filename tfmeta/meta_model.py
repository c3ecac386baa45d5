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
"""

import math

import keras
import tensorflow as tf

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


class MetaModel(keras.Model):
    """Meta-learn the initialization of `model` over a stream of task batches.

    Args:
        model: any built Keras model (Sequential, functional or subclassed).
            Its trainable weights are phi; after `fit` they hold the learned
            initialization, and its non-trainable float state (e.g. BatchNorm
            moving statistics) holds the task average at the last meta-update.

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
                `jit_compile`, `run_eagerly`, ...).
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
        optimizer = keras.optimizers.get(optimizer)
        inner_optimizer = keras.optimizers.get(inner_optimizer)
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
        self.inner_optimizer = make_stateless(inner_optimizer)
        self.task_loss = _mean_loss(loss)
        self.learner = learner
        self.inner_steps = int(inner_steps)
        self.inner_unroll = int(inner_unroll)
        self.vectorize_tasks = bool(vectorize_tasks)
        super().compile(optimizer=optimizer, **kwargs)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 4:
            raise ValueError(
                f"MetaModel expects task batches x of shape [tasks, steps, batch, "
                f"*input_shape]; got a batch of shape {input_shape}. Use a "
                "tfmeta.tasks distribution's `as_dataset`, or stack per-task "
                "mini-batches accordingly."
            )
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

    def _build_task_state(self):
        self.inner_optimizer.build(self.model.trainable_variables)
        phi = self.model.trainable_variables
        state = self.learner.init_state([v.value for v in phi])
        self._learner_structure = state

        def stacked(name, value, dtype=None):
            value = tf.convert_to_tensor(value, dtype=dtype)
            return self.add_weight(
                name=name,
                shape=(self.num_tasks, *value.shape),
                dtype=value.dtype,
                initializer=lambda shape, dtype: tf.stack([value] * self.num_tasks),
                trainable=False,
            )

        with keras.name_scope("task_state", caller=self):
            self.task_params = [
                stacked(f"params_{i}", v.value) for i, v in enumerate(phi)
            ]
            self.task_non_trainable = [
                stacked(f"non_trainable_{i}", v.value)
                for i, v in enumerate(self.model.non_trainable_variables)
            ]
            self.task_optimizer = [
                stacked(f"inner_optimizer_{i}", v.value)
                for i, v in enumerate(self.inner_optimizer.variables)
            ]
            self.task_learner = [
                stacked(f"learner_{i}", t)
                for i, t in enumerate(tf.nest.flatten(state))
            ]
        # Position in the current trajectory (steps since phi), the current
        # trajectory length (grows 1..K for CTS's exact reference), and the
        # number of meta-updates so far.
        self.position = self.add_weight(
            name="position", shape=(), dtype="int32", initializer="zeros", trainable=False
        )
        self.trajectory_length = self.add_weight(
            name="trajectory_length",
            shape=(),
            dtype="int32",
            initializer=keras.initializers.Constant(self._first_length()),
            trainable=False,
        )
        self.meta_updates = self.add_weight(
            name="meta_updates", shape=(), dtype="int64", initializer="zeros", trainable=False
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
            loss = self.task_loss(y, y_pred)
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

    def _read_tasks(self, start):
        """The stacked task states, restarted from phi where `start` is true.

        Every leaf has a leading task axis T.
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
        non_trainable = read(self.task_non_trainable, self._fresh_non_trainable())
        opt_vars = read(self.task_optimizer, self._initial_optimizer_state, reset_opt)
        learner = read(self.task_learner, fresh_learner)
        learner = tf.nest.pack_sequence_as(self._learner_structure, learner)
        return (params, non_trainable, opt_vars, learner)

    def _fresh_non_trainable(self):
        """The model's non-trainable state for a restart, with one random stream per task.

        Every task gets the model's seed-generator states offset by its index in
        the first component, so the T tasks of a meta-batch draw different
        dropout masks (and each keeps advancing its own stream).
        """
        offsets = tf.range(self.num_tasks)
        values = []
        for var in self.model.non_trainable_variables:
            value = tf.convert_to_tensor(var.value)
            tiled = tf.broadcast_to(value[None], (self.num_tasks, *value.shape))
            if var.path.endswith("seed_generator_state"):
                offset = tf.stack([offsets, tf.zeros_like(offsets)], axis=1)
                tiled = tiled + tf.cast(offset, tiled.dtype)
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

        def body(s, tasks, loss_sum):
            for u in range(self.inner_unroll):
                tasks, losses = self._inner_step(tasks, x[:, s + u], y[:, s + u], position + s + u)
                loss_sum = loss_sum + tf.reduce_sum(tf.cast(losses, tf.float32))
            return s + self.inner_unroll, tasks, loss_sum

        loss_sum = tf.zeros((), tf.float32)
        if self.chunk_steps == self.inner_unroll:
            _, tasks, loss_sum = body(tf.constant(0), tasks, loss_sum)
        else:
            _, tasks, loss_sum = tf.while_loop(
                lambda s, *_: s < self.chunk_steps,
                body,
                (tf.constant(0), tasks, loss_sum),
                maximum_iterations=self.chunk_steps // self.inner_unroll,
            )
        return tasks, loss_sum / float(self.chunk_steps * self.num_tasks)

    def _meta_update(self, tasks, position):
        """Average meta-gradients, step phi, then reset, shift or grow the tasks."""
        params, non_trainable, opt_vars, learner_state = tasks
        phi_vars = self.model.trainable_variables
        phi = [tf.convert_to_tensor(v.value) for v in phi_vars]
        per_task = [
            self.learner.meta_gradient(self._task(learner_state, t), phi, self._task(params, t))
            for t in range(self.num_tasks)
        ]
        grads = [tf.add_n(list(g)) / float(self.num_tasks) for g in zip(*per_task)]
        self.optimizer.apply(grads, phi_vars)
        new_phi = [tf.convert_to_tensor(v.value) for v in phi_vars]
        delta = [n - o for n, o in zip(new_phi, phi)]
        # The initialization's non-trainable state is the task average of the
        # float state (BatchNorm statistics); integer state (seeds) follows task 0
        # so that random streams keep advancing across trajectories.
        for var, value in zip(self.model.non_trainable_variables, non_trainable):
            if value.dtype.is_floating:
                var.assign(tf.reduce_mean(value, axis=0))
            else:
                var.assign(value[0])
        self.meta_updates.assign_add(1)

        schedule = self.learner.schedule
        length = tf.convert_to_tensor(self.trajectory_length.value)
        if schedule.after_update == "shift":
            seed = self.shift_seed.next()
            shifted = [
                self.learner.shift(
                    self._task(params, t), delta, tf.random.experimental.stateless_fold_in(seed, t)
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

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if not self.built:
            self.build(x.shape)
        tasks = self._read_tasks(tf.equal(self.position.value, 0))
        tasks, loss = self._run_chunk(tasks, x, y)
        position = self.position.value + self.chunk_steps

        schedule = self.learner.schedule
        if schedule.after_update == "shift":
            due = tf.equal(position % schedule.update_every, 0)
        else:
            due = position >= self.trajectory_length.value
        length = tf.convert_to_tensor(self.trajectory_length.value)
        tasks, position, length = tf.cond(
            due,
            lambda: self._meta_update(tasks, position),
            lambda: (tasks, position, length),
        )
        self._write_tasks(tasks)
        self.position.assign(position)
        self.trajectory_length.assign(length)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result(), "meta_updates": self.meta_updates.value}

    def fit(self, *args, shuffle=False, **kwargs):
        """`keras.Model.fit` on a stream of task batches (never shuffled).

        The chunks of a trajectory must arrive in order, so `shuffle` must stay
        False: task distributions shuffle tasks and examples themselves.
        """
        if shuffle:
            raise ValueError(
                "MetaModel.fit consumes each trajectory's chunks in order: leave "
                "shuffle=False and let the task distribution shuffle tasks."
            )
        return super().fit(*args, shuffle=False, **kwargs)

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
