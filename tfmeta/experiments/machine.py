"""What an experiment's numbers were computed on: CPU, kernels, threads, versions.

The same cell computed with another kernel set or thread count differs in
its last digits, and after a long training by up to a percent of accuracy
(docs/performance.md, "Experiments: cells side by side": AVX-512 oneDNN
with two threads against AVX2 oneDNN with one moved mean accuracies by up
to 0.015). `describe()` says which it was, for a results file to keep
beside each cell. It is a record, not a setting: a resume does not compare
it.

Example::

    from tfmeta.experiments import machine

    cell = {"targets": scores, "machine": machine.describe()}
    # {"cpu": "AMD EPYC", "avx512": False, "onednn": True, "intra_op_threads": "1",
    #  "inter_op_threads": "1", "tensorflow": "2.21.0", "keras": "3.15.1"}
"""

from __future__ import annotations

import functools
import os
import platform


def describe():
    """This process's CPU model, AVX-512, oneDNN, TensorFlow threads and versions, as a JSON-friendly dict.

    Threads are the `TF_NUM_INTRAOP_THREADS` / `TF_NUM_INTEROP_THREADS`
    TensorFlow started with, or what `tf.config.threading` was set to, or
    `"default"` (TensorFlow's choice: one per CPU). `onednn` is None where
    TensorFlow cannot say.
    """
    import keras
    import tensorflow as tf

    threading = tf.config.threading
    return {
        **_cpu(),
        "onednn": _onednn(),
        "intra_op_threads": _threads("TF_NUM_INTRAOP_THREADS",
                                     threading.get_intra_op_parallelism_threads()),
        "inter_op_threads": _threads("TF_NUM_INTEROP_THREADS",
                                     threading.get_inter_op_parallelism_threads()),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


@functools.lru_cache(maxsize=None)
def _cpu():
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:  # Linux: the model's name and its instruction sets
            for line in info:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    model = value.strip()
                elif name.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        return {"cpu": model, "avx512": None}
    return {"cpu": model, "avx512": "avx512f" in flags}


def _onednn():
    try:  # TensorFlow's own answer (its public API has none)
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def _threads(variable, configured):
    if configured:
        return str(configured)
    return os.environ.get(variable) or "default"
