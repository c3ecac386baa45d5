#!/usr/bin/env python
"""Leap's Omniglot experiment at a size a 2-core CPU runs in under an hour.

    python tools/leap_omniglot.py [--alphabets 5 20] [--seeds 0 1 2]
                                  [--meta_updates 80] [--filters 16] [--inner_steps 50]
                                  [--output_dir runs/leap_omniglot]

For each number of pretraining alphabets and seed: meta-train Leap, Reptile
and FOMAML (gin/{leap,reptile,fomaml}_omniglot.gin with the overrides below),
pretrain the multi-headed fine-tuning baseline, and fine-tune every
initialization and a random one (no pretraining) on the 10 held-out
alphabets for 100 steps. Prints the Markdown table of docs/results.md
(training-loss AUC and held-out test error, mean +- std over seeds) and
writes results.json.
"""

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
LEARNERS = ("leap", "reptile", "fomaml")
METHODS = (*LEARNERS, "multi-headed", "no pretraining")


def run(args):
    import gin
    import keras
    import numpy as np

    import tfmeta.configurables  # noqa: F401
    from tfmeta import atomic
    from tfmeta.baselines import multihead_pretraining
    from tfmeta.cli.train import train
    from tfmeta.evaluation import heldout_finetuning
    from tfmeta.models import convnet
    from tfmeta.tasks import omniglot_alphabets

    out = pathlib.Path(args.output_dir)
    records = []
    for alphabets in args.alphabets:
        for seed in args.seeds:
            bindings = [
                f"omniglot_alphabets.num_pretrain = {alphabets}",
                f"omniglot_alphabets.seed = {seed}",
                f"convnet.filters = {args.filters}",
                f"train.meta_updates = {args.meta_updates}",
                f"train.inner_steps = {args.inner_steps}",
                f"train.tasks_per_batch = {min(args.tasks_per_batch, alphabets)}",
                "train.epochs = 1",
                f"train.seed = {seed}",
                "train.evaluation = None",
                "train.overwrite = True",
                "train.verbose = 0",
            ]
            _, heldout = omniglot_alphabets(num_pretrain=alphabets, seed=seed)
            evaluate = lambda model: heldout_finetuning(  # noqa: E731
                model, None, heldout, steps=100, learning_rate=0.1, batch_size=20, seed=seed
            )["meta-learned"]
            for learner in [m for m in LEARNERS if m in args.methods]:
                gin.clear_config()
                gin.parse_config_files_and_bindings([str(REPO / "gin" / f"{learner}_omniglot.gin")], bindings)
                began = time.perf_counter()
                result = train(out / f"{learner}_a{alphabets}_s{seed}")
                model = keras.models.load_model(pathlib.Path(result["export"]) / "model.keras")
                records.append({"method": learner, "alphabets": alphabets, "seed": seed,
                                "seconds": time.perf_counter() - began, **evaluate(model)})
                print(json.dumps(records[-1]), flush=True)
            keras.utils.set_random_seed(seed)
            random_init = convnet(20, filters=args.filters)
            pretrain, _ = omniglot_alphabets(num_pretrain=alphabets, seed=seed)
            if "multi-headed" in args.methods:
                began = time.perf_counter()
                # As many task-steps as one meta-learner's run: meta_updates x K
                # steps of tasks_per_batch tasks each.
                tasks_per_step = min(args.tasks_per_batch, alphabets)
                multihead = multihead_pretraining(
                    random_init, pretrain, steps=args.meta_updates * args.inner_steps,
                    tasks_per_step=tasks_per_step, batch_size=20, learning_rate=0.1, seed=seed,
                )
                records.append({"method": "multi-headed", "alphabets": alphabets, "seed": seed,
                                "seconds": time.perf_counter() - began, **evaluate(multihead)})
                print(json.dumps(records[-1]), flush=True)
            if "no pretraining" in args.methods:
                records.append({"method": "no pretraining", "alphabets": alphabets, "seed": seed,
                                "seconds": 0.0, **evaluate(random_init)})
                print(json.dumps(records[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    if args.append and results.exists():
        kept = [r for r in json.loads(results.read_text()) if r["method"] not in args.methods]
        records = kept + records
    atomic.write_text(results, json.dumps(records, indent=2))
    print()
    print(table(records, np))


def table(records, np):
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    sizes = sorted({r["alphabets"] for r in records})
    lines = [
        "| method | " + " | ".join(f"loss AUC, {a} alphabets | test error, {a} alphabets" for a in sizes) + " |",
        "|---" * (1 + 2 * len(sizes)) + "|",
    ]
    for method in methods:
        cells = []
        for a in sizes:
            rows = [r for r in records if r["method"] == method and r["alphabets"] == a]
            auc = np.array([r["loss_auc"] for r in rows])
            err = np.array([r["test_error"] for r in rows])
            cells += [f"{auc.mean():.3f} ± {auc.std():.3f}", f"{err.mean():.3f} ± {err.std():.3f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alphabets", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--meta_updates", type=int, default=80)
    parser.add_argument("--inner_steps", type=int, default=50)
    parser.add_argument("--tasks_per_batch", type=int, default=5)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--append", action="store_true",
                        help="replace only these methods' records in an existing results.json")
    parser.add_argument("--output_dir", default="runs/leap_omniglot")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
