"""Bad input fails early, with one line that names the problem and the fix.

Every case runs before any train step: the table checks the error type and
that the (first line of the) message says what to change.
"""

import re

import gin
import keras
import pytest

import tfmeta
from tfmeta.checkpoint import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    save_checkpoint,
)
from tfmeta.export import CorruptExportError, InvalidExportError, export_initialization
from tfmeta.prepare import DatasetNotPreparedError
from tfmeta.validation import ConfigError

# A fast digits run; each case adds the binding that breaks it.
BASE = [
    "train.meta_updates = 3",
    "train.evaluation = None",
    "train.verbose = 0",
    "train.deterministic = False",
    "digits_tasks.num_pretrain = 8",
    "digits_tasks.num_heldout = 1",
]


def cli(tmp_path, *bindings, gin_file="gin/digits.gin", resume=False):
    from tfmeta.cli.train import run

    argv = ["--gin_file", gin_file, "--output_dir", str(tmp_path / "run")]
    for binding in (*BASE, *bindings):
        argv += ["--gin_param", binding]
    gin.clear_config()
    try:
        return run(argv + (["--resume"] if resume else []))
    finally:
        gin.clear_config()


def _small_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def _compile(meta, **overrides):
    kwargs = dict(
        optimizer=keras.optimizers.SGD(0.1),
        inner_optimizer=keras.optimizers.SGD(0.1),
        loss="mse",
        learner=tfmeta.Reptile(),
        inner_steps=2,
    )
    kwargs.update(overrides)
    meta.compile(**kwargs)
    return meta


# ------------------------------------------------------------- the cases
def unknown_gin_parameter(tmp_path):
    cli(tmp_path, "train.meta_update = 3")


def unknown_configurable(tmp_path):
    cli(tmp_path, "trian.seed = 1")


def missing_gin_file(tmp_path):
    cli(tmp_path, gin_file=str(tmp_path / "nope.gin"))


def inner_steps_zero(tmp_path):
    cli(tmp_path, "train.inner_steps = 0")


def batch_size_zero(tmp_path):
    cli(tmp_path, "train.batch_size = 0")


def inner_learning_rate_negative(tmp_path):
    cli(tmp_path, "inner/SGD.learning_rate = -0.1")


def meta_learning_rate_zero(tmp_path):
    cli(tmp_path, "meta/SGD.learning_rate = 0.0")


def fewer_tasks_than_meta_batch(tmp_path):
    cli(tmp_path, "train.tasks_per_batch = 9")


def empty_task_distribution(tmp_path):
    from tfmeta.tasks import ClassificationTasks

    ClassificationTasks([])


def labels_outside_model_classes(tmp_path):
    cli(tmp_path, "mlp.num_classes = 3")


def input_shape_wrong_for_model(tmp_path):
    cli(tmp_path, "mlp.input_shape = (28, 28, 1)")


def task_batch_rank_wrong_for_model(tmp_path):
    cli(tmp_path, "mlp.input_shape = (64,)")


def chunk_does_not_divide_k(tmp_path):
    cli(tmp_path, "train.steps_per_chunk = 3")


def epochs_do_not_divide_run(tmp_path):
    cli(tmp_path, "train.epochs = 7")


def export_exists_in_output_dir(tmp_path):
    (tmp_path / "run" / "initialization").mkdir(parents=True)
    cli(tmp_path)


def checkpoints_exist_without_resume(tmp_path):
    save_checkpoint(_built_meta(), tmp_path / "run" / "checkpoints", 1)
    cli(tmp_path)


def corrupt_checkpoint_on_resume(tmp_path):
    path = save_checkpoint(_built_meta(), tmp_path / "run" / "checkpoints", 1)
    (path / "state.npz").write_bytes(b"garbage")
    cli(tmp_path, resume=True)


def checkpoint_of_another_run_on_resume(tmp_path):
    save_checkpoint(_built_meta(), tmp_path / "run" / "checkpoints", 1, metadata={"seed": 99})
    cli(tmp_path, resume=True)


def checkpoint_of_another_model(tmp_path):
    from tfmeta.checkpoint import restore_checkpoint

    path = save_checkpoint(_built_meta(), tmp_path / "ckpt", 1)
    other = _compile(tfmeta.MetaModel(keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])))
    other.build((2, 1, 3, 4))
    restore_checkpoint(other, path)


def dataset_missing_offline(tmp_path):
    from tfmeta.tasks import omniglot_alphabets

    omniglot_alphabets(data_dir=tmp_path / "empty_tfds")


def export_path_exists(tmp_path):
    export_initialization(_small_model(), tmp_path / "init")
    export_initialization(_small_model(), tmp_path / "init")


def load_path_not_an_export(tmp_path):
    from tfmeta.export import load_initialization

    (tmp_path / "weights").mkdir()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save(tmp_path / "weights" / "m.keras")
    load_initialization(tmp_path / "weights")


def load_corrupt_export(tmp_path):
    from tfmeta.export import load_initialization

    export_initialization(_small_model(), tmp_path / "init")
    (tmp_path / "init" / "model.keras").write_bytes(b"truncated")
    load_initialization(tmp_path / "init")


def compile_inner_steps_zero(tmp_path):
    _compile(tfmeta.MetaModel(_small_model()), inner_steps=0)


def compile_without_learner(tmp_path):
    _compile(tfmeta.MetaModel(_small_model()), learner=None)


def unbuilt_model(tmp_path):
    tfmeta.MetaModel(keras.Sequential([keras.layers.Dense(3)]))


def meta_batch_not_divisible_by_replicas(tmp_path):
    import types

    import tensorflow as tf

    from tfmeta.distribute import distribute_task_batches

    batches = tf.data.Dataset.from_tensors((tf.zeros((3, 1, 2, 4)), tf.zeros((3, 1, 2, 3))))
    distribute_task_batches(batches, types.SimpleNamespace(num_replicas_in_sync=2))


def metamodel_fed_wrong_rank(tmp_path):
    import numpy as np

    from tfmeta.models import mlp

    meta = _compile(tfmeta.MetaModel(mlp(5, input_shape=(8, 8, 1))), loss="sparse_categorical_crossentropy")
    x = np.zeros((3, 2, 5, 8, 8), "float32")  # the channel axis is missing
    meta.fit(x, np.zeros((3, 2, 5), "int32"), batch_size=3, verbose=0)


def compile_negative_inner_learning_rate(tmp_path):
    _compile(tfmeta.MetaModel(_small_model()), inner_optimizer=keras.optimizers.SGD(-1.0))


def _built_meta():
    meta = _compile(tfmeta.MetaModel(_small_model()))
    meta.build((2, 1, 3, 4))
    return meta


CASES = [
    # (case, error type, the fix the first line must name)
    (unknown_gin_parameter, ConfigError, r"did you mean train\.meta_updates"),
    (unknown_configurable, ConfigError, r"did you mean train\?"),
    (missing_gin_file, ConfigError, r"pass an existing --gin_file"),
    (inner_steps_zero, ValueError, r"set train\.inner_steps .*>= 1"),
    (batch_size_zero, ValueError, r"set train\.batch_size to an integer >= 1"),
    (inner_learning_rate_negative, ValueError, r"set inner/SGD\.learning_rate .*to e\.g\. 0\.1"),
    (meta_learning_rate_zero, ValueError, r"set meta/SGD\.learning_rate .*to e\.g\. 0\.1"),
    (fewer_tasks_than_meta_batch, ValueError, r"use tasks_per_batch<=8"),
    (empty_task_distribution, ValueError, r"pass at least one task"),
    (labels_outside_model_classes, ValueError, r"give the model's head 5 units \(e\.g\. mlp\.num_classes = 5"),
    (input_shape_wrong_for_model, ValueError, r"make the model's input shape \(8, 8, 1\)"),
    (task_batch_rank_wrong_for_model, ValueError, r"give the model Input\(shape=\(8, 8, 1\)\)"),
    (chunk_does_not_divide_k, ValueError, r"steps_per_chunk=3 must be >= 1 and divide inner_steps=20"),
    (epochs_do_not_divide_run, ValueError, r"choose a divisor of"),
    (export_exists_in_output_dir, FileExistsError, r"pass --gin_param train\.overwrite=True"),
    (checkpoints_exist_without_resume, FileExistsError, r"pass --resume to continue it"),
    (corrupt_checkpoint_on_resume, CorruptCheckpointError, r"sha256 of state\.npz .*delete .* to resume from the previous"),
    (checkpoint_of_another_run_on_resume, IncompatibleCheckpointError, r"seed=99 .*resume with the original setting"),
    (checkpoint_of_another_model, IncompatibleCheckpointError, r"resume with the run's original configuration"),
    (dataset_missing_offline, DatasetNotPreparedError, r"prepare it offline with: python tools/prepare_data\.py"),
    (export_path_exists, FileExistsError, r"pass overwrite=True"),
    (load_path_not_an_export, InvalidExportError, r"Create an export with tfmeta\.export\.export_initialization"),
    (load_corrupt_export, CorruptExportError, r"Re-export with export_initialization\(\.\.\., overwrite=True\)"),
    (compile_inner_steps_zero, ValueError, r"inner_steps \(K\) must be an integer >= 1"),
    (compile_without_learner, ValueError, r"such as tfmeta\.Leap\(\) or tfmeta\.Reptile\(\)"),
    (unbuilt_model, ValueError, r"give the model an `Input`"),
    (metamodel_fed_wrong_rank, ValueError, r"must be .*\[T, S, B, 8, 8, 1\] \(rank 6\)"),
    (compile_negative_inner_learning_rate, ValueError, r"finite number >= 0: set the learning_rate of inner_optimizer"),
    (meta_batch_not_divisible_by_replicas, ValueError, r"choose tasks_per_batch a multiple of 2 \(e\.g\. 4\)"),
]


@pytest.mark.parametrize("case, error, fix", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_fails_early_naming_the_fix(case, error, fix, tmp_path):
    with pytest.raises(error) as raised:
        case(tmp_path)
    assert type(raised.value) is error or isinstance(raised.value, error)
    first_line = str(raised.value).splitlines()[0]
    assert re.search(fix, first_line), first_line
    # Nothing was trained: no checkpoint beyond the ones a case planted, no export.
    assert not (tmp_path / "run" / "history.csv").exists()


def test_at_least_fifteen_kinds():
    assert len({error for _, error, _ in CASES}) >= 6
    assert len(CASES) >= 15


def test_command_line_prints_one_line(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(repo / "tools" / "train.py"), "--gin_file", str(repo / "gin" / "digits.gin"),
         "--gin_param", "train.meta_update = 3", "--output_dir", str(tmp_path / "run")],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(repo)},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tfmeta-train: error:")]
    assert errors == [
        "tfmeta-train: error: ConfigError: gin binding train.meta_update: train has no "
        "parameter 'meta_update'; did you mean train.meta_updates?"
    ]
    assert "Traceback" not in proc.stderr
