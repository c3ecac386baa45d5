"""Export a meta-learned initialization and load it back for fine-tuning.

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

from __future__ import annotations

import datetime
import errno
import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tfmeta import atomic
from tfmeta.checksums import sha256_file
from tfmeta.failpoints import failpoint

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

FORMAT_NAME = "tfmeta.initialization"
FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
INFO_FILE = "tfmeta.json"
SERVE_ENDPOINT = "serve"
TRAINING_ENDPOINT = "serve_training"
FEATURES_ENDPOINT = "features"
FEATURES_TRAINING_ENDPOINT = "features_training"
HEAD_MODES = ("replace", "reset", "keep")
# How TensorFlow reports a failed file write (its errno-to-status mapping).
_TF_WRITE_ERRNOS = {
    tf.errors.OutOfRangeError: errno.EFBIG,
    tf.errors.ResourceExhaustedError: errno.ENOSPC,
    tf.errors.PermissionDeniedError: errno.EACCES,
}


class InvalidExportError(ValueError):
    """The folder is not a readable tfmeta export."""


class CorruptExportError(InvalidExportError):
    """A file of the export is missing or differs from its recorded sha256."""


def export_initialization(model, path, *, overwrite=False, metadata=None):
    """Write ``model`` as a tfmeta export folder at ``path`` and return it.

    The model must be built and have one input and one output tensor. The
    folder holds ``model.keras``, a SavedModel ``saved_model/`` with a
    ``serve`` (training=False) and a ``serve_training`` (training=True)
    endpoint, for Sequential and functional models whose last layer is a
    Dense head also ``features`` and ``features_training`` (the head's
    input, to put a new head on with Keras alone), and ``tfmeta.json``
    (see the module docstring).

    The write is atomic (`tfmeta.atomic.staged_directory`): everything goes
    to a hidden temporary sibling folder, fsynced, that is renamed to
    ``path`` only once complete; a failed write (disk full, read-only
    folder: `tfmeta.atomic.WriteError`) leaves ``path`` as it was. With
    ``overwrite=True`` an existing export is moved aside only at that point
    and deleted after the rename, so an interrupted export leaves either no
    ``path`` or the previous export intact (a kill between the two renames
    of an overwrite leaves the previous export in a hidden ``.old`` folder,
    which the next ``export_initialization`` to ``path`` renames back before
    anything else; it also removes staging folders of killed writes). Only
    folders that are tfmeta exports (or empty) are ever replaced.

    Args:
        model: a built ``keras.Model`` (Sequential, functional or subclassed).
        path: folder to create.
        overwrite: replace an existing export at ``path``.
        metadata: JSON-serializable dict stored in ``tfmeta.json``.

    Returns:
        ``pathlib.Path`` of the export.

    Example::

        export_initialization(model, "runs/init", metadata={"meta_steps": 1000})
    """
    path = pathlib.Path(path)
    if metadata is None:
        metadata = {}
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata must be JSON-serializable: {err}") from err
    atomic.recover_directory(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists; pass overwrite=True to replace it "
                "(the existing export is kept until the new one is complete)"
            )
        if not _is_replaceable(path):
            raise FileExistsError(
                f"{path} exists and is not a tfmeta export (no {INFO_FILE}); "
                "refusing to replace it. Remove it or choose another path."
            )
    input_shape, input_dtype = _input_spec(model)
    output_shape = _output_shape(model, input_shape, input_dtype)
    features = _features_model(model)

    with atomic.staged_directory(path) as staging:
        keras.saving.save_model(model, staging / MODEL_FILE)
        failpoint("export.model_written")
        _write_saved_model(model, features, staging / SAVED_MODEL_DIR, input_shape, input_dtype)
        info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tfmeta_version": _tfmeta_version(),
            "keras_version": keras.__version__,
            "tensorflow_version": tf.__version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "model_class": type(model).__name__,
            "input_shape": list(input_shape),
            "input_dtype": input_dtype,
            "output_shape": list(output_shape),
            "output_units": output_shape[-1],
            "model_file": MODEL_FILE,
            "saved_model_dir": SAVED_MODEL_DIR,
            "endpoints": {"inference": SERVE_ENDPOINT, "training": TRAINING_ENDPOINT},
            "feature_endpoints": None if features is None else {
                "inference": FEATURES_ENDPOINT, "training": FEATURES_TRAINING_ENDPOINT,
            },
            "features_shape": None if features is None else [
                int(d) for d in features.output.shape[1:]
            ],
            "metadata": metadata,
            "files": _checksums(staging),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def read_export_info(path):
    """Validate the export at ``path`` and return its ``tfmeta.json`` as a dict.

    Raises ``FileNotFoundError`` when ``path`` does not exist,
    ``InvalidExportError`` when it is not a tfmeta export and
    ``CorruptExportError`` when a file is missing or its sha256 differs.

    Example::

        read_export_info("runs/init")["output_units"]
    """
    path = pathlib.Path(path)
    if not path.exists():
        backups = atomic.backups(path)
        if backups:
            raise FileNotFoundError(
                f"no tfmeta export at {path}, but {backups[-1].name} beside it is the "
                "previous export, moved aside by an overwrite that was killed: rename it "
                f"back to {path.name} (export_initialization to {path} does so itself)."
            )
        raise FileNotFoundError(
            f"no tfmeta export at {path}; create one with "
            "tfmeta.export.export_initialization(model, path)"
        )
    info_file = path / INFO_FILE
    if not path.is_dir() or not info_file.is_file():
        raise InvalidExportError(
            f"{path} is not a tfmeta export: it has no {INFO_FILE}. Create an "
            "export with tfmeta.export.export_initialization(model, path); a "
            "plain .keras file loads with keras.saving.load_model."
        )
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError) as err:
        raise CorruptExportError(
            f"{info_file} is unreadable ({err}); re-export with "
            "export_initialization(..., overwrite=True)"
        ) from err
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise InvalidExportError(
            f"{info_file} does not describe a tfmeta initialization export "
            f"(format {info.get('format') if isinstance(info, dict) else None!r}, "
            f"expected {FORMAT_NAME!r})"
        )
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InvalidExportError(
            f"{path} has export format version {version!r}; this tfmeta reads "
            f"versions up to {FORMAT_VERSION}. Upgrade tfmeta to load it."
        )
    files = info.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CorruptExportError(
            f"{info_file} lists no checksum for {MODEL_FILE}; re-export with "
            "export_initialization(..., overwrite=True)"
        )
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CorruptExportError(
                f"{path} is corrupt: {name} is missing. Re-export with "
                "export_initialization(..., overwrite=True)."
            )
        if sha256_file(file) != expected:
            raise CorruptExportError(
                f"{path} is corrupt: the sha256 of {name} does not match the "
                f"one recorded in {INFO_FILE} (the file was damaged or edited "
                "after export). Re-export with "
                "export_initialization(..., overwrite=True)."
            )
    return info


def load_initialization(path, *, num_classes=None, head="replace", custom_objects=None):
    """Load an exported initialization as an uncompiled ``keras.Model``.

    The export is validated first (see ``read_export_info``). ``head`` says
    what happens to the final Dense layer (the head):

    - ``"replace"`` (default): a new, freshly initialized head with
      ``num_classes`` units when ``num_classes`` differs from the exported
      output units; otherwise the exported head is kept.
    - ``"reset"``: always a fresh head (``num_classes`` units, or the exported
      number when ``None``), for heads whose meta-learned weights are tied to
      the pretraining labels.
    - ``"keep"``: never replace; ``num_classes`` must be ``None`` or equal.

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
    model = keras.saving.load_model(
        path / info["model_file"], custom_objects=custom_objects, compile=False
    )
    units = info["output_units"]
    if head == "keep":
        if num_classes is not None and num_classes != units:
            raise ValueError(
                f"the export has {units} output units but num_classes="
                f"{num_classes} with head='keep'; use head='replace' for a new head"
            )
        return model
    if head == "replace" and (num_classes is None or num_classes == units):
        return model
    return _with_new_head(model, units if num_classes is None else int(num_classes))


def load_savedmodel_layer(path, *, trainable=True, name=None):
    """Validate the export at ``path`` and return its SavedModel as a layer.

    The layer calls ``serve`` at inference and ``serve_training`` in training
    (so BatchNorm uses batch statistics and updates its moving statistics).
    It is exactly what a user without tfmeta writes::

        layer = keras.layers.TFSMLayer(
            "path/saved_model",
            call_endpoint="serve",
            call_training_endpoint="serve_training",
            trainable=True,
        )

    Example::

        layer = load_savedmodel_layer("runs/init")
        model = keras.Sequential([keras.Input((28, 28, 1)), layer])
    """
    path = pathlib.Path(path)
    info = read_export_info(path)
    return keras.layers.TFSMLayer(
        str(path / info["saved_model_dir"]),
        call_endpoint=info["endpoints"]["inference"],
        call_training_endpoint=info["endpoints"]["training"],
        trainable=trainable,
        name=name,
    )


def _is_replaceable(path):
    return path.is_dir() and not path.is_symlink() and (
        (path / INFO_FILE).is_file() or not any(path.iterdir())
    )


def _input_spec(model):
    if not model.built:
        raise ValueError(
            "export_initialization needs a built model: call it on a batch or "
            "use model.build(input_shape) first"
        )
    inputs = getattr(model, "inputs", None)
    if inputs:
        if len(inputs) != 1:
            raise ValueError(
                f"export_initialization supports single-input models; this one has {len(inputs)}"
            )
        return tuple(inputs[0].shape[1:]), keras.backend.standardize_dtype(inputs[0].dtype)
    # Subclassed models have no symbolic inputs; Keras records the shape they
    # were built with in their build config.
    shape = (model.get_build_config() or {}).get("input_shape")
    if not isinstance(shape, (tuple, list)) or not all(
        d is None or isinstance(d, int) for d in shape
    ):
        raise ValueError(
            "cannot tell the input shape of this model: build it with "
            "model.build((None, *input_shape)) or call it on one batch first"
        )
    return tuple(shape[1:]), keras.backend.standardize_dtype(model.input_dtype)


def _output_shape(model, input_shape, input_dtype):
    if any(d is None for d in input_shape):
        raise ValueError(
            f"export_initialization needs a fully known input shape, got {input_shape}"
        )
    outputs = model(np.zeros((1, *input_shape), dtype=input_dtype), training=False)
    if not hasattr(outputs, "shape") or len(outputs.shape) < 2:
        raise ValueError(
            "export_initialization supports models with one output tensor of "
            "shape (batch, ..., units)"
        )
    return tuple(int(d) for d in outputs.shape[1:])


def _write_saved_model(model, features, directory, input_shape, input_dtype):
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [tf.TensorSpec((None, *input_shape), input_dtype, name="inputs")]
    # A separate training endpoint is how a SavedModel carries training-mode
    # behaviour: TFSMLayer calls it when training=True, so BatchNorm normalizes
    # with batch statistics and its moving-statistic updates (assign ops traced
    # into this function) apply to the reloaded variables.
    endpoints = [(SERVE_ENDPOINT, model, False), (TRAINING_ENDPOINT, model, True)]
    if features is not None:
        # The same layers (same variables) up to the head's input: a TFSMLayer
        # on these holds the trunk's weights only, ready for a new head.
        endpoints += [(FEATURES_ENDPOINT, features, False), (FEATURES_TRAINING_ENDPOINT, features, True)]
    for name, net, training in endpoints:
        archive.add_endpoint(name=name, fn=_caller(net, training), input_signature=signature)
    try:
        archive.write_out(str(directory), verbose=False)
    except tuple(_TF_WRITE_ERRNOS) as error:
        # TensorFlow's C++ file writes report errno as a status code: back to
        # an OSError, which `atomic.staged_directory` turns into a WriteError.
        code = next(c for kind, c in _TF_WRITE_ERRNOS.items() if isinstance(error, kind))
        raise OSError(code, f"TensorFlow could not write the SavedModel ({error.message})") from error


def _caller(net, training):
    return lambda inputs: net(inputs, training=training)


def _checksums(root):
    return {
        file.relative_to(root).as_posix(): sha256_file(file)
        for file in sorted(root.rglob("*"))
        if file.is_file()
    }




def _tfmeta_version():
    # tfmeta/__init__.py is imported before this module, so this never
    # triggers a new import; a checkout without __version__ records None.
    import tfmeta

    return getattr(tfmeta, "__version__", None)


def _head(model):
    """`(head, features)`: the last Dense layer and its input tensor, or `TypeError` saying why not."""
    old_head = model.layers[-1] if model.layers else None
    if not isinstance(old_head, keras.layers.Dense):
        raise TypeError(
            "load_initialization replaces the head only when the model's last "
            f"layer is a Dense layer (got {type(old_head).__name__}); load with "
            "num_classes=None and add your own head"
        )
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise TypeError(
            f"{type(model).__name__} is a subclassed model: load_initialization "
            "cannot rewire its head. Load with num_classes=None (or head='keep') "
            "and build the new head in the model class, e.g. by constructing it "
            "with num_classes and copying the other layers' weights."
        )
    if len(outputs) != 1 or outputs[0] is not old_head.output:
        raise TypeError(
            "load_initialization replaces the head only of single-output models "
            "whose output is produced by their last Dense layer"
        )
    return old_head, old_head.input


def _features_model(model):
    """The model from its input to its head's input (same layers), or None if it has no clear head."""
    try:
        _, features = _head(model)
    except TypeError:
        return None  # e.g. subclassed: exported without the features endpoints
    return keras.Model(model.inputs[0], features, name=f"{model.name}_features")


def _with_new_head(model, num_classes):
    old_head, features = _head(model)
    new_head = keras.layers.Dense.from_config({**old_head.get_config(), "units": num_classes})
    if isinstance(model, keras.Sequential):
        inputs = model.inputs[0]
        input_layer = keras.Input(batch_shape=inputs.shape, dtype=inputs.dtype)
        return keras.Sequential([input_layer, *model.layers[:-1], new_head], name=model.name)
    return keras.Model(model.inputs, new_head(features), name=model.name)
