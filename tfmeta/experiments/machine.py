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


#: What picks TensorFlow's CPU kernels and their rounding: cells that differ
#: in one of these are not comparable bit for bit.
KERNEL_FIELDS = ("cpu", "avx512", "onednn", "intra_op_threads")


def other_kernels(records, here):
    """A note when some of `records` (cells' `machine` dicts) differ from `here` in `KERNEL_FIELDS`, else None.

    A resumed run on another machine adds cells computed with other kernels
    to the kept ones: on one CPU the cells are deterministic, across CPUs a
    cell's numbers move about as much as with another seed (docs/results.md,
    many-shot v4). Records without a `machine` (older files) are skipped.

    Example::

        note = machine.other_kernels([c.get("machine") for c in cells.values()], machine.describe())
        if note:
            print(f"many_shot.py: note: {note}")
    """
    mine = {name: here.get(name) for name in KERNEL_FIELDS}
    others = {}
    for record in records:
        if not record:
            continue
        theirs = {name: record.get(name) for name in KERNEL_FIELDS}
        if theirs != mine:
            key = tuple(theirs.items())
            others[key] = others.get(key, 0) + 1
    if not others:
        return None

    def say(fields):
        return ", ".join(f"{name} {value!r}" for name, value in fields)

    kept = "; ".join(f"{count} with {say(key)}" for key, count in others.items())
    count = sum(others.values())
    cells = "1 kept cell was" if count == 1 else f"{count} kept cells were"
    return (f"{cells} computed with other kernels ({kept}) than this "
            f"process ({say(mine.items())}): their numbers differ from this machine's about as much as "
            "with another seed; to compare methods, compute all their cells on one kind of machine "
            "(or in another --output_dir).")
