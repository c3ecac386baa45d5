"""Bad input fails early, with one line that names the problem and the fix.

Every case runs before any train step: the table checks the error type,
that the (first line of the) message says what to change, and that the
failed command left nothing behind. The command-line tests then check that
each case prints exactly that one line and exits 2, that following the
advice of a message works, and the cases that need a process of their own
(a file-size limit, Ctrl-C), grouped so that few processes start.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import gin
import keras
import numpy as np
import pytest

import tfmeta
from tfmeta.checkpoint import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    save_checkpoint,
)
from tfmeta.divergence import DivergenceError
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


REPO = pathlib.Path(__file__).resolve().parents[1]
#: What the last `cli` call changed under tmp_path (a failed call must change nothing).
CHANGED = []


def _tree(root):
    return {
        str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
        for p in pathlib.Path(root).rglob("*")
    }


def argv_for(output_dir, *bindings, gin_file="gin/digits.gin", resume=False):
    argv = ["--gin_file", gin_file, "--output_dir", str(output_dir)]
    for binding in (*BASE, *bindings):
        argv += ["--gin_param", binding]
    return argv + (["--resume"] if resume else [])


def cli(tmp_path, *bindings, gin_file="gin/digits.gin", resume=False, output_dir=None):
    from tfmeta.cli.train import run

    argv = argv_for(output_dir or tmp_path / "run", *bindings, gin_file=gin_file, resume=resume)
    before = _tree(tmp_path)
    gin.clear_config()
    try:
        return run(argv)
    finally:
        gin.clear_config()
        after = _tree(tmp_path)
        CHANGED[:] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def _write(path, content):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _earlier_run(tmp_path, *bindings):
    """A finished quick run in tmp_path/run (what the resume and overwrite cases find)."""
    cli(tmp_path, *bindings)
    assert (tmp_path / "run" / "results.json").is_file()


# Models and task families that gin cannot build from tfmeta's own configurables.
def _frozen_model():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(5, trainable=False)])


def _image_output_model():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(5, 1)])


def _float_label_tasks():
    from tfmeta.tasks import ClassificationTasks

    x, y = np.zeros((10, 8, 8, 1), np.uint8), (np.arange(10) % 5).astype(np.float64)
    return ClassificationTasks([(x, y, x, y)] * 8)


def _nan_image_tasks():
    from tfmeta.tasks import ClassificationTasks

    x, y = np.full((10, 8, 8, 1), np.nan, np.float32), np.arange(10) % 5
    return ClassificationTasks([(x, y, x, y)] * 8)


for _configurable in (_frozen_model, _image_output_model, _float_label_tasks, _nan_image_tasks):
    gin.external_configurable(_configurable, name=_configurable.__name__[1:], module="tests.bad_input")


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

    meta = _compile(tfmeta.MetaModel(mlp(5, input_shape=(8, 8, 1))), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.zeros((3, 2, 5, 8, 8), "float32")  # the channel axis is missing
    meta.fit(x, np.zeros((3, 2, 5), "int32"), batch_size=3, verbose=0)


def compile_negative_inner_learning_rate(tmp_path):
    _compile(tfmeta.MetaModel(_small_model()), inner_optimizer=keras.optimizers.SGD(-1.0))


def gin_syntax_error_in_file(tmp_path):
    cli(tmp_path, gin_file=str(_write(tmp_path / "bad.gin", "train.meta_updates = = 3\n")))


def gin_reference_without_at(tmp_path):
    cli(tmp_path, "train.learner=Reptile()")


def gin_bracket_never_closed(tmp_path):
    cli(tmp_path, "mlp.units = (64, 64")


def empty_gin_file(tmp_path):
    cli(tmp_path, gin_file=str(_write(tmp_path / "empty.gin", "")))


def binary_gin_file(tmp_path):
    cli(tmp_path, gin_file=str(_write(tmp_path / "bin.gin", bytes(range(128, 256)))))


def gin_file_is_a_directory(tmp_path):
    (tmp_path / "configs.gin").mkdir()
    cli(tmp_path, gin_file=str(tmp_path / "configs.gin"))


def misspelt_gin_file(tmp_path):
    cli(tmp_path, gin_file="gin/digit.gin")


def float_labels(tmp_path):
    cli(tmp_path, "train.tasks = @float_label_tasks()")


def float_images_with_nan(tmp_path):
    cli(tmp_path, "train.tasks = @nan_image_tasks()")


def train_shots_zero(tmp_path):
    cli(tmp_path, "digits_tasks.train_shots = 0")


def heldout_tasks_without_test_examples(tmp_path):
    cli(tmp_path, "digits_tasks.test_shots = 0", "train.evaluation = @heldout_finetuning")


def output_dir_under_a_file(tmp_path):
    _write(tmp_path / "notes", "a file")
    cli(tmp_path, output_dir=tmp_path / "notes" / "run")


def output_dir_is_a_file(tmp_path):
    cli(tmp_path, output_dir=_write(tmp_path / "run", "a file"))


def checkpoint_every_zero(tmp_path):
    cli(tmp_path, "train.checkpoint_every = 0")


def heldout_finetuning_steps_zero(tmp_path):
    cli(tmp_path, "train.evaluation = @heldout_finetuning", "heldout_finetuning.steps = 0")


def unknown_strategy_name(tmp_path):
    cli(tmp_path, "train.strategy = 'mirored'")


def misspelt_loss_name(tmp_path):
    cli(tmp_path, "train.loss = 'sparse_categorical_crossentropi'")


def mse_on_class_labels(tmp_path):
    cli(tmp_path, "train.loss = @MeanSquaredError()")


def model_without_trainable_weights(tmp_path):
    cli(tmp_path, "train.model = @frozen_model()")


def model_output_not_a_vector(tmp_path):
    cli(tmp_path, "train.model = @image_output_model()")


def overwrite_and_resume_together(tmp_path):
    cli(tmp_path, "train.overwrite = True", resume=True)


def overwrite_a_folder_that_is_not_a_run(tmp_path):
    _write(tmp_path / "run" / "thesis.tex", "years of work")
    cli(tmp_path, "train.overwrite = True")


def resume_with_another_meta_learning_rate(tmp_path):
    _earlier_run(tmp_path)
    cli(tmp_path, "meta/SGD.learning_rate = 0.5", resume=True)


def resume_with_another_task_seed(tmp_path):
    _earlier_run(tmp_path)
    cli(tmp_path, "digits_tasks.seed = 3", resume=True)


def resume_with_another_length(tmp_path):
    _earlier_run(tmp_path)
    cli(tmp_path, "train.meta_updates = 6", resume=True)


def diverged_at_the_first_step(tmp_path):
    cli(tmp_path, "inner/SGD.learning_rate = 1e30")


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
    (gin_syntax_error_in_file, ConfigError, r"bad\.gin line 1: .*write each binding as configurable\.parameter = value"),
    (gin_reference_without_at, ConfigError, r"'train\.learner=Reptile\(\)': 'Reptile' is not a gin value: write @Reptile\(\)"),
    (gin_bracket_never_closed, ConfigError, r"'mlp\.units = \(64, 64': a bracket or quote is opened and never closed: close it"),
    (empty_gin_file, ConfigError, r"empty\.gin\) binds no train\.tasks, .*start from a complete config such as gin/digits\.gin"),
    (binary_gin_file, ConfigError, r"bin\.gin is not a gin text file .*pass a gin config such as gin/digits\.gin"),
    (gin_file_is_a_directory, ConfigError, r"configs\.gin is a directory, not a gin file: pass one of the files in it"),
    (misspelt_gin_file, ConfigError, r"gin/digit\.gin does not exist: pass an existing --gin_file; did you mean gin/digits\.gin\?"),
    (float_labels, TypeError, r"y_train must hold integer class labels .*float64 \(whole numbers\): convert them with y\.astype\('int32'\)"),
    (float_images_with_nan, TypeError, r"x_train must be uint8 .* 640 NaN or infinite values: repair or drop those images"),
    (train_shots_zero, ValueError, r"train_shots=0 must be an integer >= 1: set digits_tasks\.train_shots"),
    (heldout_tasks_without_test_examples, ValueError, r"has no test examples.*digits_tasks\.test_shots >= 1\), or set train\.evaluation = None"),
    (output_dir_under_a_file, NotADirectoryError, r"notes, which is a file, not a folder: choose an --output_dir elsewhere"),
    (output_dir_is_a_file, NotADirectoryError, r"is a file, not a folder: choose another --output_dir"),
    (checkpoint_every_zero, ValueError, r"train\.checkpoint_every=0 must be an integer >= 1: set train\.checkpoint_every"),
    (heldout_finetuning_steps_zero, ValueError, r"heldout_finetuning\.steps=0 must be an integer >= 1: set heldout_finetuning\.steps"),
    (unknown_strategy_name, ValueError, r"Unknown strategy 'mirored': choose one of"),
    (misspelt_loss_name, ConfigError, r"did you mean 'sparse_categorical_crossentropy'"),
    (mse_on_class_labels, ConfigError, r"for class labels use keras\.losses\.SparseCategoricalCrossentropy"),
    (model_without_trainable_weights, ConfigError, r"no trainable weights.*unfreeze it"),
    (model_output_not_a_vector, ConfigError, r"not a vector per example.*end the model with Flatten\(\)"),
    (overwrite_and_resume_together, ValueError, r"--resume and train\.overwrite=True contradict each other: drop one"),
    (overwrite_a_folder_that_is_not_a_run, FileExistsError, r"not part of a tfmeta run \(thesis\.tex\).*choose another --output_dir"),
    (resume_with_another_meta_learning_rate, IncompatibleCheckpointError,
     r"written with meta/SGD\.learning_rate = 0\.1, this run has 0\.5: resume with --gin_param \"meta/SGD\.learning_rate = 0\.1\""),
    (resume_with_another_task_seed, IncompatibleCheckpointError,
     r"written with digits_tasks\.seed = 0, this run has 3: resume with --gin_param \"digits_tasks\.seed = 0\""),
    (diverged_at_the_first_step, DivergenceError, r"at meta-update 1.*lower it \(e\.g\. inner/SGD\.learning_rate = "),
    (resume_with_another_length, IncompatibleCheckpointError,
     r"written with train\.meta_updates = 3, this run has 6: resume with --gin_param \"train\.meta_updates = 3\""),
]


@pytest.mark.parametrize("case, error, fix", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_fails_early_naming_the_fix(case, error, fix, tmp_path):
    CHANGED.clear()
    with pytest.raises(error) as raised:
        case(tmp_path)
    assert type(raised.value) is error or isinstance(raised.value, error)
    first_line = str(raised.value).splitlines()[0]
    assert re.search(fix, first_line), first_line
    # Nothing was trained: no checkpoint beyond the ones a case planted, no export.
    if not case.__name__.startswith("resume_"):
        assert not (tmp_path / "run" / "history.csv").exists()
    # The failed command changed nothing: no empty run folder, no logs.
    assert CHANGED == [], CHANGED


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


# ------------------------------------------------------------- advice, followed
def _main(tool, argv):
    """`main` of tools/train.py ("train") or tools/finetune.py ("finetune"), gin cleared around it."""
    from tfmeta.cli import finetune, train

    gin.clear_config()
    try:
        return {"train": train, "finetune": finetune}[tool].main(argv)
    finally:
        gin.clear_config()


def _weights(run):
    return keras.saving.load_model(run / "initialization" / "model.keras").get_weights()


def test_overwrite_as_advised_starts_a_fresh_run(tmp_path):
    _earlier_run(tmp_path, "digits_tasks.seed = 1")
    _write(tmp_path / "run" / "logs" / "earlier.marker", "from the earlier run")
    with pytest.raises(FileExistsError, match=r"pass --gin_param train\.overwrite=True to start the run afresh"):
        cli(tmp_path)
    results = cli(tmp_path, "train.overwrite = True")  # the advice, followed
    assert results["resumed_from_step"] == 0
    assert not (tmp_path / "run" / "logs" / "earlier.marker").exists()
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 1 + 3  # this run's epochs only
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left aside
    cli(tmp_path, output_dir=tmp_path / "fresh")
    for overwritten, fresh in zip(_weights(tmp_path / "run"), _weights(tmp_path / "fresh")):
        np.testing.assert_allclose(overwritten, fresh, rtol=1e-6, atol=1e-7)


def test_resume_or_overwrite_as_advised_for_leftover_checkpoints(tmp_path):
    _earlier_run(tmp_path)
    # As if killed after the last checkpoint, before the export: only checkpoints remain.
    for name in ("initialization", "results.json", "operative_config.gin"):
        path = tmp_path / "run" / name
        (path.unlink if path.is_file() else lambda: __import__("shutil").rmtree(path))()
    with pytest.raises(FileExistsError, match=r"pass --resume to continue it") as raised:
        cli(tmp_path)
    assert "--gin_param train.overwrite=True to start afresh" in str(raised.value)
    resumed = cli(tmp_path, resume=True)  # the first advice, followed: exported, nothing retrained
    assert resumed["resumed_from_step"] == resumed["train_steps"] == 3
    assert (tmp_path / "run" / "initialization" / "model.keras").is_file()
    afresh = cli(tmp_path, "train.overwrite = True")  # the second
    assert afresh["resumed_from_step"] == 0
    for a, b in zip(resumed["history"]["loss"], afresh["history"]["loss"]):
        assert a == pytest.approx(b, rel=1e-5)


def test_resume_with_the_advised_binding_is_accepted(tmp_path):
    _earlier_run(tmp_path)
    with pytest.raises(IncompatibleCheckpointError) as raised:
        cli(tmp_path, "meta/SGD.learning_rate = 0.5", resume=True)
    advised = re.search(r'--gin_param "([^"]+)"', str(raised.value)).group(1)
    assert cli(tmp_path, "meta/SGD.learning_rate = 0.5", advised, resume=True)["complete"]


def test_resume_of_a_finished_run_says_so_and_redoes_nothing(tmp_path, capsys):
    _earlier_run(tmp_path)
    capsys.readouterr()
    before = _tree(tmp_path)
    assert _main("train", argv_for(tmp_path / "run", resume=True)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"Meta-training: 3 meta-updates, already complete in {tmp_path / 'run'}: nothing to resume "
        "(to train it again or longer, start afresh with --gin_param train.overwrite=True, or choose "
        "another --output_dir)."
    )
    assert _tree(tmp_path) == before  # no re-export, no rewritten results


def test_strategy_object_from_gin_is_accepted(tmp_path):
    # The docs allow a tf.distribute.Strategy for train.strategy: gin builds it.
    results = cli(tmp_path, "train.strategy = @MirroredStrategy()")
    assert results["meta_updates"] == 3
    assert "train.strategy = @MirroredStrategy()" in (tmp_path / "run" / "operative_config.gin").read_text()


@pytest.mark.parametrize("where", ["parent", "output_dir"])
def test_read_only_folder_is_refused_before_training(where, tmp_path):
    # A child process, so that as root (CI) it can run without the permission
    # override that would let root write into a read-only folder anyway.
    from test_atomic import without_dac_override

    folder = tmp_path / "locked"
    folder.mkdir()
    output_dir = folder / "run" if where == "parent" else folder
    argv = argv_for(output_dir)
    folder.chmod(0o500)
    try:
        before = _tree(tmp_path)
        proc = subprocess.run(
            [*without_dac_override(), sys.executable, "tools/train.py", *argv],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        after = _tree(tmp_path)
    finally:
        folder.chmod(0o700)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "not writable: choose another --output_dir" in lines[0], lines
    assert before == after


def _damaged_export(tmp_path, damage):
    from tfmeta.models import mlp

    keras.utils.set_random_seed(0)
    export = export_initialization(mlp(5, input_shape=(8, 8, 1), units=(8,)), tmp_path / "init")
    if damage == "saved_model.pb":
        (export / "saved_model" / "saved_model.pb").unlink()
    else:
        data = (export / "model.keras").read_bytes()
        (export / "model.keras").write_bytes(data[: len(data) // 2])
    return export


@pytest.mark.parametrize("damage, problem", [
    ("saved_model.pb", r"saved_model/saved_model\.pb is missing\. Re-export with"),
    ("model.keras", r"corrupt: the sha256 of model\.keras .*Re-export with"),
])
def test_finetune_command_on_a_damaged_export_prints_one_line(damage, problem, tmp_path, capsys):
    export = _damaged_export(tmp_path, damage)
    code = _main("finetune", ["--init", str(export), "--gin_file", "gin/digits.gin",
                              "--output_dir", str(tmp_path / "ft")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("tfmeta-finetune: error: CorruptExportError: "), err
    assert re.search(problem, err[0]), err[0]
    assert not (tmp_path / "ft").exists()


# ------------------------------------------------------------- in processes of their own
# One process runs several command lines in a row, each with its own stderr
# (file descriptor 2, so TensorFlow's C++ messages would show) and, if asked,
# a file-size limit (a soft RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write
# past it fails with EFBIG instead of killing the process).
DRIVER = r"""
import json, os, resource, shutil, sys, threading
import gin
from tfmeta.cli import finetune, train
outcomes = []
for call in json.loads(sys.argv[1]):
    for path in call.get("remove", []):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # A pipe, not a file: the file-size limit applies to files only, as on a terminal.
    read_end, write_end = os.pipe()
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    if call.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (call["fsize"], hard))
    try:
        code = {"train": train, "finetune": finetune}[call["tool"]].main(call["argv"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        reader.join()
        os.close(read_end)
        gin.clear_config()
    outcomes.append({"code": code, "stderr": b"".join(chunks).decode().splitlines()})
print(json.dumps(outcomes))
"""


def _user_env():
    """The environment of a user who set nothing (conftest quiets TensorFlow for the tests)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TFMETA_DEBUG", "TFMETA_FAULT"):
        env.pop(name, None)
    return env


def _drive(calls):
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(calls)],
        cwd=REPO, env=_user_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_each_command_line_error_is_one_line_with_exit_code_2(tmp_path):
    run, history = tmp_path / "run", tmp_path / "run" / "history.csv"
    export = _damaged_export(tmp_path, "model.keras")
    train = lambda *bindings, out=run, **kw: {"tool": "train", "argv": argv_for(out, *bindings, **kw)}  # noqa: E731
    calls = {
        "unknown parameter": train("train.meta_update = 3"),
        "missing gin file": train(gin_file="gin/digit.gin"),  # no stray "ERROR:root" line first
        "reference without @": train("train.learner=Reptile()"),
        "train_shots = 0": train("digits_tasks.train_shots = 0"),
        "output dir is a file": train(out=export / "model.keras"),
        "truncated export": {"tool": "finetune", "argv": ["--init", str(export), "--gin_file", "gin/digits.gin"]},
        # A file-size limit met by the first checkpoint: nothing is left behind.
        "file-size limit": {**train(out=tmp_path / "limited"), "fsize": 20_000},
        # A finished run whose export and results are lost (killed before them): its
        # resume first cuts history.csv back, which the limit stops half-way.
        "earlier run": train(),
        "history rewrite at the limit": {
            **train(resume=True), "fsize": 100,
            "remove": [str(run / "initialization"), str(run / "results.json")],
        },
        "limit lifted, as advised": train(resume=True),
    }
    outcomes = dict(zip(calls, _drive(list(calls.values()))))
    for name, outcome in outcomes.items():
        if name in ("earlier run", "limit lifted, as advised"):
            assert outcome["code"] == 0, (name, outcome)
            continue
        assert outcome["code"] == 2, (name, outcome)
        assert len(outcome["stderr"]) == 1, (name, outcome["stderr"])
        assert re.match(r"tfmeta-(train|finetune): error: \w+: ", outcome["stderr"][0]), (name, outcome)
    assert "File too large" in outcomes["file-size limit"]["stderr"][0]
    assert not (tmp_path / "limited").exists()
    line = outcomes["history rewrite at the limit"]["stderr"][0]
    assert f"could not write {history}: File too large; its previous content, if any, is unchanged" in line
    # The rewrite was atomic: the limit left history.csv whole (3 epochs), and
    # the resumed run with the limit lifted kept it.
    rows = history.read_text().splitlines()
    assert len(rows) == 1 + 3 and all(len(r.split(",")) == len(rows[0].split(",")) for r in rows)
    assert not list(run.glob(".history.csv.*"))
    assert (run / "results.json").is_file()


def test_ctrl_c_stops_with_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, str(REPO / "tools" / "train.py"), *argv_for(
        run, "train.meta_updates = 300", "train.steps_per_execution = 1", "train.epochs = 3")]
    env = _user_env()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "history.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # history.csv appears when training starts
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"tfmeta-train: interrupted at train step (\d+), checkpoint saved in (\S+): continue with: (.+)", last
    )
    assert match, last
    step, directory, resume = int(match[1]), pathlib.Path(match[2]), match[3]
    assert 0 < step < 300 and directory == run / "checkpoints"
    assert (directory / f"ckpt-{step:09d}" / "manifest.json").is_file()
    assert "Traceback" not in err
    # The advice, followed word for word.
    words = __import__("shlex").split(resume)
    assert words[:2] == ["python", str(REPO / "tools" / "train.py")] and words[-1] == "--resume"
    resumed = subprocess.run([sys.executable, *words[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["resumed_from_step"] == step and results["meta_updates"] == 300
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 3
