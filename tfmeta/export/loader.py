"""Load a tfmeta export: `load_initialization` (Keras model) and `load_savedmodel_layer`.

Example::

    from tfmeta.export import load_initialization

    model = load_initialization("runs/init", num_classes=5)
"""

from __future__ import annotations

import pathlib

import keras
import numpy as np

from tfmeta.export.format import InvalidExportError, head_is_meta_learned, read_export_info
from tfmeta.heads import with_new_head

__all__ = ["HEAD_MODES", "load_initialization", "load_savedmodel_layer"]

HEAD_MODES = ("replace", "reset", "keep")


def load_initialization(path, *, num_classes=None, head="replace", custom_objects=None):
    """Load an exported initialization as an uncompiled ``keras.Model``.

    The export is validated first (see ``read_export_info``). ``head`` says
    what happens to the final Dense layer (the head):

    - ``"replace"`` (default): a new, freshly initialized head with
      ``num_classes`` units when ``num_classes`` differs from the exported
      output units; otherwise the exported head is kept, unless the export
      says its head is not meta-learned (meta-training with per-task heads,
      ``tfmeta.TaskHeads``, learns the body only): then always a fresh head.
    - ``"reset"``: always a fresh head (``num_classes`` units, or the exported
      number when ``None``), for heads whose meta-learned weights are tied to
      the pretraining labels.
    - ``"keep"``: never replace; ``num_classes`` must be ``None`` or equal.
      Refused for exports whose head is not meta-learned.

    A new head is built from the old head's config with ``units`` changed
    (same activation, initializers, regularizers, name) and attached to the
    input of the old head: Sequential models are rebuilt as
    ``Sequential([Input, *layers[:-1], new_head])``, functional models as
    ``Model(inputs, new_head(old_head.input))``. All other layers are the
    loaded ones, so their weights are the exported ones. Subclassed models
    have no layer graph to rewire: a head change raises ``TypeError``; load
    them with ``num_classes=None`` and swap the head in the model class.
    Subclassed (custom) classes must be importable and registered with
    ``keras.saving.register_keras_serializable`` or passed in
    ``custom_objects``.

    Example::

        model = load_initialization("runs/init", num_classes=5)
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    """
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    path = pathlib.Path(path)
    info = read_export_info(path)
    meta_learned = head_is_meta_learned(info)
    if head == "keep" and not meta_learned:
        raise ValueError(
            f"{path} was meta-trained with per-task heads (tfmeta.TaskHeads): only its body is "
            "meta-learned and its head's weights never were, so head='keep' would fine-tune "
            "from an untrained head; load it with head='replace' (default) and num_classes=... "
            "for a fresh head."
        )
    model_file = path / info["model_file"]
    try:
        model = keras.saving.load_model(model_file, custom_objects=custom_objects, compile=False)
    except Exception as error:  # Keras raises TypeError/ValueError/... for what it cannot rebuild
        # Keras' messages go on with the whole config: its first sentence says it.
        reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        raise InvalidExportError(
            f"{model_file} is intact (its sha256 matches) but Keras {keras.__version__} cannot "
            f"load it ({type(error).__name__}: {reason}); if the model has custom layers or "
            "models, import and register them (keras.saving.register_keras_serializable) or "
            f"pass custom_objects=..., else load it with the Keras that wrote it "
            f"({info.get('keras_version')})."
        ) from error
    units = info["output_units"]
    if head == "keep":
        if num_classes is not None and num_classes != units:
            raise ValueError(
                f"the export has {units} output units but num_classes="
                f"{num_classes} with head='keep'; use head='replace' for a new head"
            )
        return model
    if head == "replace" and meta_learned and (num_classes is None or num_classes == units):
        return model
    return with_new_head(model, units if num_classes is None else int(num_classes))


def load_savedmodel_layer(path, *, trainable=True, name=None, features=False):
    """Validate the export at ``path`` and return its SavedModel as a layer.

    The layer calls ``serve`` at inference and ``serve_training`` in training
    (so BatchNorm uses batch statistics and updates its moving statistics);
    with ``features=True``, ``features`` and ``features_training``: the
    network up to the head's input, to put a new head on. It is exactly what
    a user without tfmeta writes::

        layer = keras.layers.TFSMLayer(
            "path/saved_model",
            call_endpoint="serve",                    # or "features"
            call_training_endpoint="serve_training",  # or "features_training"
            trainable=True,
        )

    Example::

        layer = load_savedmodel_layer("runs/init")
        model = keras.Sequential([keras.Input((28, 28, 1)), layer])
        trunk = load_savedmodel_layer("runs/init", features=True)
        model = keras.Sequential([keras.Input((28, 28, 1)), trunk, keras.layers.Dense(5)])
    """
    path = pathlib.Path(path)
    info = read_export_info(path)
    endpoints = info["endpoints"]
    if features:
        endpoints = info.get("feature_endpoints")
        if not endpoints:
            raise InvalidExportError(
                f"{path} has no features endpoints: it was exported from a model without a "
                "Dense head tfmeta can find (a subclassed model, or a last layer that is not "
                "Dense) or by an older tfmeta; use features=False, or re-export a Sequential "
                "or functional model ending in its Dense head."
            )
    return keras.layers.TFSMLayer(
        str(path / info["saved_model_dir"]),
        call_endpoint=endpoints["inference"],
        call_training_endpoint=endpoints["training"],
        trainable=trainable,
        name=name,
    )
