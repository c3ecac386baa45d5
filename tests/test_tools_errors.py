"""Every tool in tools/ ends bad input in one line, `<prog>: error: ...`, exit code 2, no traceback.

Nor any of TensorFlow's C++ start-up lines (`tfmeta.cli.startup`).

Each tool runs as a user runs it (a subprocess, PYTHONPATH the repository)
with one realistic mistake it catches before any training: a flag value out
of range, `--resume` into a results.json of other settings or of another
tool, contradicting flags, a dataset that does not exist. `TFMETA_DEBUG=1`
brings the traceback back. Ctrl-C during a resumable experiment ends in one
line saying where the finished cells are and the command that continues,
exit code 130 (`tfmeta.cli.errors.run_tool`, `resumable`).
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from tfmeta.cli import errors

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    for name in ("TFMETA_DEBUG", "TF_CPP_MIN_LOG_LEVEL"):  # as a user runs it: the tool's own default
        if name not in extra:
            env.pop(name, None)
    return env


#: A line of TensorFlow's C++ log ("E0000 00:00:17... cuda_platform.cc:52] failed call to cuInit")
#: or its notice that such lines go to stderr.
TENSORFLOW_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl)", re.M)


def _tool(name, *args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *map(str, args)], cwd=REPO,
        env=env or _env(), capture_output=True, text=True, timeout=timeout,
    )


def _write(folder, content):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(content))
    return folder


# Each case: the tool's prog (as its error line starts), its arguments given a
# fresh folder, and what the line must say (the problem and the fix).
CASES = {
    "many_shot: --resume into a results.json of other settings": (
        "many_shot.py",
        lambda tmp: ["--smoke", "--methods", "scratch", "--resume", "--output_dir", _write(tmp, {
            "experiment": "many_shot", "cells": {"x": {
                "method": "no pretraining", "finetune_lr": 0.1, "settings": {"targets": ["digits"]}}}})],
        ["ConfigError: --resume: cell x of", "computed with other settings",
         "targets=['digits'] there, ['fashion_mnist', 'digits'] now",
         "resume with the same gin files and bindings, or choose another --output_dir"],
    ),
    "cts_synthetic: --resume into a results.json of another meta_lr": (
        "cts_synthetic.py",
        lambda tmp: ["--methods", "reptile", "--resume", "--output_dir", _write(tmp, {
            "experiment": "cts_synthetic", "partial": True, "cells": {"reptile/K100/seed0": {
                "settings": {"method": "reptile", "meta_lr": 0.5}}}})],
        ["ConfigError: --resume: cell reptile/K100/seed0 of", "meta_lr=0.5 there, 0.1 now",
         "resume with the same flags, or choose another --output_dir"],
    ),
    "cts_approximation: --resume into another tool's results.json": (
        "cts_approximation.py",
        lambda tmp: ["--resume", "--output_dir", _write(tmp, {"experiment": "cts_synthetic", "cells": {}})],
        ["ConfigError: --resume:", "is not a results.json of tools/cts_approximation.py",
         "choose another --output_dir, or drop --resume"],
    ),
    "complexity: --resume of an experiment that keeps no cells": (
        "complexity.py",
        lambda tmp: ["--experiment", "reachability", "--resume", "--output_dir", tmp],
        ["ValueError: --resume: reachability_experiment does not checkpoint its cells",
         "rerun it without --resume"],
    ),
    "complexity: a mistyped gin binding": (
        "complexity.py",
        lambda tmp: ["--experiment", "relabel", "--gin_param", "relabel_experiment.seedz = (0,)",
                     "--output_dir", tmp],
        ["ConfigError: gin binding relabel_experiment.seedz", "did you mean relabel_experiment.seeds?"],
    ),
    "leap_omniglot: --resume and --overwrite together": (
        "leap_omniglot.py",
        lambda tmp: ["--resume", "--overwrite", "--output_dir", tmp],
        ["ConfigError: resume and overwrite contradict each other", "pass --resume or --overwrite, not both"],
    ),
    "bench: --steps 0": (
        "bench.py inner",  # argparse names the subcommand
        lambda tmp: ["inner", "--steps", "0"],
        ["argument --steps: 0 is not a whole number >= 1"],
    ),
    "bench_fisher: --examples 0": (
        "bench_fisher.py",
        lambda tmp: ["--examples", "0"],
        ["argument --examples: 0 is not a whole number >= 1"],
    ),
    "bench_tasks: --tasks 0": (
        "bench_tasks.py",
        lambda tmp: ["--tasks", "0"],
        ["argument --tasks: 0 is not a whole number >= 1"],
    ),
    "prepare_data: a dataset name TFDS does not know": (
        "prepare_data.py",
        # An existing (empty) archive folder: the name is the one mistake.
        lambda tmp: ["--from", tmp.parent, "--data_dir", tmp / "tfds", "--names", "mnsit"],
        ["ValueError: TFDS has no dataset named 'mnsit': did you mean 'mnist'?"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_naming_the_problem_and_the_fix(case, tmp_path):
    prog, argv, says = CASES[case]
    proc = _tool(prog.split()[0], *argv(tmp_path / "out"))
    assert proc.returncode == 2, (case, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not TENSORFLOW_LOG.search(proc.stderr), proc.stderr[-3000:]  # tfmeta.cli.startup holds them
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), last
    for words in says:
        assert words in last, (words, last)


def test_prepare_data_names_a_missing_archive_folder_in_one_line(tmp_path):
    proc = _tool("prepare_data.py", "--from", tmp_path / "nowhere", "--data_dir", tmp_path / "tfds")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prepare_data.py: error: FileNotFoundError: "), last
    # (A folder without SHA256SUMS: test_prepare.py's test_a_folder_without_sha256sums_says_how_to_skip_the_check.)
    assert f"the archive folder (--from) {tmp_path / 'nowhere'} does not exist: " in last
    assert "(e.g. --from ../shared/data)" in last


def test_tfmeta_debug_brings_the_traceback_back(tmp_path):
    argv = ["--from", tmp_path / "nowhere", "--data_dir", tmp_path / "tfds"]
    proc = _tool("prepare_data.py", *argv, env=_env(TFMETA_DEBUG="1"))
    assert proc.returncode == 1, proc.stderr[-3000:]  # Python's own exit code for an uncaught error
    assert "Traceback (most recent call last)" in proc.stderr
    assert "FileNotFoundError" in proc.stderr
    assert "prepare_data.py: error:" not in proc.stderr


# ------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_in_an_experiment_says_where_the_cells_are_and_how_to_continue(tmp_path):
    """cts_synthetic at toy sizes, SIGINT once its first cell is in results.json."""
    out = tmp_path / "sweep"
    argv = ["--methods", "reptile", "--inner_steps", "2", "--processes", "1",
            "--task_seeds", *range(40), "--output_dir", out]
    # Started with SIGINT ignored, as a script's background job is (no job
    # control): the tool must still stop on it with its cells saved.
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "cts_synthetic.py"), *map(str, argv)], cwd=REPO, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "results.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()  # say what the child was doing instead of only that it ran on
            pytest.fail("no exit 120 s after SIGINT; its stderr:\n" + proc.communicate()[1][-3000:])
    finally:
        if proc.poll() is None:  # never leave a child computing after a failure
            proc.kill()
            proc.communicate()
    assert proc.returncode == errors.EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    command = f"python {REPO / 'tools' / 'cts_synthetic.py'} " + " ".join(map(str, argv)) + " --resume"
    assert last == (f"cts_synthetic.py: interrupted; finished cells are saved in {out}; continue with the "
                    f"same command and --resume: {command}"), last
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert 1 <= len(cells) < 40 and "reptile/K2/seed0" in cells


def test_a_ctrl_c_that_a_library_swallows_still_stops_the_experiment_after_its_cell(
        capsys, monkeypatch, tmp_path):
    """The Ctrl-C lands where a library discards KeyboardInterrupt (a bare `except:`, a
    finalizer's "Exception ignored in"): the cell in progress is saved, no other is computed."""
    from tfmeta.experiments.complexity_run import CellStore

    monkeypatch.delenv("TFMETA_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["tools/tool.py"])
    computed = []

    def cell(seed):
        if seed == 1:
            try:
                signal.raise_signal(signal.SIGINT)  # the handler runs before this returns
            except KeyboardInterrupt:
                pass
        computed.append(seed)
        return {"seed": seed}

    def run(argv):
        store = CellStore(tmp_path, "fake")
        with errors.resumable(tmp_path):
            for seed in range(4):
                store.get(str(seed)) or store.put(str(seed), cell(seed))
        return 0

    before = signal.getsignal(signal.SIGINT)
    assert errors.run_tool("tool.py", run, ["--seeds", "0"]) == errors.EXIT_INTERRUPTED
    assert computed == [0, 1]
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    # (each with its `machine` record where this process has imported TensorFlow)
    assert {key: cell["seed"] for key, cell in cells.items()} == {"0": 0, "1": 1}
    assert capsys.readouterr().err == (
        f"tool.py: interrupted; finished cells are saved in {tmp_path}; continue with the same command "
        "and --resume: python tools/tool.py --seeds 0 --resume\n")
    # The caller's handler is back, and a store outside run_tool ignores the old Ctrl-C.
    assert signal.getsignal(signal.SIGINT) is before
    assert CellStore(tmp_path, "fake").put("2", {"seed": 2})["seed"] == 2


def _stopped(raised, argv, directory="runs/x"):
    def run(argv):
        with errors.resumable(directory):
            raise raised

    return errors.run_tool("tool.py", run, argv)


def test_the_continue_command_resumes_instead_of_overwriting(capsys, monkeypatch):
    monkeypatch.delenv("TFMETA_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["tools/tool.py"])
    assert _stopped(KeyboardInterrupt(), ["--seeds", "0", "--overwrite"]) == 130
    assert capsys.readouterr().err == (
        "tool.py: interrupted; finished cells are saved in runs/x; continue with the same command and "
        "--resume instead of --overwrite: python tools/tool.py --seeds 0 --resume\n")
    # An abbreviated --resume is kept as it is; an abbreviated --overwrite is dropped.
    assert errors.continue_command(["--res", "--over"], "t.py") == ("python t.py --res", " instead of --overwrite")
    # A training job stopped at a step boundary names its checkpoint too.
    assert _stopped(errors.Interrupted(12, "runs/x/leap/a1/s0"), ["--resume"]) == 130
    assert capsys.readouterr().err == (
        "tool.py: interrupted; finished cells are saved in runs/x; the cell in progress was interrupted at "
        "train step 12, checkpoint saved in runs/x/leap/a1/s0; continue with the same command and --resume: "
        "python tools/tool.py --resume\n")


def test_the_continue_command_runs_the_tool_not_the_interpreter(capsys, monkeypatch, tmp_path):
    """`python -c ...` (sys.argv[0] "-c") or a tool run from elsewhere: the command names the tool's script."""
    monkeypatch.delenv("TFMETA_DEBUG", raising=False)
    monkeypatch.chdir(REPO)
    script = str(REPO / "tools" / "many_shot.py")  # a tool's __file__

    def stopped(argv):
        raise errors.Stopped("runs/x")

    end = "interrupted; finished cells are saved in runs/x; continue with the same command and --resume: "
    for argv0, passed, command in [
        ("-c", script, "python tools/many_shot.py --seeds 0 --resume"),
        ("-c", None, "python tools/many_shot.py --seeds 0 --resume"),  # a tool that does not say
        ("tools/many_shot.py", script, "python tools/many_shot.py --seeds 0 --resume"),  # as typed
        (script, script, f"python {script} --seeds 0 --resume"),
    ]:
        monkeypatch.setattr(sys, "argv", [argv0])
        assert errors.run_tool("many_shot.py", stopped, ["--seeds", "0"], script=passed) == 130
        assert capsys.readouterr().err == f"many_shot.py: {end}{command}\n", argv0
    monkeypatch.chdir(tmp_path)  # outside the checkout: the script's absolute path
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert errors.continue_command(["--seeds", "0"], script)[0] == f"python {script} --seeds 0 --resume"


def test_train_continues_with_its_own_rules_through_run_tool(capsys, monkeypatch, tmp_path):
    """The training job's Ctrl-C line: its console script by name, train.overwrite bindings dropped."""
    from tfmeta.cli import train

    monkeypatch.delenv("TFMETA_DEBUG", raising=False)
    console = tmp_path / "bin" / "tfmeta-train"
    console.parent.mkdir()
    console.write_text("#!/bin/sh\n")
    argv = ["--gin_file", "gin/digits.gin", "--gin_param", "train.overwrite = True",
            "--gin_param=train.overwrite=True", "--gin_param", "train.seed = 1"]
    monkeypatch.setattr(sys, "argv", [str(console)])
    assert train.resume_command(argv) == (
        "tfmeta-train --gin_file gin/digits.gin --gin_param 'train.seed = 1' --resume")
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])
    assert train.resume_command(["--gin_file", "g.gin", "--resume"]) == "python tools/train.py --gin_file g.gin --resume"

    def interrupted(argv):
        raise errors.Interrupted(7, "runs/d/checkpoints")

    monkeypatch.setattr(train, "run", interrupted)
    assert train.main(["--gin_file", "g.gin"]) == 130
    assert capsys.readouterr().err == ("tfmeta-train: interrupted at train step 7, checkpoint saved in "
                                       "runs/d/checkpoints: continue with: python tools/train.py --gin_file "
                                       "g.gin --resume\n")
    monkeypatch.setattr(train, "run", lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert train.main([]) == 130
    assert capsys.readouterr().err == "tfmeta-train: aborted; --resume continues from the newest checkpoint, if any.\n"


def test_complexity_knows_which_experiments_checkpoint_their_cells_from_gin():
    """tools/complexity.py wraps only those in `resumable`: the same helper `complexity.run` checks --resume with."""
    import gin

    import tfmeta.configurables  # noqa: F401
    from tfmeta.experiments import complexity_run
    from tfmeta.experiments.complexity_reachability import reachability_experiment
    from tfmeta.experiments.complexity_relabel import relabel_experiment

    assert complexity_run.checkpoints_cells(relabel_experiment)
    assert not complexity_run.checkpoints_cells(reachability_experiment)
    for name, checkpoints in (("relabel", True), ("kramers", True), ("prediction", True),
                              ("reachability", False), ("ranking", False)):
        configured = gin.get_configurable(f"tfmeta.complexity.{name}_experiment")
        assert complexity_run.checkpoints_cells(configured) is checkpoints, name
    assert not complexity_run.checkpoints_cells(None)


def test_ctrl_c_outside_an_experiment_and_bugs(capsys, monkeypatch):
    monkeypatch.delenv("TFMETA_DEBUG", raising=False)

    def interrupted(argv):
        raise KeyboardInterrupt

    def buggy(argv):
        raise KeyError("a bug")

    assert errors.run_tool("tool.py", interrupted, []) == 130
    assert capsys.readouterr().err == "tool.py: interrupted\n"
    with pytest.raises(KeyError):  # not bad input: the traceback shows
        errors.run_tool("tool.py", buggy, [])
    monkeypatch.setenv("TFMETA_DEBUG", "1")
    with pytest.raises(errors.Stopped):
        _stopped(KeyboardInterrupt(), [])


def test_a_ctrl_c_that_c_code_reports_as_another_error_still_ends_as_ctrl_c(capsys, monkeypatch, tmp_path):
    """A KeyboardInterrupt raised while C code runs (TensorFlow's tracing) can come out as
    `SystemError: ... bad argument to internal function`: after a Ctrl-C, that error is the
    interrupt, inside an experiment (its cells named) and outside; without one, a bug."""
    import signal

    monkeypatch.delenv("TFMETA_DEBUG", raising=False)

    def hit(argv):
        signal.getsignal(signal.SIGINT).interrupted = True  # what CtrlC does on SIGINT
        raise SystemError("Objects/listobject.c:338: bad argument to internal function")

    def in_experiment(argv):
        with errors.resumable(tmp_path):
            hit(argv)

    assert errors.run_tool("tool.py", hit, []) == 130
    assert capsys.readouterr().err == "tool.py: interrupted\n"
    assert errors.run_tool("tool.py", in_experiment, ["--seeds", "0"], script="tools/tool.py") == 130
    assert capsys.readouterr().err == (
        f"tool.py: interrupted; finished cells are saved in {tmp_path}; continue with the same "
        "command and --resume: python tools/tool.py --seeds 0 --resume\n")

    def bug(argv):
        raise SystemError("a bug")

    with pytest.raises(SystemError):
        errors.run_tool("tool.py", bug, [])
