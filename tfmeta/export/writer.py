"""Write a tfmeta export: `export_initialization`.

Example::

    from tfmeta.export import export_initialization

    export_initialization(model, "runs/init", metadata={"meta_steps": 1000})
"""

from __future__ import annotations

import datetime
import errno
import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tfmeta import atomic, heads, validation
from tfmeta.export.format import (
    FEATURES_ENDPOINT,
    FEATURES_TRAINING_ENDPOINT,
    FORMAT_NAME,
    FORMAT_VERSION,
    INFO_FILE,
    MODEL_FILE,
    SAVED_MODEL_DIR,
    SERVE_ENDPOINT,
    TRAINING_ENDPOINT,
    checksums,
)
from tfmeta.heads import features_model
from tfmeta.failpoints import failpoint

__all__ = ["export_initialization"]

# How TensorFlow reports a failed file write (its errno-to-status mapping).
_TF_WRITE_ERRNOS = {
    tf.errors.OutOfRangeError: errno.EFBIG,
    tf.errors.ResourceExhaustedError: errno.ENOSPC,
    tf.errors.PermissionDeniedError: errno.EACCES,
}


def export_initialization(model, path, *, overwrite=False, metadata=None, head_meta_learned=None):
    """Write ``model`` as a tfmeta export folder at ``path`` and return it.

    The model must be built and have one input and one output tensor. The
    folder holds ``model.keras``, a SavedModel ``saved_model/`` with a
    ``serve`` (training=False) and a ``serve_training`` (training=True)
    endpoint, for Sequential and functional models whose last layer is a
    Dense head also ``features`` and ``features_training`` (the head's
    input, to put a new head on with Keras alone), and ``tfmeta.json``
    (see the module docstring). ``tfmeta.json`` records whether the head's
    weights were meta-learned: not when the model was meta-trained with
    per-task heads (``tfmeta.TaskHeads``), whose bank, not the model's own
    head, was trained; ``load_initialization`` then always makes a fresh
    head.

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
        head_meta_learned: whether the head's weights are meta-learned;
            None (default) finds out: False for the model of a
            ``MetaModel(model, heads=TaskHeads(...))``, else True.

    Returns:
        ``pathlib.Path`` of the export.

    Example::

        export_initialization(model, "runs/init", metadata={"meta_steps": 1000})
    """
    if validation.is_meta_model(model):
        # Its own input is a stream of task batches, so the advice _input_spec
        # would give cannot help.
        raise TypeError(
            f"export_initialization got the {type(model).__name__} wrapper, whose input is a "
            "stream of task batches: export the network it meta-trained, "
            "export_initialization(meta.model, path)"
        )
    path = pathlib.Path(path)
    # Not bool(): overwrite="no" would replace an export.
    overwrite = validation.check_flag("overwrite", overwrite)
    if head_meta_learned is not None:
        head_meta_learned = validation.check_flag("head_meta_learned", head_meta_learned)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of JSON values, e.g. {{'meta_steps': 1000}}; "
                        f"got {type(metadata).__name__} {metadata!r}")
    try:
        json.dumps(metadata, allow_nan=False)  # NaN / inf are not JSON: tfmeta.json would not parse
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata must be JSON-serializable (finite numbers, strings, lists, "
                        f"dicts): {err}") from err
    file_above = next((p for p in path.parents if p.is_file()), None)
    if file_above is not None:
        raise FileExistsError(
            f"{file_above} is a file, so {path} cannot be a folder under it: choose another path"
        )
    atomic.recover_directory(path)
    if path.is_file():
        raise FileExistsError(
            f"{path} is a file, not an export folder; refusing to replace it. Remove it or "
            "choose another path."
        )
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
    features = features_model(model)
    if head_meta_learned is None:
        head_meta_learned = heads.head_meta_learned(model)

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
            "head_meta_learned": bool(head_meta_learned),
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
            "files": checksums(staging),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


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


def _tfmeta_version():
    # tfmeta/__init__.py is imported before this module, so this never
    # triggers a new import; a checkout without __version__ records None.
    import tfmeta

    return getattr(tfmeta, "__version__", None)
