"""`tfmeta.experiments.machine.describe`: the kernels and threads a process computes with, as it started."""

import json
import os
import subprocess
import sys

# tf.config sets the inter-op threads over the environment's; the intra-op ones come from it.
REPORT = """
import json
import tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(3)
from tfmeta.experiments import machine
print(json.dumps(machine.describe()))
"""


def test_a_fresh_process_reports_the_kernels_and_threads_it_was_started_with():
    # oneDNN can always be switched off (TF_ENABLE_ONEDNN_OPTS is read at import)
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "1",
           "TF_NUM_INTEROP_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    described = json.loads(proc.stdout.splitlines()[-1])  # JSON: a results file can hold it
    assert described["onednn"] is False
    assert (described["intra_op_threads"], described["inter_op_threads"]) == ("1", "3")
    import keras
    import tensorflow as tf

    assert (described["tensorflow"], described["keras"]) == (tf.__version__, keras.__version__)
    assert isinstance(described["cpu"], str) and described["avx512"] in (True, False, None)


def test_kept_cells_of_other_kernels_are_named_once_per_kind():
    from tfmeta.experiments.machine import other_kernels

    here = {"cpu": "Intel Xeon", "avx512": True, "onednn": True, "intra_op_threads": "1",
            "inter_op_threads": "default", "tensorflow": "2.21.0"}
    same = {**here, "inter_op_threads": "1"}  # the inter-op pool does not change a kernel's rounding
    amd = {**here, "cpu": "AMD EPYC", "avx512": False}
    assert other_kernels([same, same, None], here) is None  # None: an older cell without a record
    note = other_kernels([same, amd, amd, {**here, "intra_op_threads": "2"}], here)
    assert note.startswith("3 kept cells were computed with other kernels (2 with cpu 'AMD EPYC', "
                           "avx512 False, onednn True, intra_op_threads '1'; 1 with cpu 'Intel Xeon', "
                           "avx512 True, onednn True, intra_op_threads '2') than this process (cpu "
                           "'Intel Xeon', avx512 True, onednn True, intra_op_threads '1')"), note
    assert "one kind of machine" in note
