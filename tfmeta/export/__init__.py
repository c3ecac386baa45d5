"""Export a meta-learned initialization and load it back for fine-tuning.

Parts: `tfmeta.export.format` (names, errors, validation), `.writer`
(`export_initialization`), `.loader` (`load_initialization`,
`load_savedmodel_layer`); everything is importable from `tfmeta.export`.
Finding, cutting at and replacing the head is `tfmeta.heads`.

An export is a folder that plain Keras can use without tfmeta::

    path/
      model.keras     the model (architecture + weights), keras.saving format
      saved_model/    TensorFlow SavedModel with these endpoints:
                        serve              model(x, training=False)
                        serve_training     model(x, training=True)
                        features           the head's input, training=False
                        features_training  the head's input, training=True
                      (the features pair only for models whose head, the
                      last Dense layer, can be told apart: Sequential and
                      functional ones)
      tfmeta.json     format version, versions, input/output/feature shapes,
                      whether the head is meta-learned (not after per-task
                      heads, tfmeta.TaskHeads: load it with a fresh head),
                      endpoint names, user metadata and the sha256 of every
                      file above

Example::

    from tfmeta.export import export_initialization, load_initialization

    export_initialization(model, "runs/leap_init", metadata={"method": "leap"})
    model = load_initialization("runs/leap_init", num_classes=5)
    model.compile(...)
    model.fit(...)

Without tfmeta, the SavedModel fine-tunes as a Keras layer (BatchNorm trains
through the ``serve_training`` endpoint)::

    layer = keras.layers.TFSMLayer(
        "runs/leap_init/saved_model",
        call_endpoint="serve",
        call_training_endpoint="serve_training",
        trainable=True,
    )
    model = keras.Sequential([keras.Input((28, 28, 1)), layer])

and with a new head on the features (docs/export_finetune.md)::

    features = keras.layers.TFSMLayer(
        "runs/leap_init/saved_model",
        call_endpoint="features",
        call_training_endpoint="features_training",
    )
    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, keras.layers.Dense(5)(features(inputs)))
"""

from tfmeta.export.format import (
    FEATURES_ENDPOINT,
    FEATURES_TRAINING_ENDPOINT,
    FORMAT_VERSION,
    SERVE_ENDPOINT,
    TRAINING_ENDPOINT,
    CorruptExportError,
    InvalidExportError,
    read_export_info,
)
from tfmeta.export.loader import load_initialization, load_savedmodel_layer
from tfmeta.export.writer import export_initialization

__all__ = [
    "CorruptExportError",
    "FEATURES_ENDPOINT",
    "FEATURES_TRAINING_ENDPOINT",
    "FORMAT_VERSION",
    "InvalidExportError",
    "SERVE_ENDPOINT",
    "TRAINING_ENDPOINT",
    "export_initialization",
    "load_initialization",
    "load_savedmodel_layer",
    "read_export_info",
]
