"""First-order MAML and its multi-step variant (FOMAML++)."""

import tensorflow as tf

from tfmeta.learners.base import MetaLearner, zeros_like_all


class FOMAML(MetaLearner):
    """First-order MAML: the task loss gradient at the end of the trajectory.

    Args:
        steps: `"last"` uses the gradient of the last inner step (FOMAML);
            `"all"` averages the gradients of every inner step of the
            trajectory (FOMAML++, MAML++'s multi-step loss with equal weights).

    The gradient used is the one the last inner step already computed, at
    theta_{K-1} on the K-th mini-batch, so FOMAML costs no extra
    forward/backward pass. The CTS reference code instead evaluates a fresh
    gradient at theta_K on a held-out batch; the two differ by one inner step.

    Example:
        >>> learner = tfmeta.FOMAML()             # last step
        >>> learner = tfmeta.FOMAML(steps="all")  # FOMAML++
    """

    def __init__(self, steps="last"):
        if steps not in ("last", "all"):
            raise ValueError(
                f"FOMAML(steps={steps!r}) is not supported: use steps='last' "
                "(FOMAML) or steps='all' (FOMAML++)."
            )
        self.steps = steps

    def init_state(self, params):
        return {"grads": zeros_like_all(params), "count": tf.zeros((), tf.float32)}

    def observe(self, state, step):
        if self.steps == "last":
            grads = list(step.grads)
        else:
            grads = [a + g for a, g in zip(state["grads"], step.grads)]
        return {"grads": grads, "count": state["count"] + 1.0}

    def meta_gradient(self, state, phi, params):
        del phi, params
        if self.steps == "last":
            return list(state["grads"])
        count = tf.maximum(state["count"], 1.0)
        return [g / tf.cast(count, g.dtype) for g in state["grads"]]

    def get_config(self):
        return {"steps": self.steps}
