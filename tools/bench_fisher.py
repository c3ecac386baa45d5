"""Benchmark: diagonal Fisher over N examples vs one training epoch on N.

On a small convnet (28x28x1 -> Conv2D(16) -> MaxPool -> Conv2D(32) -> MaxPool
-> Dense(10) logits), times in one process

* ``tfmeta.complexity.diagonal_fisher`` over N examples (labels sampled from
  the model, per-parameter standard errors on: the defaults), and
* one epoch of ``model.fit`` on the same N examples, same model, batch 32
  (default Keras compile, SGD),

after warming both up (tracing excluded), repeated ``--repeats`` times, and
prints the medians and their ratio (goal: <= 2). Inputs are random normal:
this measures speed only. ``--path per_example`` times the row-by-row path
that models with grouped convolutions take (``tfmeta.complexity.per_example``).

    PYTHONPATH=. python tools/bench_fisher.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tfmeta.cli import errors  # noqa: E402

PROG = "bench_fisher.py"


def build_convnet(keras, num_classes=10):
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(num_classes),
        ]
    )


def run(argv):
    """The command line `argv` (also `tools/bench.py fisher`); errors propagate (`main` reports them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=errors.at_least(1), default=2048, help="N")
    parser.add_argument("--batch-size", type=errors.at_least(1), default=32,
                        help="fit batch size and Fisher chunk size")
    parser.add_argument("--repeats", type=errors.at_least(1), default=5)
    parser.add_argument("--label-samples", type=errors.at_least(1), default=1)
    parser.add_argument("--no-stderr", action="store_true",
                        help="skip per-parameter standard errors")
    parser.add_argument("--exact", action="store_true",
                        help="exact expectation over labels (10x the rows)")
    parser.add_argument("--path", choices=("auto", "vectorized", "per_example"), default="auto",
                        help="per-example gradient path of diagonal_fisher (auto: the rule)")
    parser.add_argument("--jit-compile", default="auto", type=str.lower, choices=("auto", "true", "false"),
                        help="model.compile jit_compile for the epoch")
    parser.add_argument("--seed", type=errors.at_least(0), default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON line too")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from tfmeta.complexity import diagonal_fisher

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.examples, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=args.examples).astype("int32")
    model = build_convnet(keras)
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )

    def fisher():
        return diagonal_fisher(
            model, (x, y), batch_size=args.batch_size,
            label_samples=args.label_samples, exact=args.exact,
            per_parameter_stderr=not args.no_stderr, seed=args.seed, path=args.path,
        )

    def epoch():
        model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, shuffle=True)

    # Warm-up: traces (and XLA compilation) happen here, not in the timings.
    fisher()
    epoch()
    fisher_times, epoch_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fisher()
        fisher_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        epoch()
        epoch_times.append(time.perf_counter() - t0)
    f_med = statistics.median(fisher_times)
    e_med = statistics.median(epoch_times)
    ratio = f_med / e_med
    print(f"model: {model.count_params()} parameters, N={args.examples}, "
          f"batch={args.batch_size}, repeats={args.repeats}, path={fisher().path}")
    print(f"diagonal_fisher: median {f_med:.3f} s  ({', '.join(f'{t:.3f}' for t in fisher_times)})")
    print(f"fit epoch:       median {e_med:.3f} s  ({', '.join(f'{t:.3f}' for t in epoch_times)})")
    print(f"ratio fisher/epoch: {ratio:.2f}  (goal <= 2)")
    result = {"fisher_s": f_med, "epoch_s": e_med, "ratio": ratio,
              "examples": args.examples, "batch_size": args.batch_size, "path": args.path,
              "params": int(model.count_params())}
    if args.json:
        print(json.dumps(result))
    return 0


def main(argv=None):
    """Bad input: one line on stderr, exit code 2; Ctrl-C: one line, 130 (tfmeta.cli.errors)."""
    return errors.run_tool(PROG, run, argv, script=__file__)


if __name__ == "__main__":
    sys.exit(main())
