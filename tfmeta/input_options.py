"""tf.data options for the streams tfmeta hands to Keras: no autotuning.

Why: with tf.data autotuning on (TensorFlow's default), every `fit`,
`evaluate` or `predict` call can stall after its last step until the next
tick of the autotuner's sleep, 10 ms x (2^k - 1) after the first element
(0.31, 0.63, 1.27, 2.55, 5.11 s, ... capped at 60 s): destroying the iterator
cancels the autotuning thread, but TensorFlow wakes that thread before it
marks the cancellation, so the thread may sleep out its whole period
(TF 2.21; docs/performance.md has the reproduction). A short fine-tuning
call pays up to twice its compute. Keras itself turns autotuning off for its
`PyDataset` streams; tfmeta does the same for every stream it feeds to
Keras. tfmeta's streams are generated ahead by fixed-size `map`/`prefetch`
stages, so autotuning buys nothing measurable here.

Example::

    from tfmeta.input_options import without_autotuning

    model.fit(without_autotuning(dataset), steps_per_epoch=100)
"""

import tensorflow as tf

__all__ = ["without_autotuning"]


def without_autotuning(dataset):
    """`dataset` with tf.data autotuning off, unless its options already say.

    A user's explicit `options.autotune.enabled` (True or False) is kept;
    anything that is not a `tf.data.Dataset` (NumPy arrays, generators,
    distributed datasets) is returned unchanged.
    """
    if not isinstance(dataset, tf.data.Dataset):
        return dataset
    if dataset.options().autotune.enabled is not None:
        return dataset
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)
