"""Continual Trajectory Shifting (Shin et al., ICML 2021)."""

import tensorflow as tf

from tfmeta.learners.base import MetaLearner, global_norm_squared
from tfmeta.learners.leap import Leap
from tfmeta.schedule import AfterUpdate, Schedule
from tfmeta.validation import ConfigError, check_flag, check_positive_int

SHIFTS = ("gradient", "none", "random", "accurate")


class ContinualTrajectoryShifting(MetaLearner):
    """Meta-update after every inner step and shift every task's trajectory by it.

    All task learners step together. Every `every` inner steps (Algorithm 2 of
    the CTS paper)::

        Delta  = -beta * mean_t MetaGrad(phi; theta_k^(t))   (the outer step)
        phi   <- phi + Delta
        theta_k^(t) <- theta_k^(t) + Delta   for every task   (the shift)

    and every K steps the task learners restart from phi. The trajectory
    length behind each meta-update therefore grows 1..K within each inner
    process: a built-in curriculum. `Delta` is the change the outer optimizer
    actually made to phi, so any Keras optimizer can be the outer one.

    Args:
        learner: the meta-gradient rule. It must need only the current task
            parameters: `Reptile()` (default) or `FOMAML()`. Leap needs the
            whole trajectory and cannot be shifted.
        every: meta-update period in inner steps (the reference's
            `aggregate_period`).
        shift: `"gradient"` (the method), or the paper's ablations:
            `"none"` (same schedule, no shift), `"random"` (a shift of the same
            global norm in a random direction), and `"accurate"` (the costly
            exact reference "Ours Accurate": after each meta-update every task
            restarts from phi and the next trajectory is one step longer, so
            U_k(phi + Delta_1 + ... + Delta_{k-1}) is computed exactly).
        hard_reset: rebuild the inner optimizer's state when tasks restart
            from phi every K steps. The reference code keeps it by default
            (`--hard_reset` rebuilds it); momentum is never shifted.

    Example:
        >>> learner = tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile())
        >>> meta.compile(optimizer=keras.optimizers.SGD(0.1),
        ...              inner_optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...              loss=loss, learner=learner, inner_steps=100)
    """

    def __init__(self, learner=None, every=1, shift="gradient", hard_reset=False):
        from tfmeta.learners.reptile import Reptile

        learner = Reptile() if learner is None else learner
        if not isinstance(learner, MetaLearner):
            made = isinstance(learner, type) and issubclass(learner, MetaLearner)
            raise ConfigError(
                f"ContinualTrajectoryShifting(learner={learner!r}) needs a tfmeta meta-learner "
                + (f"instance: pass {learner.__name__}()." if made else
                   "such as tfmeta.Reptile() or tfmeta.FOMAML() (in gin: @Reptile()).")
            )
        from tfmeta.learners.exclude import ExcludeHeads

        if isinstance(learner, ExcludeHeads):
            # The outer step keeps the heads only where ExcludeHeads is the
            # outermost learner: inside CTS they would move with phi.
            raise ConfigError(
                "ContinualTrajectoryShifting cannot wrap ExcludeHeads (the heads would move "
                "with every shift): wrap the CTS instead, ExcludeHeads("
                "ContinualTrajectoryShifting(Reptile()), head_indices).")
        if isinstance(learner, (Leap, ContinualTrajectoryShifting)):
            raise ValueError(
                f"ContinualTrajectoryShifting cannot wrap {type(learner).__name__}: its "
                "meta-gradient needs more than the current task parameters. Wrap "
                "Reptile() or FOMAML() instead."
            )
        if shift not in SHIFTS:
            raise ValueError(
                f"ContinualTrajectoryShifting(shift={shift!r}) is not supported: "
                f"choose one of {SHIFTS}."
            )
        self.learner = learner
        self.every = check_positive_int(
            "every", every, fix="ContinualTrajectoryShifting(every=...) is the meta-update "
            "period in inner steps, a whole number >= 1")
        self.shift_rule = shift
        self.hard_reset = check_flag("ContinualTrajectoryShifting(hard_reset=...)", hard_reset)
        if shift == "accurate":
            self.schedule = Schedule(after_update=AfterUpdate.GROW, reset_optimizer=True)
        else:
            self.schedule = Schedule(
                self.every, AfterUpdate.SHIFT, reset_optimizer=self.hard_reset
            )

    def init_state(self, params):
        return self.learner.init_state(params)

    def observe(self, state, step):
        return self.learner.observe(state, step)

    def meta_gradient(self, state, phi, params):
        return self.learner.meta_gradient(state, phi, params)

    def shift(self, params, delta, seed):
        if self.shift_rule == "gradient":
            return [p + d for p, d in zip(params, delta)]
        if self.shift_rule == "random":
            noise = [
                tf.random.stateless_normal(
                    tf.shape(d), seed=tf.random.experimental.stateless_fold_in(seed, i), dtype=d.dtype
                )
                for i, d in enumerate(delta)
            ]
            scale = tf.math.divide_no_nan(
                tf.sqrt(global_norm_squared(delta)), tf.sqrt(global_norm_squared(noise))
            )
            return [p + scale * n for p, n in zip(params, noise)]
        return params

    def get_config(self):
        return {
            "learner": self.learner,
            "every": self.every,
            "shift": self.shift_rule,
            "hard_reset": self.hard_reset,
        }
