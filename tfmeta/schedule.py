"""A learner's timing: when meta-updates happen and what the tasks do after one.

`MetaModel` asks the learner's `Schedule` every timing question instead of
branching on modes: is a meta-update due (`due`), where the trajectory
stands once phi moved (`after`), whether task parameters are shifted
rather than restarted (`shifts`), how long the first trajectory is
(`first_length`), the meta-update period that chunks must divide
(`period`), and how many inner steps or chunks n meta-updates take
(`inner_steps_for`, `steps_for`). Three modes exist (`AfterUpdate`):

- `reset`: one meta-update after the K-th step of a trajectory; every task
  then restarts from the new phi (Leap, Reptile, FOMAML);
- `shift`: a meta-update every `update_every` inner steps; tasks continue,
  moved by `MetaLearner.shift`, and restart from phi every K steps (CTS);
- `grow`: like `reset`, but trajectories grow one step longer after each
  meta-update, cycling 1..K (CTS's exact reference, "accurate").

Example:
    >>> Schedule()                                       # reset
    >>> Schedule(update_every=1, after_update="shift", reset_optimizer=False)
    >>> Schedule(after_update="grow").steps_for(6, inner_steps=3, steps_per_chunk=1)
    12
    >>> Schedule(after_update="rest")
    ConfigError: Schedule(after_update='rest') is not a mode: choose one of 'reset', 'shift', 'grow'.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers

import tensorflow as tf

from tfmeta.validation import ConfigError, check_flag

__all__ = ["AfterUpdate", "Schedule"]


class AfterUpdate(str, enum.Enum):
    """What the tasks do once phi moved (equal to its string: `AfterUpdate.SHIFT == "shift"`)."""

    RESET = "reset"
    SHIFT = "shift"
    GROW = "grow"


_MODES = ", ".join(repr(m.value) for m in AfterUpdate)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When meta-updates happen and what happens to task learners after one.

    Attributes:
        update_every: with `after_update="shift"`, meta-update every this many
            inner steps (K must be a multiple of it); `None` for the other
            modes, which meta-update once per trajectory, after its last step.
        after_update: an `AfterUpdate` or its name: `"reset"` (every task
            restarts from the new phi), `"shift"` (tasks continue, moved by
            `MetaLearner.shift`; they restart from phi every K steps), or
            `"grow"` (restart from phi, and the next trajectory is one step
            longer, cycling 1..K: CTS's exact reference).
        reset_optimizer: whether the inner optimizer's state (momentum, Adam
            moments) is rebuilt when a task restarts from phi.

    Raises:
        ConfigError: for an unknown mode, or an `update_every` that is not
            an integer >= 1 with `"shift"` (or is given with another mode).
    """

    update_every: int | None = None
    after_update: AfterUpdate = AfterUpdate.RESET
    reset_optimizer: bool = True

    def __post_init__(self):
        try:
            mode = AfterUpdate(self.after_update)
        except ValueError:
            raise ConfigError(
                f"Schedule(after_update={self.after_update!r}) is not a mode: choose one "
                f"of {_MODES}."
            ) from None
        object.__setattr__(self, "after_update", mode)
        # Not bool(): reset_optimizer="no" would reset it.
        object.__setattr__(self, "reset_optimizer",
                           check_flag("Schedule(reset_optimizer=...)", self.reset_optimizer))
        every = self.update_every
        if mode is AfterUpdate.SHIFT:
            if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
                raise ConfigError(
                    f"Schedule(after_update='shift') meta-updates every update_every inner "
                    f"steps: give update_every an integer >= 1, got {every!r}."
                )
            object.__setattr__(self, "update_every", int(every))
        elif every is not None:
            raise ConfigError(
                f"Schedule(update_every={every!r}, after_update={mode.value!r}): "
                f"update_every applies to after_update='shift' only; with "
                f"{mode.value!r} the meta-update follows the trajectory's last step, so "
                "leave update_every=None."
            )

    # --------------------------------------------------------- static facts
    @property
    def shifts(self):
        """Whether tasks continue after a meta-update, moved by `MetaLearner.shift`."""
        return self.after_update is AfterUpdate.SHIFT

    def first_length(self, inner_steps):
        """The length of the first trajectory: K, or 1 when trajectories grow."""
        return 1 if self.after_update is AfterUpdate.GROW else inner_steps

    def period(self, inner_steps):
        """The fewest inner steps between two meta-updates: chunks must divide it."""
        if self.after_update is AfterUpdate.GROW:
            return 1
        if self.shifts:
            return self.update_every
        return inner_steps

    def inner_steps_for(self, meta_updates, inner_steps):
        """The inner steps (per task) that `meta_updates` meta-updates take."""
        meta_updates = int(meta_updates)
        if self.after_update is AfterUpdate.GROW:
            cycles, rest = divmod(meta_updates, inner_steps)
            return cycles * inner_steps * (inner_steps + 1) // 2 + rest * (rest + 1) // 2
        return meta_updates * self.period(inner_steps)

    def steps_for(self, meta_updates, inner_steps, steps_per_chunk):
        """The task-batch chunks (train steps) that `meta_updates` meta-updates take."""
        return -(-self.inner_steps_for(meta_updates, inner_steps) // steps_per_chunk)

    # ----------------------------------------------------------- the checks
    def check_inner_steps(self, inner_steps):
        """Refuse a K that a trajectory's meta-updates do not end on."""
        if self.shifts and inner_steps % self.update_every:
            raise ConfigError(
                f"inner_steps={inner_steps} is not a multiple of the learner's "
                f"meta-update period ({self.update_every} steps): choose K as a "
                "multiple of it, so that every inner process ends on a meta-update."
            )

    def check_chunk(self, steps_per_chunk, inner_steps, learner=None):
        """Refuse chunks of S inner steps that would straddle a meta-update."""
        period = self.period(inner_steps)
        if period % steps_per_chunk:
            raise ConfigError(
                f"Task batches hold {steps_per_chunk} inner steps per chunk, which does not "
                f"divide the meta-update period of {period} steps "
                f"({learner!r}, inner_steps={inner_steps}). Produce chunks "
                f"of a divisor of {period} steps (e.g. "
                f"steps_per_chunk={math.gcd(period, steps_per_chunk)})."
            )

    # ------------------------------------------------- in the train step
    def due(self, position, length):
        """Whether a meta-update follows the chunk that ended at `position` (a tensor)."""
        if self.shifts:
            return tf.equal(position % self.update_every, 0)
        return position >= length

    def after(self, position, length, inner_steps):
        """`(position, length)` once phi moved: where the next chunk starts."""
        if self.shifts:
            # Tasks go on within their K steps, and restart from phi after them.
            return tf.where(position >= inner_steps, 0, position), length
        position = tf.zeros_like(position)
        if self.after_update is AfterUpdate.GROW:
            length = length % inner_steps + 1
        return position, length
