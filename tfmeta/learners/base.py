"""The meta-learner interface: how a task's inner trajectory becomes a meta-gradient.

A meta-learner is a small object with one rule. `MetaModel` owns the loop: it
runs every task's inner steps, hands each step to `observe`, and when a
meta-update is due asks `meta_gradient` for each task's contribution, averages
it over tasks and gives it to the outer (meta) optimizer.

Parameters are lists of tensors aligned with the wrapped model's
`trainable_variables`. Learner state is a dict of tensors per task; its
structure and shapes must not depend on the step, so that the loop can carry
it through `tf.while_loop` and keep it in variables between `train_step`s
(the trajectory length K never enters the graph).
"""

from typing import NamedTuple

import tensorflow as tf

from tfmeta.schedule import Schedule


class InnerStep(NamedTuple):
    """What one inner step of one task saw.

    Attributes:
        params: theta_i, the task parameters where `loss` and `grads` were
            evaluated (before the step is taken).
        grads: g_i = grad f_i(theta_i), one tensor per trainable variable.
        loss: f_i, the scalar mini-batch loss at theta_i.
        index: i, the 0-based position of the step in the task's trajectory
            (int32 scalar tensor; 0 right after a reset to phi).
    """

    params: list
    grads: list
    loss: tf.Tensor
    index: tf.Tensor


class MetaLearner:
    """Base class: turn inner trajectories into a meta-gradient.

    Subclasses override `meta_gradient` and, where they need more than the
    final task parameters, `init_state` and `observe`. `schedule` (a
    `tfmeta.schedule.Schedule`) says when meta-updates happen; the default
    is one per trajectory, after its K-th step, every task then restarting
    from phi.
    """

    schedule = Schedule()
    #: The shortest trajectory (K) whose meta-gradient can be nonzero;
    #: `MetaModel.compile` refuses a shorter one.
    min_inner_steps = 1

    def settings(self):
        """The learner's class and its settings, as JSON values (what a resumed run must share).

        Its attributes that are numbers, strings, bools or tuples of them, and
        the settings of a wrapped learner, e.g. `{"class": "Leap", "norm": True, ...}`.
        """
        out = {"class": type(self).__name__}
        for name, value in sorted(vars(self).items()):
            if isinstance(value, MetaLearner):
                out[name] = value.settings()
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value
            elif isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value):
                out[name] = list(value)
        return out

    def init_state(self, params):
        """Per-task accumulator at the start of a trajectory (a dict of tensors)."""
        del params
        return {}

    def observe(self, state, step):
        """Update the accumulator with one inner step (an `InnerStep`)."""
        del step
        return state

    def meta_gradient(self, state, phi, params):
        """This task's meta-gradient (a list aligned with `phi`).

        Args:
            state: the accumulator after the observed steps.
            phi: the current initialization.
            params: the task's current parameters theta_k.
        """
        raise NotImplementedError

    def shift(self, params, delta, seed):
        """Where task parameters go after a meta-update moved phi by `delta`.

        Only called when the schedule shifts (`schedule.shifts`).
        """
        del delta, seed
        return params

    def get_config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def zeros_like_all(tensors):
    return [tf.zeros_like(t) for t in tensors]


def global_norm_squared(tensors):
    """Sum of squares over all tensors (the norm over ALL parameters)."""
    # Not tf.nn.l2_loss (one pass instead of two): tf.vectorized_map has no
    # converter for it, so the batched inner step (tfmeta.task_batched) would
    # run the learner's observe as a while loop over the tasks.
    return tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors])
