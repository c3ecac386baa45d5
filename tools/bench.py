#!/usr/bin/env python
"""Benchmarks, measured side by side in one run (medians and ratios).

    python tools/bench.py inner   [--tasks 4] [--steps 300] [--repeats 5] [--filters 64]
    python tools/bench.py graph   [--short 10] [--long 1000]
    python tools/bench.py fisher  (see tools/bench_fisher.py)
    python tools/bench.py replicas [--learner leap] [--tasks 4] [--steps 100] [--no_jit]
    python tools/bench.py jit      [--learner leap] [--tasks 4] [--steps 100]
    python tools/bench.py gpu      [--smoke] [--tasks 4 16 64] [--steps 100] [--filters 64]
    python tools/bench.py finetune [--steps 1000] [--repeats 5]

`inner`: inner steps per second of each meta-learner with T tasks on Leap's
Omniglot convnet (4 x [Conv 3x3, MaxPool, BatchNorm, ReLU] -> Dense 20,
28x28x1, batch 20), divided by (a) plain `model.fit` steps per second and
(b) a hand-written `tf.function` loop that fuses many plain training steps.
One inner step of one task counts as one step, so T tasks advancing together
make T steps.

`graph`: graph-build time and peak memory of meta-training with trajectory
length K = long vs K = short (same chunk size), each in a fresh process.

`replicas`: inner steps per second of MetaModel.fit with the T tasks on one
replica vs split over two (two GPUs if present, else two logical CPU devices,
which share the same cores: expect a ratio below 1 there), and with
`jit_compile=True` on one replica. `jit`: XLA on vs off on one device.

`gpu`: the table for a GPU machine: inner steps per second of each
meta-learner for T in {4, 16, 64} tasks, XLA (per replica) on vs off, one
device vs all GPUs (`get_strategy("mirrored")`), next to plain Keras `fit`
of the same model on the same batch size, as ratios. Without GPUs it runs on
two logical CPU devices, as a smoke test (`--smoke`: T in {4, 8}, few steps,
one block of 8 filters: 32 MetaModels to build, about 4 minutes on
2 shared cores).

`finetune`: `tfmeta.finetune.finetune` on the many-shot benchmark's convnet
(16 filters, 4 blocks, batch 32, its meta-test optimizer), whole calls
(compile and trace included), many steps per execution vs one, and the
per-step callback recorder it used before.

The machines are shared and noisy: every number is a median over repeats,
and the ratios compare runs made in the same process, interleaved.
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tfmeta.cli import errors  # noqa: E402

PROG = "bench.py"
BATCH = 20
CLASSES = 20


def _data(n, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (
        rng.random((n, 28, 28, 1), dtype="float32"),
        rng.integers(0, CLASSES, n).astype("int32"),
    )


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _median_rate(run, steps, repeats):
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        rates.append(steps / (time.perf_counter() - began))
    return statistics.median(rates)


def _medians(runs, steps, repeats, rounds=None):
    """Median steps/s of every run over interleaved repeats (`steps[name]` per call).

    Interleaving lets load changes hit every candidate alike. `rounds`, if a
    dict, receives every run's steps/s per round (for ranges and per-round ratios).
    """
    rates = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(_median_rate(run, steps[name], 1))
    if rounds is not None:
        rounds.update(rates)
    return {name: statistics.median(r) for name, r in rates.items()}


def bench_fit(steps, filters, jit_compile="auto", blocks=4, data=None):
    """Plain Keras: `model.fit` with one step per call of the train function.

    `data`: the examples `(x, y)`, read in order, BATCH per step (default: 64 random batches).
    """
    import keras
    import tensorflow as tf

    from tfmeta.input_options import without_autotuning
    from tfmeta.models import convnet

    model = convnet(CLASSES, filters=filters, blocks=blocks)
    model.compile(keras.optimizers.SGD(0.1), _loss(), jit_compile=jit_compile)
    x, y = _data(BATCH * 64) if data is None else data
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True).repeat()
    # As tfmeta's own fit does: no autotuning, so no stall at the end of each call.
    ds = without_autotuning(ds)
    began = time.perf_counter()
    model.fit(ds, steps_per_epoch=20, verbose=0, shuffle=False)  # trace and warm up
    run = lambda: model.fit(ds, steps_per_epoch=steps, verbose=0, shuffle=False)  # noqa: E731
    run.build_seconds = time.perf_counter() - began
    return run


def bench_fused(steps, filters, blocks=4, data=None, jit_compile=False, model_fn=None):
    """A hand-written tf.function that runs `steps` plain training steps in one call.

    One `tf.while_loop` over the batches of `data` (as in `bench_fit`), XLA
    with `jit_compile=True`; `model_fn(classes, filters=, blocks=)` builds the
    network (default `tfmeta.models.convnet`).
    """
    import keras
    import tensorflow as tf

    from tfmeta.models import convnet

    model = (model_fn or convnet)(CLASSES, filters=filters, blocks=blocks)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    loss_fn = _loss()
    x, y = _data(BATCH * 64) if data is None else data
    count = len(x) // BATCH
    x = tf.constant(x.reshape(count, BATCH, *model.input_shape[1:]))
    y = tf.constant(y.reshape(count, BATCH))

    @tf.function(jit_compile=jit_compile)
    def train(n):
        def body(i, total):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i % count], model(x[i % count], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return i + 1, total + loss

        return tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), tf.constant(0.0)))[1]

    began = time.perf_counter()
    train(tf.constant(20))  # trace and warm up
    run = lambda: train(tf.constant(steps)).numpy()  # noqa: E731
    run.build_seconds = time.perf_counter() - began
    return run


def inner(args):
    import tensorflow as tf

    runs = {
        "fit": bench_fit(args.steps, args.filters),
        "fused": bench_fused(args.steps, args.filters),
    }
    for name in LEARNERS:
        runs[name] = bench_meta(
            tf.distribute.get_strategy(), _learner(name), args.steps, args.filters, args.tasks
        )
    steps = {name: args.steps * (1 if name in ("fit", "fused") else args.tasks) for name in runs}
    median = _medians(runs, steps, args.repeats)
    print(
        f"Inner steps per second, Leap Omniglot convnet ({args.filters} filters, batch {BATCH}), "
        f"T = {args.tasks} tasks, {args.steps} steps per task per call, median of {args.repeats}:"
    )
    print("| run | steps/s | / fit | / fused loop |")
    print("|---|---|---|---|")
    for name, rate in median.items():
        print(
            f"| {name} | {rate:.0f} | {rate / median['fit']:.2f} | {rate / median['fused']:.2f} |"
        )
    return median


def _graph_probe(inner_steps, chunk, filters):
    """In a fresh process: build time of the first fit call and peak RSS."""
    import keras
    import tensorflow as tf

    import tfmeta
    from tfmeta.models import convnet

    model = convnet(CLASSES, filters=filters)
    meta = tfmeta.MetaModel(model)
    meta.compile(
        optimizer=keras.optimizers.SGD(0.1),
        inner_optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=_loss(),
        learner=tfmeta.Leap(),
        inner_steps=inner_steps,
    )
    tasks = 4
    x, y = _data(tasks * chunk * BATCH)
    ds = tf.data.Dataset.from_tensors(
        (x.reshape(tasks, chunk, BATCH, 28, 28, 1), y.reshape(tasks, chunk, BATCH))
    ).repeat()
    began = time.perf_counter()
    meta.fit(ds, steps_per_epoch=1, verbose=0)
    build = time.perf_counter() - began
    # Run a whole trajectory of the long setting (and as many chunks for the
    # short one) so that peak memory covers the steady state.
    meta.fit(ds, steps_per_epoch=max(1, 1000 // chunk), verbose=0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"build_seconds": build, "peak_rss_mb": peak_mb, "meta_updates": int(meta.meta_updates.numpy())}))


def graph(args):
    results = {}
    for K in (args.short, args.long):
        samples = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [sys.executable, __file__, "_graph_probe", str(K), str(args.chunk), str(args.filters)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip().splitlines()[-1]
            samples.append(json.loads(out))
        results[K] = {
            key: statistics.median(s[key] for s in samples) for key in ("build_seconds", "peak_rss_mb")
        }
        results[K]["meta_updates"] = samples[0]["meta_updates"]
    short, long = results[args.short], results[args.long]
    print(f"Leap, T = 4, chunks of {args.chunk} steps, median of {args.repeats} fresh processes:")
    print("| K | graph build + first chunk (s) | peak RSS (MB) | meta-updates in 1000 steps |")
    print("|---|---|---|---|")
    for K, r in results.items():
        print(f"| {K} | {r['build_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['meta_updates']} |")
    print(
        f"ratio K={args.long} / K={args.short}: build {long['build_seconds'] / short['build_seconds']:.2f}, "
        f"peak memory {long['peak_rss_mb'] / short['peak_rss_mb']:.2f}"
    )
    return results


def bench_meta(strategy, learner, steps, filters, tasks, chunk=10, inner_steps=100, jit_compile="auto",
               blocks=4, data=None, model_fn=None, **compile_kwargs):
    """MetaModel.fit under `strategy`: one call runs `steps` inner steps of every task.

    `data`: the examples `(x, y)`, cut into chunks `[tasks, chunk, BATCH, ...]`
    in order and repeated (default: one random chunk); `model_fn` as in
    `bench_fused`; `compile_kwargs` go to `MetaModel.compile`.
    """
    import keras
    import tensorflow as tf

    import tfmeta
    from tfmeta.models import convnet

    calls = max(1, steps // chunk)
    with strategy.scope():
        model = (model_fn or convnet)(CLASSES, filters=filters, blocks=blocks)
        meta = tfmeta.MetaModel(model)
        meta.compile(
            optimizer=keras.optimizers.SGD(0.1),
            inner_optimizer=keras.optimizers.SGD(0.1),
            loss=_loss(),
            learner=learner,
            inner_steps=inner_steps,
            steps_per_execution=calls,
            jit_compile=jit_compile,
            **compile_kwargs,
        )
    x, y = _data(tasks * chunk * BATCH) if data is None else data
    count = len(x) // (tasks * chunk * BATCH)
    ds = tf.data.Dataset.from_tensor_slices((
        x[: count * tasks * chunk * BATCH].reshape(count, tasks, chunk, BATCH, *model.input_shape[1:]),
        y[: count * tasks * chunk * BATCH].reshape(count, tasks, chunk, BATCH),
    )).repeat()
    began = time.perf_counter()
    meta.fit(ds, steps_per_epoch=calls, verbose=0)  # trace and warm up
    build = time.perf_counter() - began
    run = lambda: meta.fit(ds, steps_per_epoch=calls, verbose=0)  # noqa: E731
    run.build_seconds = build
    return run


LEARNERS = ("leap", "reptile", "fomaml", "cts")


def _learner(name):
    import tfmeta

    return {
        "leap": tfmeta.Leap,
        "reptile": tfmeta.Reptile,
        "fomaml": tfmeta.FOMAML,
        "cts": lambda: tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile(), every=10),
    }[name]()


def _per_round(rounds, name, other):
    """Median and range of the per-round ratios of `name` to `other`, as text."""
    ratios = sorted(a / b for a, b in zip(rounds[name], rounds[other]))
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def _compare(runs, args, baseline, steps=None, skipped=(), reference=None):
    """Interleaved repeats of every run; median inner steps/s and ratio to `baseline`.

    Also each run's range over the rounds and the median and range of its
    per-round ratios (both runs of a ratio measured in the same round, under
    the same load). `steps[name]`: steps per call (default `args.steps *
    args.tasks`); `skipped`: `(name, reason)` rows printed after the measured
    ones; `reference[name]`: another run to give the per-round ratio to (e.g.
    the same run under the default setting), in an extra column.
    """
    steps = steps or dict.fromkeys(runs, args.steps * args.tasks)
    reference = reference or {}
    rounds = {}
    median = _medians(runs, steps, args.repeats, rounds)
    extra = " / default, per round |" if reference else ""
    print(
        f"| run | inner steps/s | range over rounds | / {baseline} | per round: median (range) |"
        f"{extra} first call (trace + compile), s |"
    )
    print("|---|---|---|---|---|" + ("---|" if reference else "") + "---|")
    for name, rate in median.items():
        cell = ""
        if reference:
            cell = f" {_per_round(rounds, name, reference[name]) if reference.get(name) in rounds else '-'} |"
        print(
            f"| {name} | {rate:.0f} | {min(rounds[name]):.0f}-{max(rounds[name]):.0f} | "
            f"{rate / median[baseline]:.2f} | {_per_round(rounds, name, baseline)} |{cell} "
            f"{runs[name].build_seconds:.1f} |"
        )
    for name, reason in skipped:
        print(f"| {name} | {reason} |" + " |" * (5 if reference else 4))
    return median


def replicas(args):
    """1 vs 2 replicas (two logical CPU devices here, GPUs elsewhere), and XLA on/off."""
    import tensorflow as tf

    from tfmeta import distribute

    gpus = tf.config.list_physical_devices("GPU")
    devices = [f"/gpu:{i}" for i in range(2)] if len(gpus) >= 2 else [f"/cpu:{i}" for i in range(2)]
    one = tf.distribute.get_strategy()
    two = distribute.get_strategy("mirrored", devices)
    learner = lambda: _learner(args.learner)  # noqa: E731
    common = (args.steps, args.filters, args.tasks, args.chunk)
    runs = {
        "1 replica": bench_meta(one, learner(), *common),
        f"2 replicas ({', '.join(devices)})": bench_meta(two, learner(), *common),
    }
    if not args.no_jit:
        runs["1 replica, jit_compile=True"] = bench_meta(one, learner(), *common, jit_compile=True)
    print(
        f"MetaModel.fit, {args.learner}, Leap Omniglot convnet ({args.filters} filters, batch "
        f"{BATCH}), T = {args.tasks} tasks split over the replicas, {args.steps} inner steps "
        f"per task per call, median of {args.repeats} (one process, interleaved); "
        f"{os.cpu_count()} CPU cores, {len(gpus)} GPUs:"
    )
    return _compare(runs, args, "1 replica")


def jit(args):
    """XLA on vs off on one device."""
    import tensorflow as tf

    one = tf.distribute.get_strategy()
    common = (args.steps, args.filters, args.tasks, args.chunk)
    runs = {
        "jit_compile=False": bench_meta(one, _learner(args.learner), *common, jit_compile=False),
        "jit_compile=True": bench_meta(one, _learner(args.learner), *common, jit_compile=True),
    }
    print(
        f"MetaModel.fit, {args.learner}, convnet ({args.filters} filters), T = {args.tasks}, "
        f"{args.steps} inner steps per task per call, median of {args.repeats}; "
        f"Keras' jit_compile='auto' here: {'XLA' if tf.config.list_physical_devices('GPU') else 'off (CPU only)'}:"
    )
    return _compare(runs, args, "jit_compile=False")


def _previous_recorder():
    """The per-step recorder `finetune` used before: a callback, one step per execution."""
    import keras

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.losses, self.errors = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.model.reset_metrics()

        def on_train_batch_end(self, batch, logs=None):
            self.losses.append(float(logs["loss"]))
            self.errors.append(1.0 - float(logs["accuracy"]))

    return Recorder()


def finetune_calls(args):
    """`finetune` calls per second: steps_per_execution 'auto' and 1, and the previous recorder."""
    from tfmeta.experiments import many_shot
    from tfmeta.finetune import _training_dataset, finetune
    from tfmeta.input_options import without_autotuning

    bench = many_shot.Benchmark()
    weights = many_shot.initial_model(bench, 10, 0).get_weights()
    x, y = _data(2000)
    data, losses = (x, y % 10), {}

    def model():
        net = many_shot.initial_model(bench, 10, 0)
        net.set_weights(weights)
        return net

    def previous():
        net, recorder = model(), _previous_recorder()
        net.compile(many_shot.finetune_optimizer(bench), _loss(), metrics=["accuracy"])
        net.fit(without_autotuning(_training_dataset(data, bench.batch_size, 0)), epochs=1,
                steps_per_epoch=args.steps, shuffle=False, callbacks=[recorder], verbose=0)
        losses["previous"] = recorder.losses

    def new(execution):
        def run():
            losses[execution] = finetune(model(), data, steps=args.steps, batch_size=bench.batch_size,
                                         optimizer=many_shot.finetune_optimizer(bench),
                                         steps_per_execution=execution).losses
        return run

    baseline = "previous (callback recorder)"
    runs = {baseline: previous, "steps_per_execution=1": new(1),
            "steps_per_execution='auto' (the default)": new("auto")}
    finetune(model(), data, steps=10)  # TensorFlow's first-graph costs, outside the rounds
    rounds = {}
    median = _medians(runs, dict.fromkeys(runs, 1), args.repeats, rounds)
    print(f"finetune, many-shot convnet, {args.steps} steps per call, {args.repeats} rounds "
          f"(interleaved); same losses in every run: {len({tuple(v) for v in losses.values()}) == 1}")
    print("| run | calls/s | / previous | per round: median (range) |\n|---|---|---|---|")
    for name, rate in median.items():
        print(f"| {name} | {rate:.3f} | {rate / median[baseline]:.2f} | {_per_round(rounds, name, baseline)} |")
    return median


# `gpu --smoke`: the table on two logical CPU devices in about a minute or two.
SMOKE = dict(tasks=(4, 8), steps=20, repeats=2, filters=8, blocks=1)


def _devices():
    """All GPUs, or two logical CPU devices where there are none (set up by `main`)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in gpus] if gpus else ["/cpu:0", "/cpu:1"]


def gpu(args):
    """Per learner and T: XLA on vs off, 1 vs all devices, and Keras fit, as one table."""
    import tensorflow as tf

    from tfmeta import distribute

    devices = _devices()
    strategies = {1: tf.distribute.get_strategy()}
    if len(devices) > 1:
        strategies[len(devices)] = distribute.get_strategy("mirrored", devices)
    every = max(strategies)
    # The baselines stay built: each group below measures them again, interleaved with it.
    fits = {
        xla: bench_fit(args.steps, args.filters, jit_compile=xla, blocks=args.blocks)
        for xla in (False, True)
    }
    rows, fit_rates = [], {xla: [] for xla in fits}
    for name in LEARNERS:
        for tasks in args.tasks:
            runs = {("fit", xla): fits[xla] for xla in fits}
            for count, strategy in strategies.items():
                if tasks % count == 0:
                    for xla in (False, True):
                        runs[count, xla] = bench_meta(
                            strategy, _learner(name), args.steps, args.filters, tasks, args.chunk,
                            jit_compile=xla, blocks=args.blocks,
                        )
            steps = {key: args.steps * (1 if key[0] == "fit" else tasks) for key in runs}
            rates = _medians(runs, steps, args.repeats)
            for (count, xla), rate in rates.items():
                if count == "fit":
                    fit_rates[xla].append(rate)
                else:
                    rows.append((name, tasks, count, xla, rate, rates[count, False],
                                 rates[1, xla] if (1, xla) in rates else None, rates["fit", xla]))
            del runs  # frees this group's models before the next one is built
    kind = "GPU" if tf.config.list_logical_devices("GPU") else "logical CPU device"
    print(
        f"Inner steps/s, Leap Omniglot convnet (blocks={args.blocks}, filters={args.filters}, "
        f"batch {BATCH}), "
        f"{args.steps} inner steps per task per call (steps_per_execution fuses "
        f"{max(1, args.steps // args.chunk)} chunks of {args.chunk}), median of {args.repeats}, "
        f"interleaved per learner and T; 1 vs {every} {kind}(s) ({', '.join(devices)}); XLA = "
        "jit_compile=True (MetaModel: per replica; fit: Keras' train function). / fit: vs "
        "plain Keras fit of the same model and batch on one device, same XLA setting "
        "(one fit step = one batch):"
    )
    print("| learner | T | devices | XLA | inner steps/s | XLA / no XLA | all / 1 device | / fit |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tasks, count, xla, rate, off, single, fit in rows:
        speedup = f"{rate / off:.2f}" if xla else "-"
        scaling = f"{rate / single:.2f}" if count != 1 and single else "-"
        print(
            f"| {name} | {tasks} | {count} | {'on' if xla else 'off'} | {rate:.0f} | "
            f"{speedup} | {scaling} | {rate / fit:.2f} |"
        )
    print("Keras fit, steps/s (median over the groups): " + ", ".join(
        f"XLA {'on' if xla else 'off'} {statistics.median(r):.0f}" for xla, r in fit_rates.items()
    ))
    return rows


# ---------------------------------------------------------------------------
# `pytorch` and `settings`: TensorFlow next to a plain PyTorch loop, each
# framework (and each TensorFlow setting that must be fixed before TensorFlow
# starts) in its own worker process; the parent imports neither and runs the
# workers' calls in alternating rounds.

TORCH_MISSING = "skipped: PyTorch is not installed (optional: pip install torch==2.13.0)"
BATCHED_OPTION = {"vectorize_tasks": True}  # the compile option that runs the T tasks batched
# TensorFlow's kernel sets: oneDNN on (TF's default on CPUs with AVX-512), off (its default on
# CPUs without: Eigen kernels), and on but limited to AVX2, as forcing oneDNN on a CPU without
# AVX-512 would run (ONEDNN_MAX_CPU_ISA caps the instructions oneDNN's kernels use).
KERNELS = {
    "on": {"TF_ENABLE_ONEDNN_OPTS": "1"},
    "off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "avx2": {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
KERNEL_NAMES = {"on": "oneDNN on", "off": "oneDNN off", "avx2": "oneDNN on, AVX2 only"}
# PyTorch as on a CPU without AVX-512: its oneDNN and its own (ATen) kernels capped at AVX2.
TORCH_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
WORKER_PREFIX = "BENCH-WORKER "
ONE_THREAD = "1 thread per op"  # the label of `pytorch --one_thread`'s workers
NO_TORCH_ENV = "TFMETA_BENCH_NO_TORCH"  # set by --no_torch: the workers behave as without PyTorch


def _torch_convnet(filters, blocks):
    """tfmeta.models.convnet in PyTorch: the same layers, shapes and parameter count."""
    import torch.nn as nn

    layers, channels, size = [], 1, 28
    for _ in range(blocks):
        # ceil_mode: the shapes of Keras' MaxPooling2D(2, padding="same") (28, 14, 7, 4, 2)
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                   nn.BatchNorm2d(filters, momentum=0.1), nn.ReLU()]
        channels, size = filters, -(-size // 2)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, CLASSES))


def bench_torch(steps, filters, blocks=4, data=None, channels_last=False, threads=2):
    """A plain PyTorch training loop (SGD 0.1, cross-entropy) over the batches of `data`.

    The batches are those of `bench_fused` (NHWC arrays viewed as NCHW, or kept
    in NHWC memory with `channels_last`), `threads` intra-op threads.
    """
    import torch

    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _torch_convnet(filters, blocks).to(memory_format=fmt)
    x, y = _data(BATCH * 64) if data is None else data
    count = len(x) // BATCH
    x = torch.from_numpy(x.reshape(count, BATCH, 28, 28, 1)).permute(0, 1, 4, 2, 3)
    xs = [batch.contiguous(memory_format=fmt) for batch in x]
    ys = list(torch.from_numpy(y.astype("int64").reshape(count, BATCH)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()

    def train(n):
        for i in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(xs[i % count]), ys[i % count]).backward()
            optimizer.step()

    began = time.perf_counter()
    train(20)  # oneDNN primitives and allocator warm up
    run = lambda: train(steps)  # noqa: E731
    run.build_seconds = time.perf_counter() - began
    return run


MODEL_VARIANTS = ("leap", "bn_pool", "fused_bn", "channels_first", "noinline_pool")


def _model_variant(name):
    """`model_fn` for `bench_fused` / `bench_meta`: Leap's convnet ("leap") or a variant of it.

    "bn_pool": BatchNorm before MaxPool (4x the BatchNorm work); "fused_bn":
    Keras' BatchNormalization (moments and arithmetic, many small ops) as
    TensorFlow's one fused kernel (FusedBatchNormV3); "channels_first": NCHW layers;
    "noinline_pool": MaxPool's gradient in a function that is not inlined, as
    `tfmeta.task_batched` lowers it (oneDNN's rewrite otherwise misses the
    MaxPool / MaxPoolGrad pair inside a while loop).
    """
    if name not in MODEL_VARIANTS:
        raise ValueError(f"unknown model variant {name!r}: use one of {MODEL_VARIANTS}")
    if name == "leap":
        return None
    import keras
    import tensorflow as tf

    layers = keras.layers

    class FusedBatchNorm(layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            if not training:
                return super().call(inputs, training=training)
            out, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
            )
            for stat, value in ((self.moving_mean, mean), (self.moving_variance, variance)):
                stat.assign(stat * self.momentum + value * (1.0 - self.momentum))
            return out

    class NoinlinePool(layers.MaxPooling2D):
        def call(self, inputs):
            from tfmeta.task_batched import _max_pool_2d

            return _max_pool_2d(self, inputs)

    def build(classes, filters, blocks):
        fmt = "channels_first" if name == "channels_first" else "channels_last"
        norm = FusedBatchNorm if name == "fused_bn" else layers.BatchNormalization
        pooling = NoinlinePool if name == "noinline_pool" else layers.MaxPooling2D
        model = keras.Sequential(
            [keras.Input((1, 28, 28) if fmt == "channels_first" else (28, 28, 1))], name=f"convnet_{name}"
        )
        for _ in range(blocks):
            conv = layers.Conv2D(filters, 3, padding="same", data_format=fmt)
            pool = pooling(2, padding="same", data_format=fmt)
            bn = norm(axis=1 if fmt == "channels_first" else -1, momentum=0.9)
            for layer in (conv, bn, pool) if name == "bn_pool" else (conv, pool, bn):
                model.add(layer)
            model.add(layers.ReLU())
        model.add(layers.Flatten())
        model.add(layers.Dense(classes))
        return model

    return build


def _worker_run(kind, options, sizes, data):
    """(run, steps per call) of one run of a worker spec."""
    steps, filters, blocks = sizes["steps"], sizes["filters"], sizes["blocks"]
    if kind == "torch":
        return bench_torch(steps, filters, blocks, data, **options), steps
    model_fn = _model_variant(options.pop("model", "leap"))
    if kind == "fused":
        return bench_fused(steps, filters, blocks, data, model_fn=model_fn, **options), steps
    if kind == "fit":
        return bench_fit(steps, filters, blocks=blocks, data=data), steps
    import tensorflow as tf

    tasks = options.pop("tasks")
    run = bench_meta(
        tf.distribute.get_strategy(), _learner(options.pop("learner")), steps, filters, tasks,
        sizes[options.pop("chunk", "chunk")], sizes["inner_steps"], blocks=blocks, data=data,
        model_fn=model_fn, **options,
    )
    return run, steps * tasks


def _say(message):
    print(WORKER_PREFIX + json.dumps(message), flush=True)


def _worker(spec):
    """A worker process: build the runs of `spec`, then run the one named on each stdin line.

    `spec["grappler"]`: options for `tf.config.optimizer.set_experimental_options`,
    set before anything is traced.
    """
    if os.environ.get(NO_TORCH_ENV):
        sys.modules["torch"] = None  # `import torch` fails as where it is not installed
    if spec.get("grappler"):
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options(spec["grappler"])
    data = _data(spec["sizes"]["pool"] * BATCH)
    runs, failed = {}, {}
    for name, kind, options in spec["runs"]:
        try:
            runs[name] = _worker_run(kind, dict(options), spec["sizes"], data)
        except ImportError as error:
            failed[name] = TORCH_MISSING if error.name == "torch" else f"skipped: {error}"
        except Exception as error:  # a setting this TensorFlow cannot run is a result too
            failed[name] = f"fails: {type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    _say({
        "steps": {name: steps for name, (_, steps) in runs.items()},
        "build": {name: run.build_seconds for name, (run, _) in runs.items()},
        "failed": failed,
    })
    for line in sys.stdin:
        runs[line.strip()][0]()
        _say({})


class _Worker:
    """The parent's handle on a worker process (`python tools/bench.py _worker SPEC`)."""

    def __init__(self, env, spec):
        import tempfile

        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "_worker", json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, **env},
        )
        ready = self._read()
        self.steps, self.build, self.failed = ready["steps"], ready["build"], ready["failed"]

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(WORKER_PREFIX):
                return json.loads(line[len(WORKER_PREFIX):])
        self.log.seek(0)
        raise RuntimeError("a benchmark worker exited:\n" + self.log.read()[-3000:])

    def runner(self, name):
        """A callable that runs `name` in the worker and returns when it is done."""
        def run():
            self.proc.stdin.write(name + "\n")
            self.proc.stdin.flush()
            self._read()

        run.build_seconds = self.build[name]
        return run

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def _measure(groups, args, baseline, title, skipped=(), reference=None):
    """Start one worker per group, then `_compare` all their runs in alternating rounds.

    `groups`: `(label, env, [(name, kind, options), ...][, spec])`: the
    worker's environment, its runs, and more of its spec (e.g. "grappler");
    rows are named "label: name"; `skipped` rows are printed as such;
    `reference` as in `_compare`. Returns the medians (steps/s per row).
    """
    sizes = {key: getattr(args, key) for key in ("steps", "filters", "blocks", "inner_steps", "chunk")}
    sizes["pool"] = args.tasks * args.inner_steps  # one trajectory of T tasks: T x K batches
    workers, runs, steps, skipped = [], {}, {}, list(skipped)
    try:
        for label, env, specs, *extra in groups:
            worker = _Worker(env, {"sizes": sizes, "runs": specs, **(extra[0] if extra else {})})
            workers.append(worker)
            for name, *_ in specs:
                row = f"{label}: {name}" if label else name
                if name in worker.failed:
                    skipped.append((row, worker.failed[name]))
                else:
                    runs[row], steps[row] = worker.runner(name), worker.steps[name]
        if baseline not in runs:
            baseline = next(iter(runs))
        print(title + f" Ratios to {baseline!r}. Load average (1 min) before: {os.getloadavg()[0]:.1f}.")
        median = _compare(runs, args, baseline, steps, skipped, reference)
        print(f"Load average (1 min) after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
        return median
    finally:
        for worker in workers:
            worker.close()


def _torch_groups(args, variants=True):
    """The PyTorch workers: NCHW with 2 threads, and with `variants` channels_last and 1 thread.

    With "avx2" among --kernels, also PyTorch capped at AVX2 (2 threads); with
    --no_torch, workers that cannot import PyTorch.
    """
    specs = [("PyTorch NCHW", "torch", {})]
    if variants:
        specs += [
            ("PyTorch channels_last", "torch", {"channels_last": True}),
            ("PyTorch NCHW, 1 thread", "torch", {"threads": 1}),
            ("PyTorch channels_last, 1 thread", "torch", {"channels_last": True, "threads": 1}),
        ]
    missing = {NO_TORCH_ENV: "1"} if args.no_torch else {}
    groups = [("", missing, specs)]
    if "avx2" in args.kernels:
        groups.append(("AVX2 only", {**TORCH_AVX2, **missing}, [
            ("PyTorch NCHW", "torch", {}), ("PyTorch channels_last", "torch", {"channels_last": True}),
        ]))
    return groups


def _batched_wired():
    """True once InnerLoop can run the tasks batched (tfmeta/inner_loop.py uses task_batched)."""
    source = pathlib.Path(__file__).resolve().parents[1] / "tfmeta" / "inner_loop.py"
    return "task_batched" in source.read_text()


def pytorch(args):
    """Issue 15's table: plain PyTorch, plain TensorFlow, Keras fit and tfmeta, alternating."""
    T = args.tasks
    tf_runs = [
        ("fused tf.function loop", "fused", {}),
        ("Keras fit", "fit", {}),
        (f"Leap T={T}", "meta", {"learner": "leap", "tasks": T}),
        ("Leap T=1", "meta", {"learner": "leap", "tasks": 1}),
        (f"Reptile T={T}", "meta", {"learner": "reptile", "tasks": T}),
    ]
    batched = f"Leap T={T}, tasks batched"
    if args.batched == "on" or (args.batched == "auto" and _batched_wired()):
        tf_runs.append((batched, "meta", {"learner": "leap", "tasks": T, **BATCHED_OPTION}))
    # One thread per op, T tasks side by side: the copies, and the batched step
    # in one shard per core (task_shards="auto" gives that under one thread).
    one_thread_runs = [run for run in tf_runs if run[0] != batched] + [(
        f"{batched} in shards", "meta",
        {"learner": "leap", "tasks": T, **BATCHED_OPTION, "task_shards": "auto"},
    )]
    groups = _torch_groups(args)
    for kernels in args.kernels:
        groups.append((KERNEL_NAMES[kernels], KERNELS[kernels], [(n, k, dict(o)) for n, k, o in tf_runs]))
        if args.one_thread:
            groups.append((
                f"{KERNEL_NAMES[kernels]}, {ONE_THREAD}", {**KERNELS[kernels], **_thread_env(1, 2)},
                [(n, k, dict(o)) for n, k, o in one_thread_runs],
            ))
    title = (
        f"Steps/s (one SGD step of one task = one step), Leap Omniglot convnet ({args.blocks} x "
        f"[Conv 3x3 {args.filters}, MaxPool, BatchNorm, ReLU] -> Dense {CLASSES}, batch {BATCH}, "
        f"SGD 0.1), the same {args.tasks * args.inner_steps} pre-generated batches, "
        f"{args.steps} steps per task per call, K = {args.inner_steps}, chunks of {args.chunk}; "
        f"{args.repeats} alternating rounds (medians); PyTorch 2 threads; {os.cpu_count()} cores."
    )
    skipped = [] if any(name == batched for name, *_ in tf_runs) else [(
        batched, "not run: InnerLoop does not run tasks batched yet (tfmeta/task_batched.py); "
        "`--batched on` adds this row",
    )]
    median = _measure(groups, args, "PyTorch NCHW", title, skipped)
    _goals(median, args)
    return median


def _goals(median, args):
    """The issue's goals as a table: per TensorFlow kernel set and PyTorch reference, from the medians.

    References: plain PyTorch NCHW with 2 threads (the issue's baseline) and
    the fastest PyTorch row (stricter on a loaded machine, where PyTorch's
    2-thread OpenMP pool can collapse); for the kernel sets of CPUs without
    AVX-512 also PyTorch capped at AVX2.
    """
    T = args.tasks
    goals = ((f"Leap T={T}", 1.5), ("Leap T=1", 1.2), ("fused tf.function loop", 1.0))
    print("Goals, from the medians:")
    print(
        f"| TensorFlow kernels | reference | Leap T={T} / ref (>= 1.5) | Leap T=1 / ref (>= 1.2) "
        f"| fused loop / ref (>= 1.0) | Leap's time over Reptile's (<= +5%) "
        f"| Leap T={T}, tasks batched / ref (>= 1.5) |"
    )
    print("|---|---|---|---|---|---|---|")
    labels = [
        (kernels, label) for kernels in args.kernels
        for label in (KERNEL_NAMES[kernels], f"{KERNEL_NAMES[kernels]}, {ONE_THREAD}")
        if any(name.startswith(f"{label}: ") for name in median)
    ]
    for kernels, label in labels:
        rate = lambda name: median.get(f"{label}: {name}")  # noqa: E731
        batched = rate(f"Leap T={T}, tasks batched") or rate(f"Leap T={T}, tasks batched in shards")
        leap, reptile = rate(f"Leap T={T}"), rate(f"Reptile T={T}")
        cost = f"{reptile / leap - 1:+.1%} {'met' if reptile / leap <= 1.05 else 'NOT met'}" if leap and reptile else "-"
        references = []
        for prefix in ("", "AVX2 only: ") if kernels != "on" else ("",):
            torch = {name: r for name, r in median.items() if name.startswith(prefix + "PyTorch")}
            if torch:
                references.append((prefix + "PyTorch NCHW", torch.get(prefix + "PyTorch NCHW")))
                fastest = max(torch, key=torch.get)
                references.append((f"fastest: {fastest}", torch[fastest]))
        for reference, base in references or [("no PyTorch", None)]:
            def cell(value, goal):
                if not (base and value):
                    return "-"
                return f"{value / base:.2f} {'met' if value / base >= goal else 'NOT met'}"

            cells = [cell(rate(name), goal) for name, goal in goals]
            print(f"| {label} | {reference} | {' | '.join(cells)} | {cost} | {cell(batched, 1.5)} |")


def _thread_env(intra, inter):
    return {"TF_NUM_INTRAOP_THREADS": str(intra), "TF_NUM_INTEROP_THREADS": str(inter)}


GRAPPLER_PASSES = ("remapping", "layout_optimizer", "arithmetic_optimization", "constant_folding",
                   "loop_optimization", "dependency_optimization")


def _setting_groups(group, kernels, T):
    """One kernel set's workers of a `settings` group: `(label, env, runs[, spec])`.

    The first worker is that kernel set's default, the others change one setting.
    """
    name, base = KERNEL_NAMES[kernels], KERNELS[kernels]
    fused = ("fused loop", "fused", {})
    leap = (f"Leap T={T}", "meta", {"learner": "leap", "tasks": T})
    if group == "threads":
        return [
            (f"{name}, intra {intra} inter {inter}", {**base, **_thread_env(intra, inter)},
             [fused, leap, (f"Reptile T={T}", "meta", {"learner": "reptile", "tasks": T})])
            for intra, inter in ((2, 2), (1, 1), (1, 2), (2, 1))
        ]
    if group == "model":
        return [(name, base, [
            fused,
            ("fused loop, fused BatchNorm", "fused", {"model": "fused_bn"}),
            ("fused loop, BatchNorm before MaxPool", "fused", {"model": "bn_pool"}),
            ("fused loop, NCHW (channels_first)", "fused", {"model": "channels_first"}),
            ("fused loop, MaxPool gradient not inlined", "fused", {"model": "noinline_pool"}),
            leap,
            (f"Leap T={T}, fused BatchNorm", "meta", {"learner": "leap", "tasks": T, "model": "fused_bn"}),
            (f"Leap T={T}, MaxPool gradient not inlined", "meta",
             {"learner": "leap", "tasks": T, "model": "noinline_pool"}),
            (f"Leap T={T}, tasks batched", "meta", {"learner": "leap", "tasks": T, **BATCHED_OPTION}),
        ])]
    if group == "grappler":
        return [(name, base, [fused, leap])] + [
            (f"{name}, Grappler {option} off", base, [fused, leap], {"grappler": {option: False}})
            for option in GRAPPLER_PASSES
        ] + [(f"{name}, Grappler off", base, [fused, leap], {"grappler": {"disable_meta_optimizer": True}})]
    if group == "t1":
        leap1 = {"learner": "leap", "tasks": 1}
        return [(name, base, [
            fused,
            ("Leap T=1", "meta", leap1),
            ("Reptile T=1", "meta", {"learner": "reptile", "tasks": 1}),
            ("Leap T=1, one chunk per trajectory", "meta", {**leap1, "chunk": "inner_steps"}),
            ("Leap T=1, inner_unroll=2", "meta", {**leap1, "inner_unroll": 2}),
            ("Leap T=1, tasks batched", "meta", {**leap1, **BATCHED_OPTION}),
        ])]
    return [  # xla
        (name, base, [fused, ("fused loop, XLA (jit_compile=True)", "fused", {"jit_compile": True})]),
        (f"{name}, XLA auto-clustering (TF_XLA_FLAGS)",
         {**base, "TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"}, [fused]),
    ]


SETTING_GROUPS = ("threads", "model", "grappler", "xla", "t1")


def settings(args):
    """TensorFlow settings, each fixed before TensorFlow starts (its own worker), alternating.

    Ratios to the first kernel set's default fused loop, and of every run to
    the same run under its kernel set's default (each default: to the first
    kernel set's); plain PyTorch (NCHW, 2 threads) runs in the same rounds.
    """
    tf_groups, reference = [], {}
    for kernels in args.kernels:
        own = _setting_groups(args.group, kernels, args.tasks)
        # Each run against the same run without its setting: the run named before the first
        # comma in the kernel set's first worker; a default against the first kernel set's.
        for label, _, runs, *_ in own:
            for name, *_ in runs:
                row, default = f"{label}: {name}", f"{own[0][0]}: {name.split(',')[0]}"
                if row == default:
                    default = f"{tf_groups[0][0]}: {name}" if tf_groups else None
                reference[row] = default
        tf_groups += own
    title = (
        f"TensorFlow settings ({args.group}), steps/s of the runs of `pytorch` ({args.filters} "
        f"filters, batch {BATCH}, {args.steps} steps per task per call, K = {args.inner_steps}), "
        f"each setting in its own process, {args.repeats} alternating rounds (medians). "
        "'/ default': per-round ratio to the same run without the setting, same kernel set "
        "(for a kernel set's default: to the first kernel set's)."
    )
    groups = _torch_groups(args, variants=False) + tf_groups
    return _measure(groups, args, f"{tf_groups[0][0]}: fused loop", title, reference=reference)


# `pytorch --smoke` / `settings --smoke`: every row, tiny sizes, in well under a minute of compute.
TORCH_SMOKE = dict(steps=4, inner_steps=4, chunk=2, filters=4, blocks=1, repeats=2, kernels=["on"])
TORCH_FULL = dict(steps=100, inner_steps=100, chunk=10, filters=64, blocks=4, repeats=8, kernels=["on", "off"])


def run(argv):
    """The command line `argv`; errors propagate (`main` reports them)."""
    if argv[:1] == ["_graph_probe"]:
        _graph_probe(int(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    if argv[:1] == ["_worker"]:
        _worker(json.loads(argv[1]))
        return 0
    count = errors.at_least(1)
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inner", help="inner-loop throughput vs fit and a fused loop")
    p.add_argument("--tasks", type=count, default=4)
    p.add_argument("--steps", type=count, default=300)
    p.add_argument("--repeats", type=count, default=5)
    p.add_argument("--filters", type=count, default=64)
    p = sub.add_parser("graph", help="graph-build time and memory, K long vs short")
    p.add_argument("--short", type=count, default=10)
    p.add_argument("--long", type=count, default=1000)
    p.add_argument("--chunk", type=count, default=10)
    p.add_argument("--repeats", type=count, default=3)
    p.add_argument("--filters", type=count, default=64)
    sub.add_parser("fisher", help="Fisher diagonal vs one training epoch", add_help=False)
    p = sub.add_parser("finetune", help="tfmeta.finetune: many steps per execution vs one")
    p.add_argument("--steps", type=count, default=1000)
    p.add_argument("--repeats", "--rounds", type=count, dest="repeats", default=5)
    for name, helptext in (
        ("replicas", "1 vs 2 replicas (logical CPUs without GPUs) and XLA on/off"),
        ("jit", "XLA (jit_compile) on vs off on one device"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--learner", default="leap", choices=LEARNERS)
        p.add_argument("--tasks", type=count, default=4)
        p.add_argument("--steps", type=count, default=100)
        p.add_argument("--chunk", type=count, default=10)
        p.add_argument("--repeats", type=count, default=3)
        p.add_argument("--filters", type=count, default=32)
        if name == "replicas":
            p.add_argument("--no_jit", action="store_true", help="skip the XLA run")
    p = sub.add_parser("gpu", help="per learner and T: XLA on/off, 1 vs all GPUs, vs Keras fit")
    p.add_argument("--smoke", action="store_true",
                   help=f"small: T in {SMOKE['tasks']}, {SMOKE['steps']} steps, {SMOKE['blocks']} "
                        f"block of {SMOKE['filters']} filters, {SMOKE['repeats']} repeats")
    p.add_argument("--tasks", type=count, nargs="+", help="T values (default 4 16 64)")
    p.add_argument("--steps", type=count, help="inner steps per task per call (default 100)")
    p.add_argument("--chunk", type=count, default=10)
    p.add_argument("--repeats", type=count, help="default 3")
    p.add_argument("--filters", type=count, help="default 64")
    p.add_argument("--blocks", type=count, help="convnet blocks (default 4, Leap's)")
    for name, helptext in (
        ("pytorch", "plain PyTorch next to plain TensorFlow, Keras fit and tfmeta (issue 15)"),
        ("settings", "TensorFlow settings (oneDNN, thread pools, XLA, BatchNorm, layout) per process"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--smoke", action="store_true", help=f"tiny sizes, to check it runs: {TORCH_SMOKE}")
        p.add_argument("--tasks", type=count, default=4, help="T (default 4)")
        p.add_argument("--steps", type=count, help="steps per task per call (default 100 = K)")
        p.add_argument("--inner_steps", type=count, help="K (default 100)")
        p.add_argument("--chunk", type=count, help="inner steps per train step (default 10)")
        p.add_argument("--filters", type=count, help="default 64")
        p.add_argument("--blocks", type=count, help="convnet blocks (default 4, Leap's)")
        p.add_argument("--repeats", "--rounds", type=count, dest="repeats", help="alternating rounds (default 8)")
        p.add_argument("--kernels", nargs="+", choices=list(KERNELS),
                       help="TensorFlow workers: oneDNN on (TF_ENABLE_ONEDNN_OPTS=1), off (=0), avx2 "
                            "(on, ONEDNN_MAX_CPU_ISA=AVX2; adds PyTorch capped at AVX2) (default: on off)")
        p.add_argument("--no_torch", action="store_true",
                       help="behave as if PyTorch were not installed (its rows are skipped)")
        if name == "pytorch":
            p.add_argument("--batched", choices=("auto", "on", "off"), default="auto",
                           help="the Leap row with the tasks batched (compile option "
                                f"{BATCHED_OPTION}); auto: once tfmeta/inner_loop.py uses task_batched")
            p.add_argument("--one_thread", action="store_true",
                           help="per kernel set, a second TensorFlow worker with one thread per "
                                "op (TF_NUM_INTRAOP_THREADS=1, TF_NUM_INTEROP_THREADS=2), which "
                                "also runs the tasks batched in one shard per core")
        else:
            p.add_argument("--group", choices=SETTING_GROUPS, default="threads",
                           help="threads: intra/inter-op pools (default); model: fused BatchNorm, "
                                "pooling order, NCHW; grappler: each Grappler pass off; xla: "
                                "jit_compile and auto-clustering (slow on CPU: use --steps 10); "
                                "t1: where tfmeta's time goes at T = 1")
    args, rest = parser.parse_known_args(argv)
    if args.command in ("pytorch", "settings"):
        for key, value in (TORCH_SMOKE if args.smoke else TORCH_FULL).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.command == "gpu":
        sizes = SMOKE if args.smoke else dict(tasks=(4, 16, 64), steps=100, repeats=3, filters=64,
                                              blocks=4)
        for key, value in sizes.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.command in ("replicas", "gpu"):
        import tensorflow as tf

        from tfmeta import distribute

        # before TensorFlow initializes its devices
        if len(tf.config.list_physical_devices("GPU")) < (2 if args.command == "replicas" else 1):
            distribute.use_logical_cpus(2)
    if args.command == "fisher":
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        import bench_fisher

        return bench_fisher.run(rest)
    commands = {"inner": inner, "graph": graph, "replicas": replicas, "jit": jit, "gpu": gpu,
                "pytorch": pytorch, "settings": settings, "finetune": finetune_calls}
    commands[args.command](args)
    return 0


def main(argv=None):
    """Bad input: one line on stderr, exit code 2; Ctrl-C: one line, 130 (tfmeta.cli.errors)."""
    return errors.run_tool(PROG, run, argv, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
