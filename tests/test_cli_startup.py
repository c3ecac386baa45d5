"""The command-line tools start fast and quietly: `--help` without TensorFlow, no start-up noise.

`tests/test_bad_input.py::test_each_command_line_error_is_one_line_with_exit_code_2`
checks that a run's stderr holds only its one error line (TensorFlow's
import and first ops included); here `--help`, and that `--verbose` and
`TFMETA_DEBUG=1` bring TensorFlow's messages and the traceback back.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

HELP = r"""
import json, sys, time
began = time.perf_counter()
from tfmeta.cli import {tool}
try:
    {tool}.main(["--help"])
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
                   "seconds": time.perf_counter() - began}}))
"""


def _user_env(**extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TFMETA_DEBUG"):
        if name not in extra:
            env.pop(name, None)
    return env


@pytest.mark.parametrize("tool", ["train", "finetune"])
def test_help_imports_no_tensorflow(tool):
    proc = subprocess.run(
        [sys.executable, "-c", HELP.format(tool=tool)], cwd=REPO, env=_user_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 0
    assert not outcome["tensorflow"] and not outcome["keras"], "parse the command line before importing TensorFlow"


def test_help_takes_well_under_two_seconds():
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "--help"], cwd=REPO, env=_user_env(),
        capture_output=True, text=True, timeout=120,
    )
    seconds = time.perf_counter() - began
    assert proc.returncode == 0 and "--gin_file" in proc.stdout and "--verbose" in proc.stdout
    assert proc.stderr == ""
    assert seconds < 5.0, f"--help took {seconds:.1f} s (TensorFlow's import alone takes 10-20 s)"


def _failing_run(tmp_path, *flags, **env):
    # Fails after TensorFlow has run the first task batch (its C++ start-up
    # messages come then): labels 0..4, a 3-class head.
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "--gin_file", "gin/digits.gin",
         "--gin_param", "mlp.num_classes = 3", "--gin_param", "digits_tasks.num_pretrain = 8",
         "--output_dir", str(tmp_path / "run"), *flags],
        cwd=REPO, env=_user_env(**env), capture_output=True, text=True, timeout=300,
    )


def test_verbose_shows_tensorflow_messages_and_debug_the_traceback(tmp_path):
    quiet = _failing_run(tmp_path)
    verbose = _failing_run(tmp_path, "--verbose")
    debug = _failing_run(tmp_path, TFMETA_DEBUG="1")
    error = re.compile(r"tfmeta-train: error: \w+: task labels range over 0\.\.4 but the model has 3 outputs")
    assert quiet.returncode == verbose.returncode == 2
    assert len(quiet.stderr.splitlines()) == 1 and error.match(quiet.stderr), quiet.stderr
    assert len(verbose.stderr.splitlines()) > 1 and error.match(verbose.stderr.splitlines()[-1])
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert not (tmp_path / "run").exists()


KERNELS = r"""
import json, os
from tfmeta.cli import startup
startup.import_tensorflow()
from tensorflow.python.util import _pywrap_util_port
print(json.dumps({"flag": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "onednn": _pywrap_util_port.IsMklEnabled()}))
"""


@pytest.mark.parametrize("given", [None, "0"])
def test_tools_turn_onednn_on_unless_told_otherwise(given):
    """The tools' TensorFlow uses oneDNN's CPU kernels (faster here than Eigen's, also on CPUs
    without AVX-512, where TensorFlow alone would not enable them); TF_ENABLE_ONEDNN_OPTS=0 wins."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if given is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = given
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    child = subprocess.run([sys.executable, "-c", KERNELS], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen == {"flag": given or "1", "onednn": given is None}
