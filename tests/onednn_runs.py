"""Run some of a test file's tests again in two fresh processes, oneDNN off and on.

`TF_ENABLE_ONEDNN_OPTS` is read when TensorFlow starts, so a check "with and
without oneDNN" needs processes of its own. Each child runs serially
(`-n 0`: a handful of tests do not pay for xdist workers) and sees
`TFMETA_EXPECT_ONEDNN`, for a test that asserts TensorFlow got the setting.
"""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def start(test_file, expression):
    """`{"0": child, "1": child}`: pytest on `test_file -k expression`, oneDNN off and on, started."""
    children = {}
    for flag in ("0", "1"):
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=flag, TFMETA_EXPECT_ONEDNN=flag)
        children[flag] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
             str(test_file), "-k", expression],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    return children
