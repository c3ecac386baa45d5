#!/usr/bin/env python
"""Benchmarks, measured side by side in one run (medians and ratios).

    python tools/bench.py inner   [--tasks 4] [--steps 300] [--repeats 5] [--filters 64]
    python tools/bench.py graph   [--short 10] [--long 1000]
    python tools/bench.py fisher  (see tools/bench_fisher.py)
    python tools/bench.py replicas [--learner leap] [--tasks 4] [--steps 100] [--no_jit]
    python tools/bench.py jit      [--learner leap] [--tasks 4] [--steps 100]
    python tools/bench.py gpu      [--smoke] [--tasks 4 16 64] [--steps 100] [--filters 64]

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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def _medians(runs, steps, repeats):
    """Median steps/s of every run over interleaved repeats (`steps[name]` per call).

    Interleaving lets load changes hit every candidate alike.
    """
    rates = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(_median_rate(run, steps[name], 1))
    return {name: statistics.median(r) for name, r in rates.items()}


def bench_fit(steps, filters, jit_compile="auto", blocks=4):
    """Plain Keras: `model.fit` with one step per call of the train function."""
    import keras
    import tensorflow as tf

    from tfmeta.input_options import without_autotuning
    from tfmeta.models import convnet

    model = convnet(CLASSES, filters=filters, blocks=blocks)
    model.compile(keras.optimizers.SGD(0.1), _loss(), jit_compile=jit_compile)
    x, y = _data(BATCH * 64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True).repeat()
    # As tfmeta's own fit does: no autotuning, so no stall at the end of each call.
    ds = without_autotuning(ds)
    model.fit(ds, steps_per_epoch=20, verbose=0, shuffle=False)  # trace and warm up
    return lambda: model.fit(ds, steps_per_epoch=steps, verbose=0, shuffle=False)


def bench_fused(steps, filters):
    """A hand-written tf.function that runs `steps` plain training steps in one call."""
    import keras
    import tensorflow as tf

    from tfmeta.models import convnet

    model = convnet(CLASSES, filters=filters)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    loss_fn = _loss()
    x, y = _data(BATCH * 64)
    x, y = tf.constant(x.reshape(64, BATCH, 28, 28, 1)), tf.constant(y.reshape(64, BATCH))

    @tf.function
    def train(n):
        def body(i, total):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i % 64], model(x[i % 64], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return i + 1, total + loss

        return tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), tf.constant(0.0)))[1]

    train(tf.constant(20))
    return lambda: train(tf.constant(steps)).numpy()


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
               blocks=4):
    """MetaModel.fit under `strategy`: one call runs `steps` inner steps of every task."""
    import keras
    import tensorflow as tf

    import tfmeta
    from tfmeta.models import convnet

    calls = max(1, steps // chunk)
    with strategy.scope():
        model = convnet(CLASSES, filters=filters, blocks=blocks)
        meta = tfmeta.MetaModel(model)
        meta.compile(
            optimizer=keras.optimizers.SGD(0.1),
            inner_optimizer=keras.optimizers.SGD(0.1),
            loss=_loss(),
            learner=learner,
            inner_steps=inner_steps,
            steps_per_execution=calls,
            jit_compile=jit_compile,
        )
    x, y = _data(tasks * chunk * BATCH)
    ds = tf.data.Dataset.from_tensors(
        (x.reshape(tasks, chunk, BATCH, 28, 28, 1), y.reshape(tasks, chunk, BATCH))
    ).repeat()
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


def _compare(runs, args, baseline):
    """Interleaved repeats of every run; median inner steps/s and ratio to `baseline`."""
    median = _medians(runs, dict.fromkeys(runs, args.steps * args.tasks), args.repeats)
    print("| run | inner steps/s | ratio | first call (trace + compile), s |")
    print("|---|---|---|---|")
    for name, rate in median.items():
        print(
            f"| {name} | {rate:.0f} | {rate / median[baseline]:.2f} | "
            f"{runs[name].build_seconds:.1f} |"
        )
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


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_graph_probe":
        _graph_probe(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inner", help="inner-loop throughput vs fit and a fused loop")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--filters", type=int, default=64)
    p = sub.add_parser("graph", help="graph-build time and memory, K long vs short")
    p.add_argument("--short", type=int, default=10)
    p.add_argument("--long", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--filters", type=int, default=64)
    sub.add_parser("fisher", help="Fisher diagonal vs one training epoch", add_help=False)
    for name, helptext in (
        ("replicas", "1 vs 2 replicas (logical CPUs without GPUs) and XLA on/off"),
        ("jit", "XLA (jit_compile) on vs off on one device"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--learner", default="leap", choices=LEARNERS)
        p.add_argument("--tasks", type=int, default=4)
        p.add_argument("--steps", type=int, default=100)
        p.add_argument("--chunk", type=int, default=10)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--filters", type=int, default=32)
        if name == "replicas":
            p.add_argument("--no_jit", action="store_true", help="skip the XLA run")
    p = sub.add_parser("gpu", help="per learner and T: XLA on/off, 1 vs all GPUs, vs Keras fit")
    p.add_argument("--smoke", action="store_true",
                   help=f"small: T in {SMOKE['tasks']}, {SMOKE['steps']} steps, {SMOKE['blocks']} "
                        f"block of {SMOKE['filters']} filters, {SMOKE['repeats']} repeats")
    p.add_argument("--tasks", type=int, nargs="+", help="T values (default 4 16 64)")
    p.add_argument("--steps", type=int, help="inner steps per task per call (default 100)")
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--repeats", type=int, help="default 3")
    p.add_argument("--filters", type=int, help="default 64")
    p.add_argument("--blocks", type=int, help="convnet blocks (default 4, Leap's)")
    args, rest = parser.parse_known_args(argv)
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

        return bench_fisher.main(rest)
    {"inner": inner, "graph": graph, "replicas": replicas, "jit": jit, "gpu": gpu}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
