#!/usr/bin/env python
"""Tasks as one computation vs T copies of the step, side by side in one run.

    python tools/bench_tasks.py [--tasks 8] [--filters 16 64] [--steps 10] [--rounds 5]
                                [--conv auto] [--shards N|auto] [--build_tasks 4 32]
                                [--intra_op_threads N] [--skip speed build] [--profile]

`speed`: inner steps per second (one step of one task counts as one) of a
chunk of `--steps` inner steps of T tasks on Leap's Omniglot convnet (4 x
[Conv 3x3, MaxPool, BatchNorm, ReLU] -> Dense 20, 28x28x1, batch 20, Leap,
inner SGD), through `InnerLoop.run` with the per-copy step, with
`TaskBatchedStep.step` (`tfmeta.task_batched`: the T tasks as one
computation) and with it in `--shards` shards (computations side by side;
default one per CPU core),
alternating rounds; the median of each and its ratio to the per-copy step,
per second of wall time and per second of this process's CPU time (which
other processes on a shared machine disturb less).

`--intra_op_threads N` gives TensorFlow's ops N threads each (as
`TF_NUM_INTRAOP_THREADS=N`), for all three: run the tool once with and once
without it to compare the thread settings.

`build`: graph build + first chunk (seconds) of each path at T = 4 and
T = 32, and the T=32 / T=4 ratio (each build runs its own grouped-conv
probes, as a fresh process would, after an untimed build at T = 2 that
takes the process's one-time costs).

`--profile`: where each path's time goes, after the rest: `tf.profiler`
over 3 chunks of the first `--filters`, each op type's time summed over
the executor threads (milliseconds, share of the total), the 12 largest.

Images are scikit-learn's real digits resized to 28x28 (no download).
The machine is shared: run it briefly, and compare ratios, not absolutes.
"""

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# TensorFlow only once the arguments are parsed, under `errors.run_tool`: a
# usage error comes at once and is not preceded by TensorFlow's start-up lines.
from tfmeta.cli import errors  # noqa: E402

PROG = "bench_tasks.py"
BATCH = 20
CLASSES = 20


def _chunk(tasks, steps):
    """A real chunk `[T, S, B, 28, 28, 1]` of digit images and labels."""
    import numpy as np
    import tensorflow as tf

    from tfmeta.tasks.digits import digits_arrays

    images, labels = digits_arrays(image_size=28)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(images), (tasks, steps, BATCH))
    x = tf.constant(images[rows].astype("float32") / 255.0)
    y = tf.constant((labels[rows] % CLASSES).astype("int32"))
    return x, y


def _runner(tasks, filters, steps, conv, shards):
    """`shards`: None for the per-copy step, else `TaskBatchedStep`'s shards."""
    import keras
    import tensorflow as tf

    import tfmeta
    from tfmeta.inner_loop import InnerLoop, mean_loss
    from tfmeta.inner_optimizer import make_stateless
    from tfmeta.models import convnet
    from tfmeta.task_batched import TaskBatchedStep
    from tfmeta.task_state import TaskState

    keras.utils.set_random_seed(0)
    model = convnet(CLASSES, filters=filters)
    optimizer = make_stateless(keras.optimizers.SGD(0.1))
    optimizer.build(model.trainable_variables)
    learner = tfmeta.Leap()
    loss = mean_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loop = InnerLoop(model, loss, learner, optimizer)
    if shards is not None:
        # What the wiring in InnerLoop.step does: the batched step in its place.
        loop = dataclasses.replace(loop)
        loop.step = TaskBatchedStep(loop, conv=conv, shards=shards).step
    state = TaskState(keras.layers.Layer(name="owner"), model, optimizer, learner, tasks)
    start = state.read(tf.constant(True), 0)
    x, y = _chunk(tasks, steps)

    @tf.function
    def run(start):
        _, loss = loop.run(start, x, y, tf.constant(0))
        return loss

    return lambda: float(run(start))


def speed(tasks, filters, steps, rounds, conv, shards):
    from tfmeta.task_batched import task_shard_count

    if shards is None:
        shards = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = task_shard_count(shards, tasks)
    runs = {"per-copy": _runner(tasks, filters, steps, conv, None),
            "batched": _runner(tasks, filters, steps, conv, 1)}
    if count > 1:
        runs[f"batched in {count} shards"] = _runner(tasks, filters, steps, conv, count)
    for run in runs.values():
        run()  # build
    rates = {name: [] for name in runs}
    cpu_rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            began, cpu_began = time.perf_counter(), time.process_time()
            run()
            rates[name].append(tasks * steps / (time.perf_counter() - began))
            cpu_rates[name].append(tasks * steps / (time.process_time() - cpu_began))
    for unit, values in (("steps/s", rates), ("steps per CPU-second", cpu_rates)):
        medians = {name: statistics.median(r) for name, r in values.items()}
        base = medians["per-copy"]
        rows = ", ".join(
            f"{name} {value:.0f}" + ("" if name == "per-copy" else f" ({value / base:.2f}x)")
            for name, value in medians.items()
        )
        print(f"speed T={tasks} filters={filters} conv={conv}, {unit}: {rows}", flush=True)


def build(task_counts, filters, steps, conv):
    from tfmeta.task_batched import _grouped_conv_probe

    times = {}
    for name in ("per-copy", "batched"):
        # Untimed: the process's one-time costs (lazy imports, first kernels) fall on neither T.
        _runner(2, filters, steps, conv, 1 if name == "batched" else None)()
        for tasks in task_counts:
            # Each build probes the grouped convolutions itself, as in a fresh process.
            _grouped_conv_probe.cache_clear()
            run = _runner(tasks, filters, steps, conv, 1 if name == "batched" else None)
            began = time.perf_counter()
            run()
            times[name, tasks] = time.perf_counter() - began
        low, high = task_counts
        print(
            f"build+first chunk {name} (filters={filters}): T={low} {times[name, low]:.1f} s, "
            f"T={high} {times[name, high]:.1f} s, ratio {times[name, high] / times[name, low]:.2f}",
            flush=True,
        )


def _op_times(logdir):
    """`{op type: milliseconds}` summed over every event of the trace in `logdir`."""
    import collections

    # TensorFlow's own protobuf of the trace files (no TensorBoard plugin needed).
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    (path,) = pathlib.Path(logdir).rglob("*.xplane.pb")
    space.ParseFromString(path.read_bytes())
    totals = collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                # "node name:op type" is one op's run; the executor's and the
                # eager runtime's own spans ("ExecutorState::Process",
                # "EagerLocalExecute: f") enclose those and are left out.
                if ":" in name and "::" not in name and " " not in name:
                    totals[name.rsplit(":", 1)[1]] += event.duration_ps / 1e9
    return totals


def profile(tasks, filters, steps, conv):
    import tempfile

    import tensorflow as tf

    for name, shards in (("per-copy", None), ("batched", 1)):
        run = _runner(tasks, filters, steps, conv, shards)
        run()  # build
        with tempfile.TemporaryDirectory() as logdir:
            tf.profiler.experimental.start(logdir)
            try:
                for _ in range(3):
                    run()
            finally:
                tf.profiler.experimental.stop()
            totals = _op_times(logdir)
        total = sum(totals.values())
        rows = ", ".join(f"{op} {ms:.0f} ({ms / total:.0%})" for op, ms in totals.most_common(12))
        print(f"profile T={tasks} filters={filters} {name}, ms over 3 chunks (total {total:.0f}): "
              f"{rows}", flush=True)


def _shards(text):
    if text == "auto":
        return text
    return errors.at_least(1)(text)


def run(argv):
    """The command line `argv`; errors propagate (`main` reports them)."""
    count = errors.at_least(1)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=count, default=8)
    parser.add_argument("--filters", type=count, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=count, default=10)
    parser.add_argument("--rounds", type=count, default=5)
    parser.add_argument("--conv", default="auto", choices=("auto", "grouped", "map"))
    parser.add_argument("--shards", type=_shards, default=None,
                        help="task shards of the third row: an int >= 1 or 'auto' "
                             "(default: one per CPU core)")
    parser.add_argument("--build_tasks", type=count, nargs=2, default=[4, 32])
    parser.add_argument("--intra_op_threads", type=count, default=None)
    parser.add_argument("--skip", choices=("speed", "build"), nargs="+", default=[])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    import tensorflow as tf

    if args.intra_op_threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    threads = tf.config.threading.get_intra_op_parallelism_threads() or "TensorFlow's default"
    print(f"intra-op threads: {threads}", flush=True)
    tf.get_logger().setLevel("ERROR")  # every runner is a new tf.function: no retracing notes
    if "speed" not in args.skip:
        for filters in args.filters:
            speed(args.tasks, filters, args.steps, args.rounds, args.conv, args.shards)
    if "build" not in args.skip:
        build(args.build_tasks, args.filters[0], args.steps, args.conv)
    if args.profile:
        profile(args.tasks, args.filters[0], args.steps, args.conv)
    return 0


def main(argv=None):
    """Bad input: one line on stderr, exit code 2; Ctrl-C: one line, 130 (tfmeta.cli.errors)."""
    return errors.run_tool(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
