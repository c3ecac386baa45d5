"""Leap's Omniglot experiment (issue 14 §1): nested splits, cell-by-cell resume, settings checks, figures, table.

The run tests train real (tiny) cells on the real Omniglot alphabets
(`tfds_dir`: skip where the archives are absent, fail under CI).
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

from tfmeta.experiments import leap_omniglot as experiment
from tfmeta.experiments.leap_omniglot import ALPHABETS, Cell, Config, plan
from tfmeta.validation import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import leap_omniglot as tool  # noqa: E402  (tools/leap_omniglot.py)

TINY = Config(meta_updates=2, inner_steps=5, tasks_per_batch=2, filters=4, num_heldout=1, finetune_steps=6)
TIMINGS = ("pretrain_seconds", "finetune_seconds")


def _cells():
    # Every kind of cell once, at the cheapest size: no pretraining, both learners with
    # min(tasks_per_batch, alphabets) = 1 task a batch, and a Leap stage. The plan's order over
    # several sizes is asserted without training, in test_plan_runs_seed_by_seed_....
    return plan(["leap", "multi-headed", "no pretraining"], alphabets=[1], seeds=[0], stages=[0.5])


def _without_timings(results):
    return {k: {f: v for f, v in c.items() if f not in TIMINGS} for k, c in results["cells"].items()}


# ------------------------------------------------------------ the split and the plan
@pytest.mark.data
@pytest.mark.parametrize("seed", [0, 1])
def test_heldout_alphabets_are_the_same_for_every_number_of_pretraining_alphabets(tfds_dir, seed):
    from tfmeta.tasks import omniglot_alphabets

    splits = {n: omniglot_alphabets(num_pretrain=n, seed=seed) for n in ALPHABETS}
    heldout = {tuple(h.task_names) for _, h in splits.values()}
    assert len(heldout) == 1 and len(next(iter(heldout))) == 10
    largest = splits[ALPHABETS[-1]][0].task_names
    assert len(largest) == 25 and not set(largest) & set(next(iter(heldout)))
    for n, (pretrain, _) in splits.items():
        assert pretrain.task_names == largest[:n]  # nested pretraining sets


def test_plan_runs_seed_by_seed_with_leaps_stages_at_the_largest_alphabets():
    keys = [c.key for c in plan(["leap", "no pretraining", "multi-headed"], [20, 5], [0, 1], [0.25])]
    per_seed = ["no pretraining/s{s}", "leap/a5/s{s}", "multi-headed/a5/s{s}", "leap/a20/s{s}",
                "multi-headed/a20/s{s}", "leap/a20/s{s}@0.25"]
    assert keys == [k.format(s=s) for s in (0, 1) for k in per_seed]
    cell = Cell("leap", 3, seed=0, fraction=0.25)
    assert cell.tasks_per_batch(Config(tasks_per_batch=5)) == 3  # min(tasks_per_batch, alphabets)
    assert cell.meta_updates(Config(meta_updates=80)) == 20
    with pytest.raises(ConfigError, match="only 'no pretraining'"):
        Cell("leap", None, seed=0)
    with pytest.raises(ConfigError, match="below 1 only for"):
        Cell("multi-headed", 5, seed=0, fraction=0.5)
    with pytest.raises(ConfigError, match="larger --stages"):
        Cell("leap", 5, seed=0, fraction=0.1).meta_updates(Config(meta_updates=4))


def test_learner_bindings_size_the_gin_job():
    bindings = experiment.learner_bindings(Config(tasks_per_batch=20, inner_steps=50), Cell("fomaml", 3, 2), True)
    assert "train.tasks_per_batch = 3" in bindings and "train.seed = 2" in bindings
    assert "omniglot_alphabets.seed = 2" in bindings and "train.steps_per_chunk = 10" in bindings
    assert "train.overwrite = False" in bindings  # resuming continues a killed cell's checkpoint


# ------------------------------------------------------------ the table
def _record(method, alphabets, seed, auc, error, fraction=1.0, curve=(2.0, 1.0)):
    return {"method": method, "alphabets": alphabets, "seed": seed, "fraction": fraction,
            "settings": {"meta_updates": 8}, "meta_updates_trained": round(8 * fraction),
            "loss_auc": auc, "test_error": error, "curve": {"loss": list(curve), "error": [0.5, 0.25]}}


def _synthetic():
    records = [
        _record("leap", 5, 0, 1.0, 0.2), _record("leap", 5, 1, 2.0, 0.4),
        _record("leap", 20, 0, 0.5, 0.1), _record("leap", 20, 0, 9.0, 0.9, fraction=0.5, curve=(3.0, 2.0)),
        _record("no pretraining", None, 0, 3.0, 0.5), _record("no pretraining", None, 1, 4.0, 0.7),
    ]
    return {"format": experiment.FORMAT,
            "cells": {Cell(r["method"], r["alphabets"], r["seed"], r["fraction"]).key: r for r in records}}


def test_table_gives_mean_and_std_over_seeds_with_no_pretraining_at_every_size():
    lines = experiment.table(_synthetic()).splitlines()
    assert lines[0] == ("| method | loss AUC, 5 alphabets | test error, 5 alphabets | loss AUC, 20 alphabets "
                        "| test error, 20 alphabets | seeds |")
    # leap at 5: AUC (1 + 2) / 2 = 1.5, std 0.5; error 0.3 +- 0.1; at 20 one seed, the stage left out.
    assert lines[2] == "| leap | 1.500 ± 0.500 | 0.300 ± 0.100 | 0.500 ± 0.000 | 0.100 ± 0.000 | 1/2 |"
    no_pretraining = "3.500 ± 0.500 | 0.600 ± 0.100"  # seeds (3, 4) and (0.5, 0.7), at every size
    assert lines[3] == f"| no pretraining | {no_pretraining} | {no_pretraining} | 2 |"
    assert experiment.series(_synthetic())["leap"] == {5: [1.0, 2.0], 20: [0.5]}


def test_figures_are_written_from_a_results_json(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_synthetic()))
    right, left = tmp_path / "fig" / "right.png", tmp_path / "fig" / "left.png"
    args = ["--output_dir", str(tmp_path), "--plot_only",
            "--figure_right", str(right), "--figure_left", str(left)]
    assert tool.main(args) == 0
    for png in (right, left):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_only_names_a_results_json_it_cannot_use(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps([{"method": "leap"}]))  # the old tool's list
    assert tool.main(["--output_dir", str(tmp_path), "--plot_only"]) == 2
    assert "another --output_dir" in capsys.readouterr().err


# ------------------------------------------------------------ real runs and resume
@pytest.fixture(scope="module")
def uninterrupted(tfds_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, experiment.run(TINY, _cells(), out, tool.train_learner, log=lambda line: None)


@pytest.mark.data
def test_an_uninterrupted_run_records_every_cell_with_its_settings_and_curves(uninterrupted):
    out, results = uninterrupted
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    cells = results["cells"]
    assert list(cells) == [c.key for c in _cells()]
    stage, final = cells["leap/a1/s0@0.5"], cells["leap/a1/s0"]
    assert stage["meta_updates_trained"] == 1 and final["meta_updates_trained"] == 2
    assert stage["settings"] == final["settings"]  # the run's meta-updates; the fraction is in the key
    assert cells["multi-headed/a1/s0"]["settings"]["tasks_per_batch"] == 1
    for record in cells.values():
        losses = record["curve"]["loss"]
        assert len(losses) == TINY.finetune_steps and np.isfinite(record["test_error"])
        # The stored curve is the task-mean curve whose trapezoidal AUC the record reports.
        assert record["loss_auc"] == pytest.approx((np.sum(losses) - (losses[0] + losses[-1]) / 2) / len(losses))
    # Meta-training moves Leap's initialization away from the seed's random one.
    assert final["curve"]["loss"] != cells["no pretraining/s0"]["curve"]["loss"]


@pytest.mark.data
def test_each_cell_records_its_machine_and_a_resume_notes_other_kernels(uninterrupted, tmp_path):
    from tfmeta.experiments import machine

    out, results = uninterrupted
    assert all(record["machine"] == machine.describe() for record in results["cells"].values())
    moved = json.loads((out / "results.json").read_text())
    next(iter(moved["cells"].values()))["machine"]["avx512"] = "another"
    (tmp_path / "results.json").write_text(json.dumps(moved))
    logged = []
    experiment.run(TINY, _cells(), tmp_path, tool.train_learner, resume=True, log=logged.append)
    assert len(logged) == 1 and logged[0].startswith("note: 1 kept cell was computed with other kernels ("), logged


@pytest.mark.data
def test_resume_skips_finished_cells_and_ends_as_an_uninterrupted_run(uninterrupted, tmp_path):
    _, whole = uninterrupted
    cells = _cells()
    # A run killed after its first two cells ...
    experiment.run(TINY, cells[:2], tmp_path, tool.train_learner, log=lambda line: None)
    first = json.loads((tmp_path / "results.json").read_text())
    assert list(first["cells"]) == [c.key for c in cells[:2]]
    with pytest.raises(ConfigError, match="--resume"):
        experiment.run(TINY, cells, tmp_path, tool.train_learner)
    # ... resumed: only the missing cells run, the finished ones are kept as they are.
    logged = []
    again = experiment.run(TINY, cells, tmp_path, tool.train_learner, resume=True, log=logged.append)
    assert [line.split(":")[0] for line in logged] == [c.key for c in cells[2:]]
    assert all(again["cells"][k] == first["cells"][k] for k in first["cells"])
    assert _without_timings(again) == _without_timings(whole)


@pytest.mark.data
def test_resume_with_other_settings_names_the_difference_and_the_fix(uninterrupted, tmp_path, capsys):
    out, _ = uninterrupted
    shutil.copy(out / "results.json", tmp_path / "results.json")
    with pytest.raises(ConfigError, match=r"leap/a1/s0 was computed with meta_updates=2, this run has "
                                          r"meta_updates=3.*resume with --meta_updates 2"):
        experiment.run(Config(**{**TINY.__dict__, "meta_updates": 3}), _cells(), tmp_path,
                       tool.train_learner, resume=True)
    # Through the tool: one line, exit code 2, nothing trained.
    args = ["--output_dir", str(tmp_path), "--resume", "--alphabets", "1", "--seeds", "0", "--methods",
            "no pretraining", "--filters", "8", "--num_heldout", "1", "--finetune_steps", "6"]
    assert tool.main(args) == 2
    assert "computed with filters=4, this run has filters=8" in capsys.readouterr().err


def test_a_ctrl_c_that_a_library_swallows_stops_the_run_after_its_cell(tmp_path, monkeypatch):
    """As for the CellStore experiments (test_tools_errors): the cell in progress is saved, no other runs."""
    import signal

    from tfmeta.cli import errors

    monkeypatch.delenv("TFMETA_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["tools/leap_omniglot.py"])
    monkeypatch.setattr(experiment, "omniglot_alphabets", lambda **kwargs: (None, None))
    trained = []

    def pretrained(config, cell, out, train_learner, resume):
        if len(trained) == 1:
            try:
                signal.raise_signal(signal.SIGINT)  # the handler runs before this returns
            except KeyboardInterrupt:
                pass  # swallowed, as a bare `except:` in a library would
        trained.append(cell.key)

    monkeypatch.setattr(experiment, "_pretrained", pretrained)
    monkeypatch.setattr(experiment, "_evaluate", lambda *args: {"loss_auc": 1.0, "test_error": 0.5})
    cells = _cells()
    assert len(cells) > 2

    def run(argv):
        with errors.resumable(tmp_path):
            experiment.run(TINY, cells, tmp_path, train_learner=None, log=lambda line: None)
        return 0

    assert errors.run_tool("leap_omniglot.py", run, []) == errors.EXIT_INTERRUPTED
    assert trained == [cells[0].key, cells[1].key]
    assert list(json.loads((tmp_path / "results.json").read_text())["cells"]) == trained
