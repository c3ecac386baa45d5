"""`tools/finetune.py` uses the gin file's evaluation, says so, and reproduces the training run's numbers."""

import json
import pathlib

import gin
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BINDINGS = [
    "train.meta_updates = 60",
    "train.verbose = 0",
    "digits_tasks.num_pretrain = 20",
    "digits_tasks.num_heldout = 3",
    "heldout_finetuning.steps = 20",
]


def _main(module, argv):
    gin.clear_config()
    try:
        return module.main(argv)
    finally:
        gin.clear_config()


def _argv(*bindings):
    argv = ["--gin_file", str(REPO / "gin" / "digits.gin")]
    for binding in (*BINDINGS, *bindings):
        argv += ["--gin_param", binding]
    return argv


def test_finetune_command_reproduces_the_training_runs_evaluation(tmp_path, capsys, monkeypatch):
    import tfmeta.finetune
    from tfmeta.cli import finetune, train

    assert _main(train, [*_argv(), "--output_dir", str(tmp_path / "run")]) == 0
    evaluation = json.loads((tmp_path / "run" / "results.json").read_text())["evaluation"]
    capsys.readouterr()

    legends = []
    plot = tfmeta.finetune.plot_curves
    monkeypatch.setattr(tfmeta.finetune, "plot_curves", lambda runs, *a, **k: legends.append(list(runs)) or plot(runs, *a, **k))
    export = tmp_path / "run" / "initialization"
    assert _main(finetune, ["--init", str(export), *_argv(), "--output_dir", str(tmp_path / "ft")]) == 0
    out = capsys.readouterr().out.splitlines()

    # What was used, before the work: the training run's evaluation settings.
    assert out[0] == (
        "Fine-tuning 3 held-out tasks for 20 steps each (SGD 0.1, batch 10, seed 0: as the training "
        f"run's evaluation, heldout_finetuning) from {export} (meta-learned) and from the training run's "
        "random start (train.model, train.seed 0) (random init)."
    )
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["settings"] == {"steps": 20, "learning_rate": 0.1, "batch_size": 10, "seed": 0}
    # One name for each candidate, in the results, the printout and the PNG's legend.
    assert legends == [["meta-learned", "random init"]]
    assert out[1].startswith("   meta-learned: ") and out[2].startswith("    random init: ")
    # The same fine-tuning of the same two starting points as the training run's evaluation.
    for name in ("meta-learned", "random init"):
        for metric in ("loss_auc", "error_auc", "test_error"):
            assert results[name]["mean"][metric] == pytest.approx(evaluation[name][metric], rel=1e-5, abs=1e-7)


def test_finetune_bindings_override_the_evaluation_and_are_named(tmp_path, capsys):
    from tfmeta.cli import finetune, train

    assert _main(train, [*_argv("train.evaluation = None"), "--output_dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    export = tmp_path / "run" / "initialization"
    argv = ["--init", str(export), *_argv("finetune.steps = 5", "finetune.num_tasks = 2")]
    assert _main(finetune, argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(
        "Fine-tuning 2 held-out tasks for 5 steps each (SGD 0.1, batch 10, seed 0: finetune.steps; the "
        "rest as the training run's evaluation, heldout_finetuning)"
    ), first
    results = json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())
    assert [r["steps"] for r in results["meta-learned"]["per_task"]] == [5, 5]


def test_finetune_settings_are_checked_before_any_work(tmp_path, capsys):
    from tfmeta.cli import finetune

    code = _main(finetune, ["--init", str(tmp_path / "none"), *_argv("finetune.steps = 0")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("tfmeta-finetune: error: ") and "finetune.steps=0 must be an integer >= 1" in err[0]
