"""A tool's bad-input error is the first line on stderr, TensorFlow's start-up lines held back.

TensorFlow 2.21 prints its C++ start-up lines (oneDNN notice, CUDA probe,
"All log messages before absl::InitializeLog()") at import, before
`TF_CPP_MIN_LOG_LEVEL` applies. `tfmeta.cli.errors.run_tool` has the first
`import tensorflow` hold file descriptor 2 (`startup.hold_stderr_at_import`),
replayed only if the import fails; `TFMETA_DEBUG=1` keeps every line.
The mechanism is checked on a stand-in module that writes to fd 2 as it
is imported (no TensorFlow); one tool run checks it end to end, and
tests/test_tools_errors.py checks every tool's bad-input run for
TensorFlow's lines (also its CUDA probe, which comes after the import).
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

NOISY = """
import os
os.write(2, b"start-up noise\\n")
if os.environ.get("NOISY_FAILS"):
    raise ImportError("the import failed")
VALUE = 42
"""

IMPORT = """
import json, sys
from tfmeta.cli import startup
startup.hold_stderr_at_import("noisy")
import importlib.util
# Asking whether it is installed imports nothing (etils asks so of TensorFlow): the hold stays.
assert importlib.util.find_spec("noisy") is not None
try:
    import noisy
except ImportError as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(0)
import importlib.machinery
print(json.dumps({"value": noisy.VALUE,
                  "real_loader": type(noisy.__loader__) is importlib.machinery.SourceFileLoader,
                  "finder_left": any(type(f).__name__ == "_HoldingFinder" for f in sys.meta_path)}))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TFMETA_DEBUG", "TF_CPP_MIN_LOG_LEVEL")}
    return {**env, **extra}


def _import_noisy(tmp_path, **extra):
    (tmp_path / "noisy.py").write_text(NOISY)
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), **extra)
    child = subprocess.run([sys.executable, "-c", IMPORT], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout), child.stderr


def test_the_first_import_holds_stderr_and_leaves_the_module_as_imported(tmp_path):
    seen, stderr = _import_noisy(tmp_path)
    assert stderr == ""
    assert seen == {"value": 42, "real_loader": True, "finder_left": False}


def test_a_failing_import_replays_what_it_printed_and_debug_holds_nothing(tmp_path):
    seen, stderr = _import_noisy(tmp_path, NOISY_FAILS="1")
    assert seen == {"error": "the import failed"} and stderr == "start-up noise\n"
    seen, stderr = _import_noisy(tmp_path, TFMETA_DEBUG="1")
    assert seen["value"] == 42 and stderr == "start-up noise\n"


def test_a_tool_s_bad_gin_file_is_its_only_stderr_line(tmp_path):
    # tools/complexity.py imports TensorFlow (tfmeta.configurables) before it
    # looks at --gin_file; oneDNN on prints TensorFlow's notice on any CPU.
    tool = [sys.executable, str(REPO / "tools" / "complexity.py"), "--gin_file", "nonexistent.gin",
            "--output_dir", str(tmp_path / "out")]
    env = _env(PYTHONPATH=str(REPO), TF_ENABLE_ONEDNN_OPTS="1")
    quiet = subprocess.run(tool, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [
        "complexity.py: error: ConfigError: gin: --gin_file nonexistent.gin does not exist: pass "
        "an existing --gin_file (e.g. gin/digits.gin)"]
    loud = subprocess.run(tool, cwd=tmp_path, env={**env, "TFMETA_DEBUG": "1"},
                          capture_output=True, text=True, timeout=120)
    assert "oneDNN custom operations are on" in loud.stderr and "Traceback" in loud.stderr


def test_a_tool_runs_with_only_fatal_cpp_logs_unless_told_otherwise(monkeypatch):
    # TensorFlow logs notices at error level while a tool runs ("E0000 ...
    # util.cc:131] oneDNN supports DT_INT64 only on platforms with AVX-512",
    # on some CPUs only): a tool sets level 3 for itself and its children,
    # unless the user set a level or asked for everything (TFMETA_DEBUG=1).
    from tfmeta.cli import errors

    def level(argv):
        seen.append(os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
        return 0

    for debug, given, expected in ((None, None, "3"), ("1", None, None), (None, "1", "1")):
        seen = []
        for name, value in (("TFMETA_DEBUG", debug), ("TF_CPP_MIN_LOG_LEVEL", given)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        assert errors.run_tool("tool.py", level, []) == 0
        assert seen == [expected], (debug, given)
