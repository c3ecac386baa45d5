"""Never lose a run: kill -9 at any moment, resume, same phi; atomic exports.

The slow part is `test_killed_runs_resume_to_the_uninterrupted_phi`: five
`tools/train.py` processes in a row (killed four times with SIGKILL, at
chosen points inside a checkpoint write, from outside at an arbitrary
moment, and between checkpoints) next to one uninterrupted run, which
`test_a_killed_run_resumes_under_another_steps_per_execution` ends at too.
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from tfmeta.checkpoint import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
KILLED = -signal.SIGKILL

# Leap on digits with an inner optimizer that has slots (momentum): 12
# meta-updates of K=20 inner steps in chunks of S=5, i.e. 48 train steps in
# 2 epochs, 3 steps per execution, a checkpoint every 3 steps, so most
# checkpoints fall in the middle of a trajectory (in-flight task state).
FAST = [
    "train.meta_updates = 12",
    "train.epochs = 2",
    "train.steps_per_chunk = 5",
    "train.steps_per_execution = 3",
    "train.checkpoint_every = 3",
    "train.evaluation = None",
    "train.verbose = 0",
    "inner/SGD.momentum = 0.9",
    "digits_tasks.num_pretrain = 20",
    "digits_tasks.num_heldout = 2",
    "mlp.units = (32, 32)",
]


def _command(output_dir, resume=False, bindings=()):
    args = [sys.executable, str(REPO / "tools" / "train.py"), "--gin_file", str(REPO / "gin" / "digits.gin")]
    for binding in (*FAST, *bindings):  # a later binding of the same parameter wins
        args += ["--gin_param", binding]
    args += ["--output_dir", str(output_dir)]
    return args + (["--resume"] if resume else [])


def _env(fault=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    env.pop("TFMETA_FAULT", None)
    if fault:
        env["TFMETA_FAULT"] = fault
    return env


def _start_train(output_dir, fault=None, resume=False, bindings=()):
    return subprocess.Popen(
        _command(output_dir, resume, bindings), env=_env(fault), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _finish(proc, timeout=600):
    """The CompletedProcess of a started run; killed if it is still running after `timeout`."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill(proc):
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _train(output_dir, fault=None, resume=False, bindings=()):
    return _finish(_start_train(output_dir, fault, resume, bindings))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run the killed runs must end at, shared by their tests:
    started once, beside the first of them; `uninterrupted()` waits for it and
    returns its folder."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "reference"
    proc = _start_train(folder)
    finished = []

    def wait():
        if not finished:
            finished.append(_finish(proc))
        assert finished[0].returncode == 0, finished[0].stderr[-3000:]
        return folder

    yield wait
    _kill(proc)


def _steps(output_dir):
    return [step for step, _ in list_checkpoints(output_dir / "checkpoints")]


def _phi(output_dir):
    return keras.saving.load_model(output_dir / "initialization" / "model.keras").get_weights()


def test_killed_runs_resume_to_the_uninterrupted_phi(tmp_path, uninterrupted):
    run = tmp_path / "killed"
    checkpoints = run / "checkpoints"
    # 1. Killed inside its 3rd checkpoint write: state.npz is on disk, the
    #    manifest is not. Only the two complete checkpoints count.
    proc = _train(run, fault="checkpoint.state_written@3")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert _steps(run) == [3, 6]
    assert len(list(checkpoints.glob(".ckpt-*.partial"))) == 1

    # 2. Resumed from step 6 (the partial write is reported and removed);
    #    killed right after its 2nd checkpoint's rename, before pruning.
    proc = _train(run, fault="checkpoint.renamed@2", resume=True)
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert "incomplete checkpoint" in proc.stderr
    assert not list(checkpoints.glob(".ckpt-*"))
    assert _steps(run) == [6, 9, 12]

    # 3. Resumed from 12; SIGKILLed from outside at whatever moment it has
    #    reached once a checkpoint past step 18 exists.
    proc = _start_train(run, resume=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(step > 18 for step in _steps(run)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc = _finish(proc, timeout=300)
    assert proc.returncode in (KILLED, 0)

    # 4. Resumed; killed after its 2nd train execution, between checkpoints
    #    (the steps since the last checkpoint are lost and replayed).
    if proc.returncode == KILLED:
        proc = _train(run, fault="train.step@2", resume=True)
        assert proc.returncode in (KILLED, 0), proc.stderr[-3000:]

    # 5. Resumed to the end.
    proc = _train(run, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Meta-training: 12 meta-updates" in proc.stdout
    reference = uninterrupted()

    for resumed, straight in zip(_phi(run), _phi(reference)):
        np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)
    # The logs too: a resumed epoch continues the interrupted epoch's metrics.
    assert (run / "history.csv").read_text() == (reference / "history.csv").read_text()
    results = json.loads((run / "results.json").read_text())
    assert results["meta_updates"] == 12 and results["train_steps"] == 48
    assert results["resumed_from_step"] > 0
    assert _steps(run)[-1] == 48 and len(_steps(run)) == 2


def test_a_killed_run_resumes_under_another_steps_per_execution(tmp_path, uninterrupted):
    """tools/train.py killed at step 6 of 48 (executions of 3), resumed with steps_per_execution = 8.

    The rest of the first epoch (21 steps from the checkpoint at 3) runs in
    executions of 7, the second epoch in executions of 8, to the
    uninterrupted run's phi and history bit for bit. A checkpoint of an
    earlier tfmeta, whose saved bindings still hold train.steps_per_execution,
    resumes the same way; a binding a resume may not change is still refused
    with the command line's message.
    """
    run, older = tmp_path / "killed", tmp_path / "older"
    eight = ["train.steps_per_execution = 8", "train.keep_checkpoints = 20"]
    # Killed at the end of its 2nd execution (step 6), before that step's checkpoint.
    proc = _train(run, fault="train.step@2")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert _steps(run) == [3]
    shutil.copytree(run, older)

    eights = _start_train(run, resume=True, bindings=eight)  # beside the older checkpoint's runs
    try:
        # The same checkpoint as an earlier tfmeta wrote it: steps_per_execution among its bindings.
        manifest = older / "checkpoints" / "ckpt-000000003" / "manifest.json"
        written = json.loads(manifest.read_text())
        assert "train.steps_per_execution" not in written["metadata"]["bindings"]  # resumable: not saved
        written["metadata"]["bindings"]["train.steps_per_execution"] = "3"
        manifest.write_text(json.dumps(written))
        refused = _train(older, resume=True, bindings=[*eight, "meta/SGD.learning_rate = 0.5"])
        assert refused.returncode != 0
        assert (
            'was written with meta/SGD.learning_rate = 0.1, this run has 0.5: resume with '
            '--gin_param "meta/SGD.learning_rate = 0.1"'
        ) in refused.stderr, refused.stderr[-3000:]
        assert "steps_per_execution" not in refused.stderr  # one message, naming only the real change
        proc = _train(older, resume=True, bindings=eight)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _steps(older) == [3, 10, 17, 24, 32, 40, 48]
    except BaseException:
        _kill(eights)
        raise
    proc = _finish(eights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(run) == [3, 10, 17, 24, 32, 40, 48]  # executions of 7, then of 8
    reference = uninterrupted()

    for folder in (run, older):
        for resumed, straight in zip(_phi(folder), _phi(reference), strict=True):
            np.testing.assert_array_equal(resumed, straight)
        assert (folder / "history.csv").read_text() == (reference / "history.csv").read_text()
        results = json.loads((folder / "results.json").read_text())
        assert results["resumed_from_step"] == 3 and results["train_steps"] == 48


# --------------------------------------------------------------- in-process
def _meta(units=16, tasks=3, seed=0):
    import tfmeta
    from tfmeta.models import mlp

    keras.utils.set_random_seed(seed)
    net = mlp(5, units=(units,))
    meta = tfmeta.MetaModel(net)
    meta.compile(
        optimizer=keras.optimizers.SGD(0.5),
        inner_optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        learner=tfmeta.Leap(),
        inner_steps=4,
    )
    meta.build((tasks, 2, 5, 8, 8, 1))
    return meta


@pytest.fixture(scope="module")
def digits():
    from tfmeta.tasks import digits_tasks

    pretrain, _ = digits_tasks(num_pretrain=8, num_heldout=1)
    return pretrain


def _stream(tasks, start=0):
    return tasks.as_dataset(tasks_per_batch=3, inner_steps=4, batch_size=5, steps_per_chunk=2,
                            seed=3, start=start)


def test_stream_start_equals_skipping(digits):
    full = [x.numpy() for x, _ in _stream(digits).take(7)]
    for start in (1, 2, 5):  # inside a trajectory, at its boundary, later
        resumed = [x.numpy() for x, _ in _stream(digits, start).take(7 - start)]
        for a, b in zip(resumed, full[start:]):
            np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip_resumes_exactly(digits, tmp_path):
    from tfmeta.checkpoint import MetaCheckpoint

    straight = _meta()
    checkpoint = MetaCheckpoint(tmp_path / "ckpt", every_steps=3, keep=3)
    assert checkpoint.restore(straight) == 0
    straight.fit(_stream(digits), steps_per_epoch=7, verbose=0, callbacks=[checkpoint])
    # Checkpoints at steps 3, 6 and 7: cut back to 3, as if killed after it.
    saved = list_checkpoints(tmp_path / "ckpt")
    assert [step for step, _ in saved] == [3, 6, 7]
    for _, path in saved[1:]:
        shutil.rmtree(path)
    # A fresh process would start from a new model: restore into one.
    second = _meta(seed=1)
    resumed = MetaCheckpoint(tmp_path / "ckpt", every_steps=1)
    start = resumed.restore(second)
    assert start == 3 and int(second.position.numpy()) == 2  # mid-trajectory
    second.fit(_stream(digits, start), steps_per_epoch=7 - start, verbose=0, callbacks=[resumed])
    for a, b in zip(second.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(second.optimizer.variables, straight.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert _steps_in(tmp_path / "ckpt") == [6, 7]


def _steps_in(directory):
    return [step for step, _ in list_checkpoints(directory)]


def test_corrupt_or_partial_checkpoints_are_never_loaded(tmp_path):
    meta = _meta()
    directory = tmp_path / "ckpt"
    save_checkpoint(meta, directory, 1)
    newest = save_checkpoint(meta, directory, 2)
    # A partial write (killed writer) is reported and removed, never loaded.
    (directory / ".ckpt-000000003.0badc0de.partial").mkdir()
    path, manifest = latest_checkpoint(directory)
    assert path == newest and manifest["step"] == 2
    assert not list(directory.glob(".*"))

    state = newest / "state.npz"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="sha256 of state.npz.*delete"):
        latest_checkpoint(directory)
    (newest / "manifest.json").write_text('{"format": "tfmeta.checkpoint", "files": ')
    with pytest.raises(CorruptCheckpointError, match="manifest.json is missing or unreadable"):
        latest_checkpoint(directory)
    shutil.rmtree(newest)
    path, manifest = latest_checkpoint(directory)
    assert manifest["step"] == 1
    with pytest.raises(IncompatibleCheckpointError, match="different model or configuration"):
        restore_checkpoint(_meta(units=8), path)
    restore_checkpoint(_meta(seed=5), path)  # same architecture: loads


def test_same_seed_same_phi_in_process(digits):
    runs = []
    for _ in range(2):
        meta = _meta(seed=0)
        meta.fit(_stream(digits), steps_per_epoch=4, verbose=0)
        runs.append(meta.model.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, pathlib, shutil, sys
    from tfmeta.distribute import use_logical_cpus
    use_logical_cpus(2)
    import keras, numpy as np, tensorflow as tf
    import tfmeta
    from tfmeta.checkpoint import MetaCheckpoint, list_checkpoints
    from tfmeta.models import mlp
    from tfmeta.tasks import digits_tasks

    pretrain, _ = digits_tasks(num_pretrain=8, num_heldout=1)

    def stream(start=0):
        return pretrain.as_dataset(tasks_per_batch=4, inner_steps=4, batch_size=5,
                                   steps_per_chunk=2, seed=3, start=start)

    # One strategy for every model: separate MirroredStrategy objects in one
    # process can mix up their collective ops' instance keys.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def make(seed):
        with strategy.scope():
            keras.utils.set_random_seed(seed)
            meta = tfmeta.MetaModel(mlp(5, units=(16,)))
            meta.compile(optimizer=keras.optimizers.SGD(0.5),
                         inner_optimizer=keras.optimizers.Adam(0.01),
                         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         learner=tfmeta.Leap(), inner_steps=4)
        return meta

    straight = make(0)
    directory = pathlib.Path(sys.argv[1])
    checkpoint = MetaCheckpoint(directory, every_steps=3, keep=3)
    checkpoint.restore(straight, (2, 2, 5, 8, 8, 1))   # per replica: 2 of the 4 tasks
    straight.fit(stream(), steps_per_epoch=7, verbose=0, callbacks=[checkpoint])
    for _, path in list_checkpoints(directory)[1:]:   # steps 6 and 7: as if killed after 3
        shutil.rmtree(path)
    second = make(1)
    resumed = MetaCheckpoint(directory, every_steps=1)
    start = resumed.restore(second, (2, 2, 5, 8, 8, 1))
    second.fit(stream(start), steps_per_epoch=7 - start, verbose=0, callbacks=[resumed])
    diff = max(float(np.abs(a - b).max())
               for a, b in zip(second.model.get_weights(), straight.model.get_weights()))

    # A task with NaN inputs (task 1, on replica 0) under 2 replicas: left
    # out and counted; phi is that of meta-training on the 3 finite tasks.
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, 4, 1, 4, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 5, size=(4, 4, 1, 4)).astype("int32")
    x[:, 1, 0, 0] = np.nan

    def reptile(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            meta = tfmeta.MetaModel(mlp(5, units=(8,)))
            meta.compile(optimizer=keras.optimizers.SGD(1.0),
                         inner_optimizer=keras.optimizers.Adam(0.01),
                         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         learner=tfmeta.Reptile(), inner_steps=2)
        return meta

    mirrored = reptile(strategy)
    logs = mirrored.fit(tf.data.Dataset.from_tensor_slices((x, y)), verbose=0).history
    alone = reptile(tf.distribute.get_strategy())
    alone.fit(tf.data.Dataset.from_tensor_slices((x[:, [0, 2, 3]], y[:, [0, 2, 3]])), verbose=0)
    nan_diff = max(float(np.abs(a - b).max())
                   for a, b in zip(mirrored.model.get_weights(), alone.model.get_weights()))
    print(json.dumps({"start": start, "diff": diff, "skipped": logs["skipped_tasks"][-1],
                      "nan_diff": nan_diff}))
    """
)


def test_per_replica_task_state_is_checkpointed(tmp_path):
    """Under MirroredStrategy (2 logical CPUs) each replica's tasks are saved and
    restored exactly, and a diverging task on one replica is left out of the
    all-replica meta-update."""
    script = tmp_path / "distributed.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")], env=_env(),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["start"] == 3 and report["diff"] <= 1e-6
    assert report["skipped"] == 2 and report["nan_diff"] <= 1e-5
    manifest = json.loads((tmp_path / "ckpt" / "ckpt-000000007" / "manifest.json").read_text())
    replicas = {v["name"]: v["replicas"] for v in manifest["variables"]}
    assert replicas["meta_model/task_state/params_0"] == 2


# ------------------------------------------------------------------- export
EXPORT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import keras
    import tfmeta.export as export

    path, mode = sys.argv[1], sys.argv[2]

    def model(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

    export.export_initialization(model(0), path)
    print("ready", flush=True)
    # Failpoints (tfmeta.failpoints) SIGKILL the overwrite that follows:
    os.environ["TFMETA_FAULT"] = {
        "mid_write": "export.model_written@1",         # model.keras written, no SavedModel yet
        "between_renames": "atomic.dir_moved_aside@1",  # old export moved aside, new not in place
        "loop": "",
    }[mode]
    seed = 1
    while True:                     # "loop": overwrite until killed from outside
        export.export_initialization(model(seed), path, overwrite=True)
        seed += 1
        if mode != "loop":
            break
    """
)


def _export_subprocess(folder, mode):
    folder.mkdir()
    script = folder / "export_script.py"
    script.write_text(EXPORT_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(folder / "init"), mode],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_export_killed_mid_write_keeps_the_previous_export(tmp_path):
    """Three exporters SIGKILLed: inside the SavedModel write, between the two
    renames of an overwrite, and from outside at an arbitrary moment of a loop
    of overwrites (run side by side to save time)."""
    from tfmeta.export import export_initialization, load_initialization, read_export_info

    modes = ("mid_write", "between_renames", "loop")
    procs = {mode: _export_subprocess(tmp_path / mode, mode) for mode in modes}
    loop = procs["loop"]
    assert loop.stdout.readline().strip() == "ready", loop.stderr.read()[-3000:]
    time.sleep(1.0 + np.random.default_rng().uniform(0, 2.0))
    loop.send_signal(signal.SIGKILL)
    for mode in modes:
        _, err = procs[mode].communicate(timeout=300)
        assert procs[mode].returncode == KILLED, (mode, err[-3000:])
        folder = tmp_path / mode
        target = folder / "init"
        if mode == "between_renames":
            # The one moment without `init`: the previous export waits in `.init.*.old`.
            assert not target.exists()
            with pytest.raises(FileNotFoundError, match="rename it back"):
                read_export_info(target)
        else:
            read_export_info(target)  # complete, and every sha256 matches
        # The next export to the path first recovers whatever the kill left (and
        # here refuses to overwrite without overwrite=True).
        with pytest.raises(FileExistsError, match="overwrite=True"):
            export_initialization(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), target)
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
        loaded = load_initialization(target).get_weights()
        if mode != "loop":  # the previous export, intact: the seed-0 model
            keras.utils.set_random_seed(0)
            first = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).get_weights()
            for a, b in zip(loaded, first):
                np.testing.assert_array_equal(a, b)


# ------------------------------------------- failed saves: disk full, read-only
FAILED_SAVE_SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib, resource, signal, sys
    import keras
    import tfmeta
    from tfmeta import atomic
    from tfmeta.checkpoint import save_checkpoint
    from tfmeta.export import export_initialization
    from tfmeta.models import mlp

    keras.utils.set_random_seed(0)
    meta = tfmeta.MetaModel(mlp(5, units=(16,)))
    meta.compile(optimizer=keras.optimizers.SGD(0.5), inner_optimizer=keras.optimizers.Adam(0.01),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 learner=tfmeta.Leap(), inner_steps=4)
    meta.build((3, 2, 5, 8, 8, 1))
    save_checkpoint(meta, "ckpt", 1)
    export_initialization(meta.model, "init")
    meta.model.set_weights([w + 1 for w in meta.model.get_weights()])

    def checkpoint():
        save_checkpoint(meta, "ckpt", 2)

    def export():
        export_initialization(meta.model, "init", overwrite=True)

    if sys.argv[1] == "full_disk":
        keras_size = pathlib.Path("init/model.keras").stat().st_size
        pb_size = pathlib.Path("init/saved_model/saved_model.pb").stat().st_size
        state_size = pathlib.Path("ckpt/ckpt-000000001/state.npz").stat().st_size
        assert keras_size < pb_size and keras_size < state_size, (keras_size, pb_size, state_size)
        # RLIMIT_FSIZE makes writes past the limit fail with EFBIG, as a full
        # disk does, without root; SIGXFSZ ignored so that the write fails
        # instead of the process. The export fails on model.keras, then (a
        # larger limit) inside TensorFlow's SavedModel write.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        attempts = {"checkpoint": (keras_size - 1, checkpoint),
                    "export_keras": (keras_size - 1, export),
                    "export_savedmodel": ((keras_size + pb_size) // 2, export)}
        def limited(limit, save):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            save()
    else:
        os.chmod("ckpt", 0o555)
        os.chmod(".", 0o555)
        attempts = {"checkpoint": (None, checkpoint), "export_keras": (None, export)}
        def limited(limit, save):
            save()
    report = {}
    for name, (limit, save) in attempts.items():
        try:
            limited(limit, save)
            report[name] = None
        except atomic.WriteError as error:
            report[name] = [error.errno, str(error)]
    os.chmod(".", 0o755)
    os.chmod("ckpt", 0o755)
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def failed_saves(tmp_path_factory):
    """The failed-save script of every failure, started together: {failure: (work folder, process)}."""
    from test_atomic import without_dac_override

    runs = {}
    for failure in ("full_disk", "read_only"):
        try:
            prefix = without_dac_override() if failure == "read_only" else []
        except pytest.skip.Exception:
            continue  # its test skips, naming why
        folder = tmp_path_factory.mktemp(failure)
        script = folder / "failed_save.py"
        script.write_text(FAILED_SAVE_SCRIPT)
        work = folder / "work"
        work.mkdir()
        runs[failure] = work, subprocess.Popen(
            [*prefix, sys.executable, str(script), failure], cwd=work, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    yield runs
    for _, proc in runs.values():
        _kill(proc)


@pytest.mark.parametrize("failure, code", [("full_disk", errno.EFBIG), ("read_only", errno.EACCES)])
def test_a_failed_save_keeps_the_previous_checkpoint_and_export(failed_saves, failure, code):
    """A save that fails (disk full: a file-size limit; read-only folders) raises
    WriteError naming the target, and leaves the previous checkpoint and export
    complete, verified and loadable, with no half-written folder beside them."""
    from test_atomic import without_dac_override

    from tfmeta.export import load_initialization, read_export_info
    from tfmeta.models import mlp

    if failure not in failed_saves:
        without_dac_override()  # skips with the reason
    work, proc = failed_saves[failure]
    proc = _finish(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    targets = {"checkpoint": "ckpt/ckpt-000000002", "export_keras": "init", "export_savedmodel": "init"}
    for name, message in report.items():
        assert message is not None, f"{name} did not fail"
        assert message[0] == code, (name, message)
        assert f"could not write {targets[name]}: " in message[1] and "previous content" in message[1]
    if failure == "full_disk":
        assert "SavedModel" in report["export_savedmodel"][1]

    checkpoints = work / "ckpt"
    assert _steps_in(checkpoints) == [1] and [p.name for p in work.rglob(".*")] == []
    path, manifest = latest_checkpoint(checkpoints)  # verified: every sha256 matches
    assert manifest["step"] == 1
    restore_checkpoint(_meta(seed=3), path, manifest)
    read_export_info(work / "init")
    # The first export, not the +1 weights of the failed overwrites.
    keras.utils.set_random_seed(0)
    first = mlp(5, units=(16,))
    first.build((None, 8, 8, 1))
    for loaded, expected in zip(load_initialization(work / "init").get_weights(), first.get_weights()):
        np.testing.assert_array_equal(loaded, expected)


# --------------------------------------------------------------- divergence
def _nan_meta(tasks, learner=None, inner=None, K=2):
    import tfmeta
    from tfmeta.models import mlp

    keras.utils.set_random_seed(0)
    meta = tfmeta.MetaModel(mlp(5, units=(8,)))
    meta.compile(
        optimizer=keras.optimizers.SGD(1.0),
        inner_optimizer=inner or keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        learner=learner or tfmeta.Reptile(),
        inner_steps=K,
    )
    return meta


def _chunks(steps, tasks, nan_task=None, nan_at=()):
    """`steps` chunks of one inner step: x [steps, T, 1, 4, 8, 8, 1]; NaN in one task."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(steps, tasks, 1, 4, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 5, size=(steps, tasks, 1, 4)).astype("int32")
    for step in nan_at:
        x[step, nan_task, 0, 0, 0, 0, 0] = np.nan
    return x, y


def test_a_nan_task_is_left_out_and_counted(tmp_path):
    import tensorflow as tf

    x, y = _chunks(6, 3, nan_task=1, nan_at=(0, 3, 4))
    meta = _nan_meta(3)
    history = meta.fit(tf.data.Dataset.from_tensor_slices((x, y)), epochs=1, verbose=0)
    # Trajectories of K=2 steps: task 1 has a NaN in all three.
    assert history.history["skipped_tasks"][-1] == 3
    assert int(meta.meta_updates.numpy()) == 3 and int(meta.diverged_updates.numpy()) == 0
    assert np.isfinite(history.history["loss"][-1])
    phi = meta.model.get_weights()
    assert all(np.isfinite(w).all() for w in phi)
    # The meta-update is the mean over the finite tasks: the same as meta-training on them alone.
    alone = _nan_meta(2)
    alone.fit(tf.data.Dataset.from_tensor_slices((x[:, [0, 2]], y[:, [0, 2]])), epochs=1, verbose=0)
    for a, b in zip(phi, alone.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_diverged_cts_task_rejoins_after_its_reset(tmp_path):
    import tensorflow as tf

    import tfmeta

    # CTS: a meta-update after every inner step, tasks reset to phi every K = 4.
    x, y = _chunks(8, 3, nan_task=2, nan_at=(1,))
    meta = _nan_meta(3, learner=tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile()), K=4)
    history = meta.fit(tf.data.Dataset.from_tensor_slices((x, y)), epochs=1, verbose=0)
    # NaN at inner step 1 poisons task 2 for steps 1..3 of its first
    # trajectory (3 meta-updates); after the reset at step 4 it counts again.
    assert history.history["skipped_tasks"][-1] == 3
    assert int(meta.meta_updates.numpy()) == 8
    assert all(np.isfinite(w).all() for w in meta.model.get_weights())


def test_every_task_diverging_stops_naming_the_inner_learning_rate():
    import tensorflow as tf

    from tfmeta.divergence import DivergenceError

    x, y = _chunks(6, 2)
    meta = _nan_meta(2, inner=keras.optimizers.SGD(1e30), K=3)
    before = meta.model.get_weights()
    with pytest.raises(DivergenceError, match=r"inner learning rate \(SGD learning_rate=1e\+30\).*lower it"):
        meta.fit(tf.data.Dataset.from_tensor_slices((x * 1e3, y)), epochs=1, verbose=0)
    assert int(meta.diverged_updates.numpy()) == 1 and int(meta.skipped_tasks.numpy()) == 2
    for a, b in zip(meta.model.get_weights(), before):  # the update was skipped
        np.testing.assert_array_equal(a, b)
