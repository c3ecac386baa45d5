"""`ExcludeHeads`: a learner transformation that meta-learns only the body.

Per-task heads (`tfmeta.TaskHeads`) are trained in every task's inner loop
but are not part of the initialization: the CTS reference code leaves each
source's classifier ("fc") out of meta-learning, and Leap's multi-headed
setups do too. `ExcludeHeads(learner, head_indices)` hands `learner` the
body entries only (the parameter lists without the entries at
`head_indices`), so the learner never sees a head parameter: Reptile's
phi - theta_K, FOMAML's gradients and Leap's path length (its norm over ALL
parameters is over the body's) are those of the body, exactly as if the
heads were not parameters at all.

Example::

    learner = ExcludeHeads(tfmeta.Leap(), head_indices=(4, 5))
    learner.meta_gradient(state, phi, params)   # zeros at 4 and 5
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import tensorflow as tf

from tfmeta.learners.base import InnerStep, MetaLearner
from tfmeta.validation import ConfigError

__all__ = ["ExcludeHeads"]


class ExcludeHeads(MetaLearner):
    """`learner` on the body's parameters only; the head entries are left alone.

    Args:
        learner: the meta-learner of the body (any `MetaLearner`).
        head_indices: positions of the head parameters in the parameter
            lists (the wrapped model's `trainable_variables`).

    `init_state`, `observe`, `meta_gradient` and `shift` strip the head
    entries before delegating; `meta_gradient` gives zeros at the head
    entries, `shift` leaves them as they are, and `schedule` is `learner`'s.
    `tfmeta.OuterStep` applies the outer optimizer to the body's variables
    only, so the head variables of phi never move (no momentum, no weight
    decay). `MetaModel(model, heads=TaskHeads(...))` wraps its learner with
    this itself; used alone, every task's head restarts from phi's head.

    Example:
        >>> learner = ExcludeHeads(tfmeta.Reptile(), head_indices=(2, 3))
        >>> learner.meta_gradient({}, phi, params)[2]   # zeros like phi[2]
    """

    def __init__(self, learner, head_indices):
        if not isinstance(learner, MetaLearner):
            raise TypeError(
                f"ExcludeHeads wraps a tfmeta meta-learner (e.g. tfmeta.Leap()), got {learner!r}."
            )
        if isinstance(learner, ExcludeHeads):
            raise ValueError(
                "ExcludeHeads cannot wrap another ExcludeHeads: its head_indices refer to "
                "the whole parameter list. Wrap the plain learner once, with every head index."
            )
        # Not int(): 2.7 would be parameter 2, and "23" parameters 2 and 3.
        if isinstance(head_indices, (str, bytes)) or not isinstance(head_indices, Iterable) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in head_indices):
            raise ConfigError(
                f"ExcludeHeads needs head_indices, the positions of the head parameters in "
                f"model.trainable_variables as integers, e.g. (2, 3); got {head_indices!r}."
            )
        indices = tuple(sorted({int(i) for i in head_indices}))
        if not indices or indices[0] < 0:
            raise ValueError(
                f"ExcludeHeads needs the non-negative positions of the head parameters, got "
                f"{tuple(head_indices)!r}."
            )
        self.learner = learner
        self.head_indices = indices

    @property
    def schedule(self):
        return self.learner.schedule

    @property
    def min_inner_steps(self):
        return self.learner.min_inner_steps

    def body(self, values):
        """The entries of `values` that are not heads (a list)."""
        return [v for i, v in enumerate(values) if i not in self.head_indices]

    def _with_heads(self, body, heads):
        """`body` with `heads[i]` put back at every head index i."""
        body = iter(body)
        size = len(heads)
        return [heads[i] if i in self.head_indices else next(body) for i in range(size)]

    def init_state(self, params):
        return self.learner.init_state(self.body(params))

    def observe(self, state, step):
        body = InnerStep(self.body(step.params), self.body(step.grads), step.loss, step.index)
        return self.learner.observe(state, body)

    def meta_gradient(self, state, phi, params):
        body = self.learner.meta_gradient(state, self.body(phi), self.body(params))
        return self._with_heads(body, [tf.zeros_like(p) for p in phi])

    def shift(self, params, delta, seed):
        body = self.learner.shift(self.body(params), self.body(delta), seed)
        return self._with_heads(body, list(params))

    def get_config(self):
        return {"learner": self.learner, "head_indices": self.head_indices}
