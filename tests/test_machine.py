"""`tfmeta.experiments.machine.describe`: the kernels and threads a process computes with, as it started."""

import json
import os
import subprocess
import sys

from tfmeta.experiments import machine

REPORT = "import json; from tfmeta.experiments import machine; print(json.dumps(machine.describe()))"


def _described(**env):
    proc = subprocess.run([sys.executable, "-c", REPORT], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_fresh_process_reports_the_kernels_and_threads_it_was_started_with():
    # oneDNN can always be switched off (TF_ENABLE_ONEDNN_OPTS is read at import)
    described = _described(TF_ENABLE_ONEDNN_OPTS="0", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="2")
    assert described["onednn"] is False
    assert (described["intra_op_threads"], described["inter_op_threads"]) == ("1", "2")
    import keras
    import tensorflow as tf

    assert (described["tensorflow"], described["keras"]) == (tf.__version__, keras.__version__)
    assert isinstance(described["cpu"], str) and described["avx512"] in (True, False, None)


def test_threads_set_through_tf_config_are_reported_over_the_environment(monkeypatch):
    import tensorflow as tf

    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    configured = tf.config.threading.get_inter_op_parallelism_threads()
    described = machine.describe()
    assert described["inter_op_threads"] == (str(configured) if configured else "default")
    json.dumps(described)  # a results file can hold it
