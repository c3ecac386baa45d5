"""The training job's named steps, called one by one, are `train`; history.csv survives crashes."""

import dataclasses
import inspect
import json
import logging
import types

import keras
import numpy as np
import pytest

import tfmeta
from tfmeta import failpoints
from tfmeta.cli import history, job
from tfmeta.models import mlp
from tfmeta.tasks import digits_tasks

# K = 4 inner steps in chunks of S = 1: a meta-update every 4 train steps.
# Op determinism is what `train` switches on around its steps; off here, the steps and
# the call run the same kernels.
SETTINGS = dict(inner_steps=4, meta_updates=6, tasks_per_batch=4, batch_size=5, epochs=2, verbose=0,
                deterministic=False)


def _parts():
    keras.utils.set_random_seed(0)
    return job.Parts(
        tasks=digits_tasks(num_pretrain=8, num_heldout=2, train_shots=5, test_shots=2),
        model=mlp(5, input_shape=(8, 8, 1), units=(16,)),
        learner=tfmeta.Leap(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        meta_optimizer=keras.optimizers.SGD(0.1),
        inner_optimizer=keras.optimizers.SGD(0.1),
    )


def _defaults():
    """`train`'s default settings (its parameters with defaults that are not parts)."""
    parts = {f.name for f in dataclasses.fields(job.Parts)}
    return {
        name: p.default for name, p in inspect.signature(job.train).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in parts
    }


def _phi(run):
    return keras.saving.load_model(run / "initialization" / "model.keras").get_weights()


def test_the_steps_one_by_one_are_the_train_call(tmp_path):
    whole = job.train(tmp_path / "whole", **vars(_parts()), **SETTINGS)

    steps = _built(tmp_path / "steps", **SETTINGS)
    assert (steps.total, steps.per_epoch) == (6 * 4, 6 * 4 // 2)
    start = steps.resume()
    assert start == 0  # not --resume
    results = _finish(steps, start)

    assert results["meta_updates"] == whole["meta_updates"] == 6
    assert results["history"] == whole["history"]
    _assert_same_phi(tmp_path / "steps", tmp_path / "whole")
    assert json.loads((tmp_path / "steps" / "results.json").read_text())["train_steps"] == 24


def _built(output_dir, **settings):
    """A `TrainingJob` with `settings` (`train`'s defaults for the rest), checked and built."""
    parts = _parts()
    steps = job.TrainingJob(output_dir, job.configure(parts, **{**_defaults(), **settings}), parts)
    steps.folder.check(overwrite=False, resume=steps.settings.resume)
    steps.build()
    return steps


def _finish(steps, start):
    """Fit from train step `start`, export and evaluate, as `train` does; return the results."""
    with steps.folder.claimed(replace=False):
        logged, _ = steps.fit(start)
    steps.export()
    return steps.evaluate(logged, 0.0, start)


def _assert_same_phi(run, other):
    for a, b in zip(_phi(run), _phi(other)):
        np.testing.assert_array_equal(a, b)


def test_configure_names_the_binding_to_fix():
    with pytest.raises(ValueError, match=r"train\.keep_checkpoints=0 must be an integer >= 1"):
        job.configure(_parts(), **{**_defaults(), **SETTINGS, "keep_checkpoints": 0})
    with pytest.raises(ValueError, match=r"train\.checkpoint_seconds=-1 must be a number of seconds > 0"):
        job.configure(_parts(), **{**_defaults(), **SETTINGS, "checkpoint_seconds": -1})
    with pytest.raises(ValueError, match=r"train\.task_shards=0 is not a number of task shards"):
        job.configure(_parts(), **{**_defaults(), **SETTINGS, "task_shards": 0})
    with pytest.raises(ValueError, match=r"train\.task_shards='auto' splits .* set train\.vectorize_tasks = True"):
        job.configure(_parts(), **{**_defaults(), **SETTINGS, "task_shards": "auto"})


def test_only_how_a_run_logs_and_checkpoints_may_change_on_resume():
    saved = {"train.meta_updates": "300", "meta/SGD.learning_rate": "0.1", "train.verbose": "1",
             "heldout_finetuning.steps": "50"}
    job.check_same_bindings(
        job.fixed_bindings(saved), job.fixed_bindings({**saved, "train.verbose": "0", "heldout_finetuning.steps": "9"}),
        "ckpt",
    )
    with pytest.raises(tfmeta.checkpoint.IncompatibleCheckpointError, match=r"meta/SGD\.learning_rate = 0\.1, this run leaves it unbound"):
        job.check_same_bindings(job.fixed_bindings(saved), {"train.meta_updates": "300"}, "ckpt")
    with pytest.raises(tfmeta.checkpoint.IncompatibleCheckpointError, match=r"written with mlp\.units unbound.*drop that binding"):
        job.check_same_bindings({}, {"mlp.units": "(8,)"}, "ckpt")


def test_a_resume_may_change_steps_per_execution_even_of_an_older_checkpoint(tmp_path):
    """An earlier tfmeta saved train.steps_per_execution among the bindings; a resume may change it now."""
    older = {"train.meta_updates": "300", "train.steps_per_execution": "10", "meta/SGD.learning_rate": "0.1"}
    current = {**older, "train.steps_per_execution": "4"}
    assert job.fixed_bindings(older) == {"train.meta_updates": "300", "meta/SGD.learning_rate": "0.1"}
    job.check_same_bindings(job.fixed_bindings(older), job.fixed_bindings(current), "ckpt")
    with pytest.raises(tfmeta.checkpoint.IncompatibleCheckpointError) as refused:
        job.check_same_bindings(job.fixed_bindings(older), job.fixed_bindings({**current, "train.meta_updates": "600"}), "ckpt")
    assert str(refused.value).startswith(
        'checkpoint ckpt was written with train.meta_updates = 300, this run has 600: resume with '
        '--gin_param "train.meta_updates = 300"'
    )  # the only difference named: no "more differ"
    assert job.fixed_bindings(None) is None  # a checkpoint or run without bindings: not compared

    # The checkpoint leaves the bindings to that check; the rest of its metadata it still compares.
    checkpoint = tfmeta.checkpoint.MetaCheckpoint(
        tmp_path, metadata={"seed": 0, "bindings": job.fixed_bindings(current)}, unchecked_metadata=("bindings",)
    )
    checkpoint.check_metadata({"metadata": {"seed": 0, "bindings": older}}, "ckpt")
    with pytest.raises(tfmeta.checkpoint.IncompatibleCheckpointError, match=r"written with seed=1 but this run has seed=0"):
        checkpoint.check_metadata({"metadata": {"seed": 1, "bindings": older}}, "ckpt")


HEADER = "epoch,loss,meta_updates"


def test_history_cut_keeps_whole_rows_of_earlier_epochs(tmp_path):
    path = tmp_path / "history.csv"
    # Rows as Keras' CSVLogger writes them; the last one cut short by a crash.
    path.write_bytes(f"{HEADER}\r\n0,0.5,100.0\r\n1,0.3,200.0\r\n2,0.2".encode())
    history.keep_epochs_before(path, 2)
    assert path.read_bytes() == f"{HEADER}\r\n0,0.5,100.0\r\n1,0.3,200.0\r\n".encode()
    assert history.read_history(path) == {"loss": [0.5, 0.3], "meta_updates": [100.0, 200.0]}
    history.keep_epochs_before(path, 1)
    assert history.read_history(path) == {"loss": [0.5], "meta_updates": [100.0]}
    assert not list(tmp_path.glob(".history.csv.*"))  # no temporary file left
    history.keep_epochs_before(path, 0)  # a fresh run
    assert not path.exists() and history.read_history(path) == {}


@pytest.mark.parametrize("limit", [None, 123.0])
def test_max_task_loss_binding_reaches_the_meta_model(tmp_path, limit):
    """`train.max_task_loss`, which the DivergenceError advises, is what the loop checks."""
    parts = _parts()
    settings = job.configure(parts, **{**_defaults(), **SETTINGS, "max_task_loss": limit})
    steps = job.TrainingJob(tmp_path / "run", settings, parts)
    steps.folder.check(overwrite=False, resume=False)
    steps.build()
    assert steps.meta.max_task_loss == limit


def test_heads_binding_trains_per_task_heads_and_exports_an_untrained_head(tmp_path):
    """`train.heads = @TaskHeads()`: the stream carries task ids, the bank trains, phi's head stays."""
    parts = _parts()
    parts.heads = tfmeta.TaskHeads(num_heads=parts.tasks[0].num_tasks)  # (pretrain, heldout)
    head_before = [w.copy() for w in parts.model.layers[-1].get_weights()]
    results = job.train(tmp_path / "run", **vars(parts), **SETTINGS)
    assert results["meta_updates"] == 6
    exported = keras.saving.load_model(tmp_path / "run" / "initialization" / "model.keras")
    for a, b in zip(exported.layers[-1].get_weights(), head_before):
        np.testing.assert_array_equal(a, b)  # the head of phi is never meta-learned
    info = json.loads((tmp_path / "run" / "initialization" / "tfmeta.json").read_text())
    assert info["head_meta_learned"] is False


def test_a_resume_may_change_steps_per_execution(tmp_path, monkeypatch):
    """Killed at step 3 of a 12-step epoch run in executions of 3, resumed with steps_per_execution=4.

    The rest of that epoch (9 steps) runs in executions of 3, the next epoch
    in executions of 4 (the checkpoints, one per execution, show it); phi and
    the history are the uninterrupted run's, bit for bit.
    """
    run = {**SETTINGS, "steps_per_execution": 3, "checkpoint_every": 1, "keep_checkpoints": 10}
    whole = job.train(tmp_path / "whole", **vars(_parts()), **run)

    # The 2nd execution's end (step 6) raises, before its checkpoint: step 3 is the last one.
    monkeypatch.setenv(failpoints.ENV, "train.step@2=error")
    failpoints.reset()
    with pytest.raises(OSError, match="failpoint train.step"):
        job.train(tmp_path / "run", **vars(_parts()), **run)
    assert _checkpoint_steps(tmp_path / "run") == [3]
    monkeypatch.delenv(failpoints.ENV)

    steps = _built(tmp_path / "run", **{**run, "steps_per_execution": 4}, resume=True)
    start = steps.resume()
    assert start == 3
    resumed = _finish(steps, start)
    assert steps.meta.steps_per_execution == 4  # the compiled size again after the fits
    assert _checkpoint_steps(tmp_path / "run") == [3, 6, 9, 12, 16, 20, 24]
    assert resumed["meta_updates"] == whole["meta_updates"] == 6
    assert resumed["history"] == whole["history"]
    _assert_same_phi(tmp_path / "run", tmp_path / "whole")
    assert (tmp_path / "run" / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()

    # A fresh run with steps_per_execution=5, which divides no epoch: executions of 4, same phi.
    job.train(tmp_path / "five", **vars(_parts()), **{**run, "steps_per_execution": 5})
    assert _checkpoint_steps(tmp_path / "five") == [4, 8, 12, 16, 20, 24]
    _assert_same_phi(tmp_path / "five", tmp_path / "whole")


def _checkpoint_steps(run):
    return [step for step, _ in tfmeta.checkpoint.list_checkpoints(run / "checkpoints")]


def test_execution_size_is_the_largest_divisor_not_above_steps_per_execution():
    for steps in range(1, 25):
        for per_call in (1, 2, 3, 5, 10, 30):
            size = tfmeta.checkpoint.execution_size(steps, per_call)
            assert steps % size == 0 and size <= per_call, (steps, per_call)
            # no larger divisor fits
            assert not [d for d in range(size + 1, per_call + 1) if steps % d == 0], (steps, per_call)


def test_execution_size_lives_beside_the_fit_check_and_needs_a_step():
    assert tfmeta.checkpoint.execution_size is tfmeta.replicas.execution_size
    for steps in (0, -3):
        with pytest.raises(ValueError, match=f"execution_size\\(steps={steps}\\): .* steps >= 1"):
            tfmeta.checkpoint.execution_size(steps, 4)


class _FitRecorder:
    """Stands in for a MetaModel: records each fit's steps and execution size."""

    def __init__(self, steps_per_execution):
        self.steps_per_execution = steps_per_execution
        self.fits = []

    def fit(self, dataset, *, steps_per_epoch, initial_epoch, epochs, callbacks):
        self.fits.append((steps_per_epoch, self.steps_per_execution))
        return types.SimpleNamespace(history={"loss": [0.0] * (epochs - initial_epoch)})


def test_resumable_fit_logs_one_line_when_it_lowers_the_execution_size(caplog):
    # 24 steps in 2 epochs resumed at step 3 under 5 per execution: the rest of
    # epoch 0 (9 steps) in executions of 3, epoch 1 (12 steps) in executions of 4.
    meta = _FitRecorder(5)
    with caplog.at_level(logging.INFO, logger="tfmeta.checkpoint"):
        tfmeta.checkpoint.resumable_fit(meta, lambda begin: None, total_steps=24, epochs=2, start=3)
    assert meta.fits == [(9, 3), (12, 4)] and meta.steps_per_execution == 5
    assert [r.getMessage() for r in caplog.records if r.name == "tfmeta.checkpoint"] == [
        "steps_per_execution=5 does not divide this fit's 9 train steps per epoch: "
        "running executions of 3 instead.",
        "steps_per_execution=5 does not divide this fit's 12 train steps per epoch: "
        "running executions of 4 instead.",
    ]
    caplog.clear()
    meta = _FitRecorder(4)  # divides both fits: nothing to say
    with caplog.at_level(logging.INFO, logger="tfmeta.checkpoint"):
        tfmeta.checkpoint.resumable_fit(meta, lambda begin: None, total_steps=24, epochs=2, start=4)
    assert meta.fits == [(8, 4), (12, 4)]
    assert not [r for r in caplog.records if r.name == "tfmeta.checkpoint"]
