"""Reptile (Nichol et al., 2018): move phi towards the adapted parameters."""

from tfmeta.learners.base import MetaLearner


class Reptile(MetaLearner):
    """Meta-gradient phi - theta_K, averaged over tasks.

    With outer SGD at learning rate beta this is
    phi <- phi + beta * mean_t(theta_K - phi).

    Example:
        >>> meta = tfmeta.MetaModel(model)
        >>> meta.compile(optimizer=keras.optimizers.SGD(1.0),
        ...              inner_optimizer=keras.optimizers.SGD(0.1),
        ...              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...              learner=tfmeta.Reptile(), inner_steps=100)
    """

    def meta_gradient(self, state, phi, params):
        del state
        return [p0 - p for p0, p in zip(phi, params)]
