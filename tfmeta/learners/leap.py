"""Leap (Flennerhag et al., ICLR 2019): pull phi forward along each gradient path."""

import tensorflow as tf

from tfmeta.learners.base import MetaLearner, global_norm_squared, zeros_like_all
from tfmeta.validation import check_flag


class Leap(MetaLearner):
    """Pull-forward meta-gradient on the length (or energy) of the gradient path.

    At every inner step i >= 1, with theta_{i-1}, theta_i, g_{i-1} and the
    mini-batch losses f_{i-1}, f_i, the increment is (eq. 4-5 and appendix C of
    the paper, as the authors' code computes it)::

        df  = f_i - f_{i-1}                        (0 when loss=False)
        df  = -|df|                                (when stabilizer=True)
        d   = sqrt(df^2 + ||theta_i - theta_{i-1}||^2)   (norm over ALL params)
        inc = (theta_{i-1} - theta_i) - df * g_{i-1}
        inc = inc / d                              (norm=True: path length)

    summed over the trajectory. K inner steps therefore give K-1 increments
    (the loss at theta_K is never evaluated). `MetaModel` averages over tasks
    and the outer optimizer steps phi with it.

    Args:
        norm: `True` for the path length (p=1), `False` for the energy (p=2).
        loss: include the loss dimension of the path.
        stabilizer: flip the sign of loss increases, so that df = -|df|.

    Example:
        >>> learner = tfmeta.Leap()                       # reference defaults
        >>> learner = tfmeta.Leap(norm=False, loss=False) # energy in weight space
    """

    # The authors' rule: a task's first step only stores (theta_0, g_0, f_0),
    # so K inner steps give K - 1 increments and K = 1 never moves phi.
    min_inner_steps = 2

    def __init__(self, norm=True, loss=True, stabilizer=True):
        # Not bool(): Leap(norm="false") would quietly be the length (norm=True).
        self.norm, self.loss, self.stabilizer = (check_flag(f"Leap({name}=...)", value) for name, value in (
            ("norm", norm), ("loss", loss), ("stabilizer", stabilizer)))

    def init_state(self, params):
        return {
            "meta_grad": zeros_like_all(params),
            "prev_params": [tf.identity(p) for p in params],
            "prev_grads": zeros_like_all(params),
            # The loss dimension of the path is in the parameters' dtype:
            # float64 models keep float64 losses, and df^2 adds to ||moved||^2.
            "prev_loss": tf.zeros((), params[0].dtype),
        }

    def observe(self, state, step):
        loss = tf.cast(step.loss, state["prev_loss"].dtype)
        if self.loss:
            df = loss - state["prev_loss"]
            if self.stabilizer:
                df = -tf.abs(df)
        else:
            df = tf.zeros_like(loss)
        moved = [p0 - p for p0, p in zip(state["prev_params"], step.params)]
        # The first step of a trajectory only records (theta_0, g_0, f_0).
        scale = tf.cast(step.index > 0, df.dtype)
        if self.norm:
            d = tf.sqrt(tf.square(df) + global_norm_squared(moved))
            # d is 0 only when the step did not move: the increment is 0 too.
            scale = tf.math.divide_no_nan(scale, d)
        # acc + scale * (moved - df * g) as one add_n per tensor: the update
        # touches each parameter-sized tensor fewer times, which is most of
        # Leap's cost over Reptile's on a small model (docs/performance.md).
        meta_grad = [
            tf.add_n([acc, tf.cast(scale, m.dtype) * m, tf.cast(-scale * df, g.dtype) * g])
            for acc, m, g in zip(state["meta_grad"], moved, state["prev_grads"])
        ]
        return {
            "meta_grad": meta_grad,
            "prev_params": list(step.params),
            "prev_grads": list(step.grads),
            "prev_loss": loss,
        }

    def meta_gradient(self, state, phi, params):
        del phi, params
        return list(state["meta_grad"])

    def get_config(self):
        return {"norm": self.norm, "loss": self.loss, "stabilizer": self.stabilizer}
