"""Export / load / fine-tune of initializations, on scikit-learn's digits.

The digits (1797 8x8 grey images, 10 classes, shipped with scikit-learn) need
no download. The shared initialization is a small BatchNorm convnet trained
on the first half of the digits; fine-tuning runs on the second half.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from tfmeta.export import (
    CorruptExportError,
    InvalidExportError,
    export_initialization,
    load_initialization,
    load_savedmodel_layer,
    read_export_info,
)
from tfmeta.finetune import (
    FinetuneResult,
    area_under_curve,
    finetune,
    plot_curves,
    random_initialization,
)

PRETRAIN = slice(0, 900)
DOWNSTREAM_TRAIN = slice(900, 1400)
DOWNSTREAM_TEST = slice(1400, None)


def convnet(num_classes):
    # momentum=0.9 is PyTorch's BatchNorm default (0.1 there), as in Leap's
    # code; Keras' 0.99 leaves moving statistics stale after short training.
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(16, 3, padding="same"),
            layers.MaxPooling2D(2),
            layers.BatchNormalization(momentum=0.9),
            layers.ReLU(),
            layers.Conv2D(16, 3, padding="same"),
            layers.MaxPooling2D(2),
            layers.BatchNormalization(momentum=0.9),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dense(num_classes),
        ]
    )


def small_dense(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


@keras.saving.register_keras_serializable(package="tfmeta_tests")
class SubclassedNet(keras.Model):
    def __init__(self, num_classes=3, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.norm = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(num_classes)

    def call(self, inputs, training=False):
        return self.head(self.norm(self.hidden(inputs), training=training))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.head.units}


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    return x, data.target.astype("int32")


@pytest.fixture(scope="module")
def pretrained(digits):
    # Module fixtures run before the autouse per-test seeding.
    keras.utils.set_random_seed(0)
    x, y = digits
    model = convnet(10)
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x[PRETRAIN], y[PRETRAIN], batch_size=32, epochs=5, verbose=0)
    return model


@pytest.fixture(scope="module")
def exported(pretrained, tmp_path_factory):
    path = tmp_path_factory.mktemp("exports") / "digits_init"
    returned = export_initialization(
        pretrained, path, metadata={"method": "pretrain", "alphabets": [1, 2]}
    )
    assert returned == path
    return path


PURE_KERAS_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    sys.modules["tfmeta"] = None  # any import of tfmeta now fails
    import keras
    import numpy as np

    saved_model, data_file, predictions_file = sys.argv[1:4]
    data = np.load(data_file)
    layer = keras.layers.TFSMLayer(
        saved_model,
        call_endpoint="serve",
        call_training_endpoint="serve_training",
        trainable=True,
    )
    model = keras.Sequential([keras.Input((8, 8, 1)), layer])
    np.save(predictions_file, model.predict(data["x_check"], verbose=0))

    moving_before = {w.name: w.numpy().copy() for w in layer.non_trainable_weights}
    trainable_before = [w.numpy().copy() for w in layer.trainable_weights]
    model.compile(
        keras.optimizers.SGD(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data["x"], data["y"]
    loss_before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0)
    loss_after = model.evaluate(x, y, verbose=0)
    print(json.dumps({
        "loss_before": loss_before,
        "loss_after": loss_after,
        "moving_change": {
            name: float(np.abs(before - w.numpy()).max())
            for (name, before), w in zip(moving_before.items(), layer.non_trainable_weights)
        },
        "trainable_change": max(
            float(np.abs(before - w.numpy()).max())
            for before, w in zip(trainable_before, layer.trainable_weights)
        ),
        "num_trainable": len(layer.trainable_weights),
        "tfmeta_imported": "tfmeta" in sys.modules and sys.modules["tfmeta"] is not None,
    }))
    """
)


@pytest.fixture(scope="module")
def pure_keras_run(exported, digits, tmp_path_factory):
    """Fine-tune the SavedModel in a fresh Python that imports only TF and Keras."""
    x, y = digits
    work = tmp_path_factory.mktemp("pure_keras")
    # Labels permuted: the pretrained head is wrong, so fine-tuning has work to do.
    np.savez(
        work / "data.npz",
        x=x[DOWNSTREAM_TRAIN],
        y=(y[DOWNSTREAM_TRAIN] + 1) % 10,
        x_check=x[DOWNSTREAM_TEST][:64],
    )
    (work / "run.py").write_text(PURE_KERAS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    completed = subprocess.run(
        [
            sys.executable,
            str(work / "run.py"),
            str(exported / "saved_model"),
            str(work / "data.npz"),
            str(work / "predictions.npy"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return report, np.load(work / "predictions.npy"), x[DOWNSTREAM_TEST][:64]


FEATURES_SCRIPT = textwrap.dedent(
    """
    # A Keras-only user replaces the head, as docs/export_finetune.md says.
    import json
    import sys

    import keras
    import numpy as np

    export_dir, data_file, out_file = sys.argv[1:4]
    data = np.load(data_file)
    x, y, x_check = data["x"], data["y"], data["x_check"]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    report, arrays = {}, {}

    def fit(name, model, features):
        model.compile(keras.optimizers.SGD(0.05), loss)
        before = model.evaluate(x, y, verbose=0)
        moving = [w.numpy().copy() for w in features.non_trainable_weights]
        model.fit(x, y, batch_size=20, epochs=3, shuffle=False, verbose=0)
        head = model.layers[-1]
        arrays[name + "_logits"] = model.predict(x_check, verbose=0)
        arrays[name + "_features_after"] = np.asarray(features(x_check, training=False))
        arrays[name + "_kernel"], arrays[name + "_bias"] = head.kernel.numpy(), head.bias.numpy()
        report[name] = {
            "loss_before": before,
            "loss_after": model.evaluate(x, y, verbose=0),
            "moving_change": max(float(np.abs(a - w.numpy()).max())
                                 for a, w in zip(moving, features.non_trainable_weights)),
            "trunk_weights": [len(features.trainable_weights), len(features.non_trainable_weights)],
        }

    # 1. SavedModel, whole network fine-tuned with a new 5-unit head.
    features = keras.layers.TFSMLayer(
        export_dir + "/saved_model",
        call_endpoint="features",
        call_training_endpoint="features_training",
        trainable=True,
    )
    arrays["savedmodel_features"] = np.asarray(features(x_check))
    inputs = keras.Input((8, 8, 1))
    fit("savedmodel", keras.Model(inputs, keras.layers.Dense(5)(features(inputs))), features)

    # 2. SavedModel, frozen trunk (linear probe): no training endpoint, so
    #    fit() calls "features" too and BatchNorm keeps its moving statistics.
    probe = keras.layers.TFSMLayer(
        export_dir + "/saved_model", call_endpoint="features", trainable=False
    )
    inputs = keras.Input((8, 8, 1))
    fit("probe", keras.Model(inputs, keras.layers.Dense(5)(probe(inputs))), probe)

    # 3. model.keras: the trunk is the loaded model up to its head's input.
    loaded = keras.saving.load_model(export_dir + "/model.keras", compile=False)
    trunk = keras.Model(loaded.inputs[0], loaded.layers[-1].input)
    arrays["keras_features"] = np.asarray(trunk(x_check, training=False))
    fit("keras", keras.Model(trunk.input, keras.layers.Dense(5)(trunk.output)), trunk)

    report["tfmeta_imported"] = "tfmeta" in sys.modules
    np.savez(out_file, **arrays)
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def features_run(exported, digits, tmp_path_factory):
    """Replace the head with Keras alone (SavedModel and .keras) in a fresh Python."""
    x, y = digits
    work = tmp_path_factory.mktemp("features")
    np.savez(work / "data.npz", x=x[DOWNSTREAM_TRAIN], y=y[DOWNSTREAM_TRAIN] % 5,
             x_check=x[DOWNSTREAM_TEST][:64])
    (work / "run.py").write_text(FEATURES_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    completed = subprocess.run(
        [sys.executable, str(work / "run.py"), str(exported), str(work / "data.npz"),
         str(work / "out.npz")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return report, dict(np.load(work / "out.npz")), x[DOWNSTREAM_TEST][:64]


def _penultimate(model, x):
    # Layer by layer, up to the head: an independent way to the head's input.
    for layer in model.layers[:-1]:
        x = layer(x, training=False)
    return np.asarray(x)


def test_features_endpoints_are_the_penultimate_activations(features_run, pretrained):
    report, arrays, x_check = features_run
    assert not report["tfmeta_imported"]
    expected = _penultimate(pretrained, x_check)
    assert expected.shape == (64, 64)  # 2x2x16 after two poolings, flattened
    np.testing.assert_allclose(arrays["savedmodel_features"], expected, atol=1e-5)
    np.testing.assert_allclose(arrays["keras_features"], expected, atol=1e-5)
    # The features layer holds the trunk only: 2 conv + 2 BN (gamma, beta),
    # kernels and biases, and the 4 moving statistics; not the old head.
    assert report["savedmodel"]["trunk_weights"] == [8, 4]


@pytest.mark.parametrize("route", ["savedmodel", "probe", "keras"])
def test_a_replaced_head_fine_tunes_with_keras_alone(features_run, pretrained, route):
    report, arrays, x_check = features_run
    result = report[route]
    assert result["loss_after"] < 0.5 * result["loss_before"], result
    # The new head sits on the features: logits = features @ kernel + bias.
    features = arrays[route + "_features_after"]
    np.testing.assert_allclose(
        arrays[route + "_logits"], features @ arrays[route + "_kernel"] + arrays[route + "_bias"],
        atol=1e-4,
    )
    if route == "probe":
        # Frozen trunk: the exported features, to the bit, moving statistics included.
        assert result["moving_change"] == 0.0
        np.testing.assert_allclose(features, _penultimate(pretrained, x_check), atol=1e-5)
    else:
        # Fine-tuned trunk in training mode: BatchNorm's moving statistics moved.
        assert result["moving_change"] > 1e-4


def test_export_layout_and_info(exported):
    assert (exported / "model.keras").is_file()
    assert (exported / "saved_model" / "saved_model.pb").is_file()
    info = json.loads((exported / "tfmeta.json").read_text())
    assert info["format_version"] == 1
    assert info["input_shape"] == [8, 8, 1]
    assert info["output_units"] == 10
    assert info["endpoints"] == {"inference": "serve", "training": "serve_training"}
    assert info["feature_endpoints"] == {"inference": "features", "training": "features_training"}
    assert info["features_shape"] == [64]
    assert info["metadata"] == {"method": "pretrain", "alphabets": [1, 2]}
    assert "model.keras" in info["files"]
    assert "saved_model/saved_model.pb" in info["files"]
    assert read_export_info(exported) == info
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]


def test_savedmodel_finetunes_in_pure_keras(pure_keras_run):
    report, _, _ = pure_keras_run
    assert not report["tfmeta_imported"]
    assert report["loss_after"] < 0.5 * report["loss_before"]
    assert report["num_trainable"] == 10  # 2 conv + 2 BN (gamma, beta) + dense, kernels and biases
    assert report["trainable_change"] > 1e-3
    moving = report["moving_change"]
    assert len(moving) == 4 and all("moving" in name for name in moving)
    assert all(change > 1e-4 for change in moving.values()), moving


def test_keras_and_savedmodel_predictions_agree(pure_keras_run, exported):
    _, savedmodel_predictions, x_check = pure_keras_run
    reloaded = load_initialization(exported)
    np.testing.assert_allclose(
        reloaded.predict(x_check, verbose=0), savedmodel_predictions, atol=1e-5
    )


def test_load_savedmodel_layer_matches_keras_model(exported, pretrained, digits):
    x = digits[0][:16]
    layer = load_savedmodel_layer(exported)
    assert layer.call_training_endpoint == "serve_training"
    np.testing.assert_allclose(
        layer(x).numpy(), pretrained(x, training=False).numpy(), atol=1e-5
    )


def test_load_keeps_exported_weights(exported, pretrained):
    model = load_initialization(exported)
    assert isinstance(model, keras.Sequential)
    for loaded, original in zip(model.weights, pretrained.weights):
        np.testing.assert_array_equal(loaded.numpy(), original.numpy())


def test_load_with_new_num_classes_replaces_head(exported, pretrained, digits):
    model = load_initialization(exported, num_classes=5)
    head = model.layers[-1]
    assert isinstance(head, keras.layers.Dense) and head.units == 5
    assert model.output_shape == (None, 5)
    assert len(model.layers) == len(pretrained.layers)
    for new_layer, old_layer in zip(model.layers[:-1], pretrained.layers[:-1]):
        for new, old in zip(new_layer.weights, old_layer.weights):
            np.testing.assert_array_equal(new.numpy(), old.numpy())
    assert head.kernel.shape == (pretrained.layers[-1].kernel.shape[0], 5)
    assert model(digits[0][:4]).shape == (4, 5)


def test_head_modes(exported, pretrained):
    reset = load_initialization(exported, head="reset")
    assert reset.layers[-1].units == 10
    assert not np.allclose(reset.layers[-1].kernel.numpy(), pretrained.layers[-1].kernel.numpy())
    with pytest.raises(ValueError, match="head='replace'"):
        load_initialization(exported, num_classes=3, head="keep")
    with pytest.raises(ValueError, match="head must be one of"):
        load_initialization(exported, head="drop")


def test_functional_head_replacement(tmp_path):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(6, activation="relu", name="trunk")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    export_initialization(model, tmp_path / "init")
    loaded = load_initialization(tmp_path / "init", num_classes=7)
    assert loaded.output_shape == (None, 7)
    assert loaded.get_layer("head").units == 7
    np.testing.assert_array_equal(
        loaded.get_layer("trunk").kernel.numpy(), model.get_layer("trunk").kernel.numpy()
    )


def test_subclassed_model_exports_but_head_change_is_refused(tmp_path):
    model = SubclassedNet(3)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    model(x)
    export_initialization(model, tmp_path / "init")
    assert read_export_info(tmp_path / "init")["input_shape"] == [4]
    loaded = load_initialization(tmp_path / "init")
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)
    with pytest.raises(TypeError, match="subclassed model"):
        load_initialization(tmp_path / "init", num_classes=4)


def test_existing_path_without_overwrite_raises(tmp_path):
    export_initialization(small_dense(0), tmp_path / "init")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_initialization(small_dense(1), tmp_path / "init")


def test_overwrite_replaces_export(tmp_path):
    export_initialization(small_dense(0), tmp_path / "init")
    replacement = small_dense(1)
    export_initialization(replacement, tmp_path / "init", overwrite=True)
    loaded = load_initialization(tmp_path / "init")
    np.testing.assert_array_equal(
        loaded.layers[-1].kernel.numpy(), replacement.layers[-1].kernel.numpy()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]


def test_overwrite_refuses_to_replace_a_non_export_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tfmeta export"):
        export_initialization(small_dense(0), tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def _fail_mid_savedmodel_write(monkeypatch):
    # ExportArchive.write_out ends in tf.saved_model.save; by then model.keras
    # is written, so the crash lands in the middle of the export.
    def save(obj, export_dir, signatures=None, options=None):
        os.makedirs(export_dir)
        pathlib.Path(export_dir, "saved_model.pb").write_bytes(b"partial")
        raise RuntimeError("simulated crash while writing the SavedModel")

    monkeypatch.setattr(tf.saved_model, "save", save)


def test_interrupted_export_leaves_no_target(tmp_path, monkeypatch):
    _fail_mid_savedmodel_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_initialization(small_dense(0), tmp_path / "init")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_previous_export(tmp_path, monkeypatch):
    previous = small_dense(0)
    export_initialization(previous, tmp_path / "init")
    info_before = (tmp_path / "init" / "tfmeta.json").read_bytes()
    _fail_mid_savedmodel_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_initialization(small_dense(1), tmp_path / "init", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]
    assert (tmp_path / "init" / "tfmeta.json").read_bytes() == info_before
    loaded = load_initialization(tmp_path / "init")
    np.testing.assert_array_equal(
        loaded.layers[-1].kernel.numpy(), previous.layers[-1].kernel.numpy()
    )


def test_failed_final_rename_restores_previous_export(tmp_path, monkeypatch):
    export_initialization(small_dense(0), tmp_path / "init")
    info_before = (tmp_path / "init" / "tfmeta.json").read_bytes()
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("simulated failure of the final rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="final rename"):
        export_initialization(small_dense(1), tmp_path / "init", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]
    assert (tmp_path / "init" / "tfmeta.json").read_bytes() == info_before


def test_metadata_must_be_json_serializable(tmp_path):
    with pytest.raises(TypeError, match="JSON-serializable"):
        export_initialization(small_dense(0), tmp_path / "init", metadata={"f": object()})
    assert list(tmp_path.iterdir()) == []


def test_corrupt_export_is_detected(exported, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(exported, copy)
    data = bytearray((copy / "model.keras").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.keras").write_bytes(bytes(data))
    with pytest.raises(CorruptExportError, match=r"corrupt: the sha256 of model\.keras"):
        load_initialization(copy)
    shutil.copy2(exported / "model.keras", copy / "model.keras")
    (copy / "saved_model" / "saved_model.pb").unlink()
    with pytest.raises(CorruptExportError, match="saved_model.pb is missing"):
        load_savedmodel_layer(copy)


def _truncate_model(folder):
    model = folder / "model.keras"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


def _edit_info(folder):
    (folder / "tfmeta.json").write_text('{"format": "tfmeta.initialization", ')


BAD_EXPORTS = [
    (_truncate_model, CorruptExportError, r"corrupt: the sha256 of model\.keras .*Re-export with"),
    (lambda f: (f / "saved_model" / "saved_model.pb").unlink(), CorruptExportError,
     r"corrupt: saved_model/saved_model\.pb is missing\. Re-export with"),
    (lambda f: shutil.rmtree(f / "saved_model"), CorruptExportError, r"corrupt: saved_model/.* is missing"),
    (lambda f: (f / "tfmeta.json").unlink(), InvalidExportError, r"no tfmeta\.json\. Create an export"),
    (_edit_info, CorruptExportError, r"tfmeta\.json is unreadable .*re-export with"),
]


@pytest.mark.parametrize("damage, error, message", BAD_EXPORTS)
def test_a_bad_export_raises_one_line_naming_the_problem_and_fix(exported, tmp_path, damage, error, message):
    copy = tmp_path / "bad"
    shutil.copytree(exported, copy)
    damage(copy)
    for load in (load_initialization, load_savedmodel_layer, read_export_info):
        with pytest.raises(error, match=message) as caught:
            load(copy)
        assert "\n" not in str(caught.value)  # the CLI prints it as one line


def test_an_intact_export_keras_cannot_rebuild_names_custom_objects(tmp_path, monkeypatch):
    model = SubclassedNet(3)
    model(np.zeros((2, 4), "float32"))
    export_initialization(model, tmp_path / "init")
    # As in a process that never imported the class's module.
    monkeypatch.delitem(keras.saving.get_custom_objects(), "tfmeta_tests>SubclassedNet")
    with pytest.raises(InvalidExportError, match=r"intact .*cannot load it \(TypeError: Could not "
                       r"locate class 'SubclassedNet'\); .*custom_objects") as caught:
        load_initialization(tmp_path / "init")
    assert "\n" not in str(caught.value)
    loaded = load_initialization(tmp_path / "init", custom_objects={"tfmeta_tests>SubclassedNet": SubclassedNet})
    assert isinstance(loaded, SubclassedNet)
    # Subclassed: no head tfmeta can cut at, so no features endpoints.
    assert read_export_info(tmp_path / "init")["feature_endpoints"] is None
    with pytest.raises(InvalidExportError, match="no features endpoints.*features=False"):
        load_savedmodel_layer(tmp_path / "init", features=True)


def test_load_savedmodel_layer_features(exported, pretrained, digits):
    x = digits[0][:16]
    trunk = load_savedmodel_layer(exported, features=True)
    assert (trunk.call_endpoint, trunk.call_training_endpoint) == ("features", "features_training")
    np.testing.assert_allclose(trunk(x).numpy(), _penultimate(pretrained, x), atol=1e-5)


def test_non_export_folder_gives_clear_error(tmp_path):
    (tmp_path / "weights.h5").write_bytes(b"not an export")
    with pytest.raises(InvalidExportError, match="no tfmeta.json.*export_initialization"):
        load_initialization(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tfmeta export"):
        load_initialization(tmp_path / "missing")


def test_finetune_records_each_steps_own_loss_and_error(pretrained, digits):
    x, y = digits
    x_train, y_train = x[DOWNSTREAM_TRAIN], y[DOWNSTREAM_TRAIN]
    batches = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(20)
    reference = keras.models.clone_model(pretrained)
    reference.set_weights(pretrained.get_weights())
    model = keras.models.clone_model(pretrained)
    model.set_weights(pretrained.get_weights())

    result = finetune(model, batches, steps=6)

    # The same six steps by hand: loss and error of each batch before its update.
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(0.1)
    losses, errors = [], []
    for xb, yb in batches.take(6):
        with tf.GradientTape() as tape:
            logits = reference(xb, training=True)
            loss = loss_fn(yb, logits)
        grads = tape.gradient(loss, reference.trainable_variables)
        optimizer.apply(grads, reference.trainable_variables)
        losses.append(float(loss))
        errors.append(float(np.mean(np.argmax(logits, axis=-1) != yb.numpy())))

    assert result.steps == 6
    np.testing.assert_allclose(result.losses, losses, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.errors, errors, atol=1e-6)
    assert result.loss_auc == pytest.approx(np.trapezoid(result.losses) / 6)
    assert result.error_auc == pytest.approx(np.trapezoid(result.errors) / 6)
    assert result.test_loss is None and result.test_error is None


def test_area_under_curve_matches_leap_definition():
    curve = [2.0, 1.0, 0.5, 0.25]
    # compute_auc of amzn/metalearn-leap, src/omniglot/utils.py, written out.
    steps = len(curve)
    leap = sum(((curve[i] - curve[i - 1]) / 2 + curve[i - 1]) / steps for i in range(1, steps))
    assert area_under_curve(curve) == pytest.approx(leap)
    with pytest.raises(ValueError):
        area_under_curve([])


def test_trained_init_has_lower_loss_auc_than_random_init(exported, digits, tmp_path):
    x, y = digits
    train = (x[DOWNSTREAM_TRAIN], y[DOWNSTREAM_TRAIN])
    test = (x[DOWNSTREAM_TEST], y[DOWNSTREAM_TEST])
    trained = finetune(load_initialization(exported), train, test, steps=30)
    baseline = random_initialization(load_initialization(exported), seed=0)
    scratch = finetune(baseline, train, test, steps=30)
    assert trained.loss_auc < 0.5 * scratch.loss_auc
    assert trained.error_auc < scratch.error_auc
    assert trained.test_error < scratch.test_error

    record = json.loads(json.dumps(trained.to_dict()))
    assert record["steps"] == 30 and record["loss_auc"] == trained.loss_auc
    runs = {"trained init": trained, "random init": scratch}
    figure = plot_curves(runs, tmp_path / "curves.png")
    single = trained.plot(tmp_path / "single.png")
    for png in (figure, single):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_initialization_is_fresh_and_seeded(pretrained):
    first = random_initialization(pretrained, seed=3)
    again = random_initialization(pretrained, seed=3)
    other = random_initialization(pretrained, seed=4)
    assert first.output_shape == pretrained.output_shape
    for a, b in zip(first.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    kernels = [w for w in first.trainable_weights if w.name == "kernel"]
    others = [w for w in other.trainable_weights if w.name == "kernel"]
    originals = [w for w in pretrained.trainable_weights if w.name == "kernel"]
    for fresh, different, trained in zip(kernels, others, originals):
        assert not np.allclose(fresh.numpy(), different.numpy())
        assert not np.allclose(fresh.numpy(), trained.numpy())
    moving_means = [w for w in first.non_trainable_weights if w.name == "moving_mean"]
    assert moving_means and all(np.all(w.numpy() == 0) for w in moving_means)


def test_finetune_result_is_a_dataclass_with_steps():
    result = FinetuneResult(losses=[1.0, 0.5], errors=[0.5, 0.0], loss_auc=0.375, error_auc=0.125)
    assert result.to_dict() == {
        "losses": [1.0, 0.5],
        "errors": [0.5, 0.0],
        "loss_auc": 0.375,
        "error_auc": 0.125,
        "test_loss": None,
        "test_error": None,
        "steps": 2,
    }


def test_head_is_found_in_models_whose_layers_were_called_before():
    # keras.models.clone_model(...) then .build(input_shape) (no Input), and a
    # functional model made of layers another model called first: the head's
    # `.output` is its first call's, not the model's output. The features are
    # checked against NumPy: relu(x W + b) of the trunk.
    from tfmeta.heads import features_model, find_head, with_new_head

    layers = keras.layers
    keras.utils.set_random_seed(0)
    source = keras.Sequential([keras.Input((4,)), layers.Dense(6, activation="relu", name="trunk"),
                               layers.Dense(3, name="head")])
    clone = keras.models.clone_model(source)
    clone.build((None, 4))
    plain = keras.Sequential([layers.Dense(6, activation="relu", name="trunk"),
                              layers.Dense(3, name="head")])
    plain.build((None, 4))
    trunk, head = layers.Dense(6, activation="relu", name="trunk"), layers.Dense(3, name="head")
    first = keras.Input((4,))
    keras.Model(first, head(trunk(first)))
    second = keras.Input((4,))
    reused = keras.Model(second, head(trunk(second)))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    for model in (clone, plain, reused):
        found, features = find_head(model)
        assert found is model.layers[-1]
        assert features is not None
        kernel, bias = model.get_layer("trunk").get_weights()
        np.testing.assert_allclose(features_model(model)(x).numpy(),
                                   np.maximum(x @ kernel + bias, 0.0), rtol=1e-5, atol=1e-6)
        new = with_new_head(model, 7)
        assert new.output_shape == (None, 7) and new.layers[-1] is not found
        np.testing.assert_array_equal(new.get_layer("trunk").kernel.numpy(), kernel)
        hidden = np.maximum(x @ kernel + bias, 0.0)
        w, b = new.layers[-1].get_weights()
        np.testing.assert_allclose(new(x).numpy(), hidden @ w + b, rtol=1e-5, atol=1e-5)
