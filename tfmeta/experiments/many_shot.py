"""Many-shot meta-learning across heterogeneous datasets (issue 11; the CTS paper's large-scale experiment).

Meta-train an initialization on whole-dataset source tasks
(`tfmeta.tasks.domains`), each trajectory K = 1000 inner steps long, then
meta-test it on target datasets, two of them from a dataset none of whose
tasks is a source, by fine-tuning the whole network with a fresh head
(SGD with Nesterov momentum, step-decayed learning rate) and reporting the
training-loss AUC and final test accuracy per target. Every method spends
the same budget of inner steps (task-steps: T tasks x inner steps each):

- meta-learners (`kind="meta"`): a `MetaModel` with one head per source
  (`TaskHeads`, left out of meta-learning) and the method's learner and
  outer optimizer; CTS, CTS without shifting, Reptile, Leap, FOMAML;
- `kind="multitask"`: `tfmeta.multitask.MultiTaskModel`, T tasks per step
  with the inner optimizer, as many steps as a meta-learner's task slots
  take inner steps;
- `kind="none"`: no pretraining (the seed's random initialization, which
  every other method of that seed starts from).

Each method x seed is evaluated at `checkpoints` evenly spaced points of its
budget (the meta-convergence curve), each checkpoint fine-tuned at one or
more learning rates (`finetune_lrs`: several only to choose the rate on the
source-only validation split). A finished cell (method x seed x checkpoint
x fine-tuning rate) goes to `results.json` at once (atomically, a
`CellStore`) with the settings it was computed with (and, as a record
that resume does not compare, the CPU, kernels and threads it was
computed on: `CellStore` adds `machine.describe()`), and `resume=True` skips
finished cells: a method x seed whose cells are all there is not trained
again, one with some missing is meta-trained again from its seed
(deterministic streams) and evaluated only where cells are missing; a
finished cell computed with other settings is a `ConfigError` naming them.
A results.json of the older layout (one settings dict for all cells) is
read by `load_results` and converted in place on `resume`.

Run it with `python tools/many_shot.py` (gin/many_shot_*.gin, one per method).

Example::

    bench = Benchmark(inner_steps=20, budget=40, checkpoints=2, finetune_steps=20)
    methods = [Method("reptile", learner=Reptile, meta_optimizer=lambda: SGD(1.0)),
               Method("no pretraining", kind="none")]
    results = run(bench, methods, seeds=[0], output_dir="runs/many_shot_tiny")
    print(table(results))
    rates = run(bench, methods, seeds=[0], output_dir="runs/many_shot_tiny_lr",
                finetune_lrs=(0.1, 0.01))   # one meta-training, two fine-tuning rates
    print(rate_table(rates), best_finetune_lr(rates))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Callable, Optional, Sequence

import keras
import numpy as np

from tfmeta import atomic
from tfmeta.experiments.complexity_run import CellStore
from tfmeta.finetune import Finetuner, random_initialization
from tfmeta.heads import with_new_head
from tfmeta.meta_model import MetaModel
from tfmeta.models import convnet
from tfmeta.multitask import MultiTaskModel
from tfmeta.replicas import execution_size
from tfmeta.task_heads import TaskHeads
from tfmeta.tasks.domains import load_task, task_family
from tfmeta.validation import ConfigError, check_positive_int

__all__ = [
    "Benchmark",
    "EXPERIMENT",
    "FINETUNE_LR_GRID",
    "HELD_OUT_DATASETS",
    "KINDS",
    "Method",
    "SOURCES",
    "TARGETS",
    "VALIDATION_SOURCES",
    "VALIDATION_TARGETS",
    "at_rates",
    "best_finetune_lr",
    "cell_key",
    "cell_settings",
    "check_settings",
    "claims",
    "convergence",
    "finetune_rates",
    "incomplete",
    "load_results",
    "plot_convergence",
    "rate_table",
    "rates_of",
    "run",
    "split_datasets",
    "table",
]

#: Meta-training sources: MNIST and three transforms of it, four Omniglot
#: background groups (387 characters of 12 alphabets).
SOURCES = (
    "mnist", "mnist/inverted", "mnist/rot90", "mnist/blur",
    "omniglot/background_a", "omniglot/background_b", "omniglot/background_c",
    "omniglot/background_d",
)
#: Meta-test targets: Fashion-MNIST and scikit-learn's digits are datasets
#: none of whose tasks is a source; Omniglot's evaluation alphabets are new
#: alphabets; mnist/contrast a new transform of a source dataset.
TARGETS = (
    "fashion_mnist", "fashion_mnist/rot90", "digits", "omniglot/evaluation_a", "mnist/contrast",
)
#: The datasets held out whole (no task of theirs among the sources).
HELD_OUT_DATASETS = ("fashion_mnist", "digits")
#: Hyperparameters are chosen on sources only: meta-train on these six ...
VALIDATION_SOURCES = SOURCES[:3] + SOURCES[4:7]
#: ... and meta-test on these two other sources (never on TARGETS).
VALIDATION_TARGETS = ("mnist/blur", "omniglot/background_d")

KINDS = ("meta", "multitask", "none")
#: The fine-tuning learning rates the source-only validation chooses among
#: (`tools/many_shot.py --validation --finetune_lrs 0.1 0.03 0.01`): the
#: paper's 0.1 and two lower ones.
FINETUNE_LR_GRID = (0.1, 0.03, 0.01)


def split_datasets(names):
    """The source datasets of task names: `"mnist/rot90"` -> `"mnist"`, `"omniglot/background_a"` -> `"omniglot"`.

    Example::

        split_datasets(["mnist/rot90", "digits"])   # {"mnist", "digits"}
    """
    return {name.split("/")[0] for name in names}


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
        name: its label in results and figures.
        kind: `"meta"` (a meta-learner), `"multitask"` (multi-task
            pretraining) or `"none"` (no pretraining).
        learner: for `"meta"`, a factory of the `tfmeta` learner
            (e.g. `Reptile`, or gin's `@ContinualTrajectoryShifting`).
        meta_optimizer: for `"meta"`, a factory of the outer optimizer.

    Example::

        Method("leap", learner=Leap, meta_optimizer=lambda: keras.optimizers.SGD(0.1))
    """

    name: str
    kind: str = "meta"
    learner: Optional[Callable] = None
    meta_optimizer: Optional[Callable] = None

    def describe(self):
        """The learner and outer optimizer as text, for results.json."""
        if self.kind != "meta":
            return self.kind
        optimizer = self.meta_optimizer().get_config()
        return f"{self.learner()!r}, outer {type(self.meta_optimizer()).__name__}(" + ", ".join(
            f"{k}={optimizer[k]!r}" for k in ("learning_rate", "momentum") if k in optimizer) + ")"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"Method(kind={self.kind!r}) is not a kind: choose one of {KINDS}.")
        if self.kind == "meta" and (self.learner is None or self.meta_optimizer is None):
            raise ConfigError(
                f"Method({self.name!r}, kind='meta') needs a learner and a meta_optimizer "
                "factory, e.g. learner=@Reptile, meta_optimizer=@meta/SGD in gin."
            )


def _default_inner_optimizer():
    return keras.optimizers.SGD(0.01, momentum=0.9, weight_decay=5e-4)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """The shared setting of every method (gin/many_shot.gin binds it).

    Attributes:
        sources, targets: task names (`tfmeta.tasks.domains.NAMES`).
        filters, blocks: the convnet (`tfmeta.models.convnet`, BatchNorm).
        inner_steps: K, the length of every inner trajectory.
        tasks_per_batch: T, tasks per meta-batch (and per multi-task step).
        batch_size: examples per task per inner step.
        budget: inner steps per task slot (a multiple of K x checkpoints);
            every method spends `T * budget` task-steps.
        checkpoints: evaluations along the budget (evenly spaced).
        inner_optimizer: factory of the inner optimizer (also multi-task
            pretraining's optimizer).
        steps_per_chunk: inner steps per Keras execution (it must divide
            budget / checkpoints); a meta-learner's task batches hold its
            gcd with the learner's meta-update period (CTS with `every=1`: 1).
        finetune_steps, finetune_lr, finetune_decay, finetune_milestones,
        finetune_weight_decay, finetune_batch_size: meta-test, SGD with
            Nesterov momentum 0.9 whose rate is multiplied by `finetune_decay`
            at each milestone (fractions of the steps).
        finetune_examples: training images per target (a seeded subset;
            the CTS paper's Table 1 uses 1000); None: the whole train split.
        test_examples: test images per target (the first ones); None: all.

    Example::

        Benchmark(inner_steps=100, budget=600, checkpoints=3)
    """

    sources: Sequence[str] = SOURCES
    targets: Sequence[str] = TARGETS
    filters: int = 16
    blocks: int = 4
    inner_steps: int = 1000
    tasks_per_batch: int = 4
    batch_size: int = 32
    budget: int = 12000
    checkpoints: int = 3
    inner_optimizer: Callable = _default_inner_optimizer
    steps_per_chunk: int = 10
    finetune_steps: int = 1000
    finetune_lr: float = 0.1
    finetune_decay: float = 0.2
    finetune_milestones: Sequence[float] = (0.4, 0.7, 0.9)
    finetune_weight_decay: float = 5e-4
    finetune_batch_size: int = 32
    finetune_examples: Optional[int] = 1000
    test_examples: Optional[int] = None

    def __post_init__(self):
        if set(self.sources) & set(self.targets):
            raise ConfigError(
                f"Benchmark: tasks {sorted(set(self.sources) & set(self.targets))} are both "
                "sources and targets: a target must be a task meta-training never sees."
            )
        if self.budget % (self.inner_steps * self.checkpoints):
            raise ConfigError(
                f"Benchmark(budget={self.budget}) must be a multiple of inner_steps x "
                f"checkpoints = {self.inner_steps * self.checkpoints}, so that every "
                "checkpoint ends on a Reptile/Leap/FOMAML meta-update."
            )
        # Training runs in Keras executions of steps_per_chunk inner steps (a
        # meta-learner's task batches of steps_per_chunk_of steps, or as many
        # multi-task steps): an evaluation must fall between two of them, or
        # fit stops with tfmeta.replicas.check_whole_executions after setup.
        chunk = check_positive_int("Benchmark.steps_per_chunk", self.steps_per_chunk)
        per = self.budget // self.checkpoints
        if per % chunk:
            raise ConfigError(
                f"Benchmark(steps_per_chunk={chunk}) does not divide the {per} inner steps "
                f"between evaluations (budget / checkpoints = {self.budget} / "
                f"{self.checkpoints}): training runs in Keras executions of {chunk} inner "
                f"steps, so an evaluation would fall inside one. Choose steps_per_chunk "
                f"dividing {per} (e.g. {execution_size(per, chunk)}), "
                f"or budget a multiple of "
                f"checkpoints x lcm(inner_steps, steps_per_chunk) = "
                f"{self.checkpoints * math.lcm(self.inner_steps, chunk)}."
            )

    @property
    def task_steps(self):
        """The budget in task-steps: T tasks x `budget` inner steps each."""
        return self.tasks_per_batch * self.budget

    def checkpoint_steps(self):
        """Inner steps per task slot at each evaluation: budget/C, 2 budget/C, ..., budget."""
        every = self.budget // self.checkpoints
        return [every * (i + 1) for i in range(self.checkpoints)]

    def to_dict(self):
        """The JSON-able settings (factories by their optimizer config)."""
        settings = dataclasses.asdict(self)
        optimizer = self.inner_optimizer().get_config()
        optimizer.pop("name")  # numbered per instance by Keras
        settings["inner_optimizer"] = optimizer
        settings["sources"], settings["targets"] = list(self.sources), list(self.targets)
        settings["finetune_milestones"] = list(self.finetune_milestones)
        return settings


#: The `"experiment"` of a many-shot results.json (a `CellStore`).
EXPERIMENT = "many_shot"
#: Settings that are a method's own: the cells of one results.json may differ
#: in these (each method has its learner, outer rate and fine-tuning rate), and
#: must agree on every other (one benchmark per file).
PER_METHOD = ("method", "kind", "config", "finetune_lr")


def cell_key(method, seed, inner_steps, finetune_lr):
    """The results.json key of one cell, e.g. `cell_key("cts", 0, 4000, 0.03)` -> `"cts/seed0/4000/lr0.03"`."""
    return f"{method}/seed{seed}/{inner_steps}/{_rate_label(finetune_lr)}"


def _rate_label(rate):
    # 6 significant digits: the keys of every results.json so far (lr0.1, lr0.03).
    return f"lr{rate:g}"


def cell_settings(bench, method):
    """Everything a cell's numbers depend on, JSON-normalised: `bench.to_dict()` and the method.

    Example::

        cell_settings(Benchmark(), Method("no pretraining", kind="none"))["finetune_lr"]   # 0.1
    """
    settings = {**bench.to_dict(), "method": method.name, "kind": method.kind, "config": method.describe()}
    return json.loads(json.dumps(settings))


# ------------------------------------------------------------- training
def initial_model(bench, num_classes, seed):
    """The seed's random initialization (every method of the seed starts from it)."""
    keras.utils.set_random_seed(seed)
    return convnet(num_classes, filters=bench.filters, blocks=bench.blocks)


def chunks_per_checkpoint(bench, steps_per_chunk):
    """Task batches (train steps) between two evaluations (`Benchmark` makes them whole)."""
    return bench.budget // bench.checkpoints // steps_per_chunk


class _Snapshots(keras.callbacks.Callback):
    """Copies `net`'s weights at every epoch end (one epoch = one checkpoint)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.weights = net, []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.net.get_weights())


def steps_per_chunk_of(bench, method):
    """Inner steps per task batch for `method`: `bench.steps_per_chunk`, cut to divide its period."""
    if method.kind != "meta":
        return 1
    period = method.learner().schedule.period(bench.inner_steps)
    return int(np.gcd(period, bench.steps_per_chunk))


def pretrain(bench, method, seed, checkpoints=None):
    """Train `method` from the seed's initialization; `[(inner_steps, weights), ...]` per checkpoint.

    `checkpoints` (default all) limits training to the first so many.
    Weights are those of a `convnet` with `max(source classes)` units
    (its head untrained: fine-tuning replaces it).
    """
    sources = task_family(list(bench.sources))
    net = initial_model(bench, sources.num_classes, seed)
    steps = bench.checkpoint_steps()[: checkpoints or bench.checkpoints]
    if method.kind == "none":
        return [(0, net.get_weights())]
    snapshots = _Snapshots(net)
    if method.kind == "multitask":
        model = MultiTaskModel(net, sources.task_classes, seed=seed)
        model.compile(optimizer=bench.inner_optimizer(), steps_per_execution=bench.steps_per_chunk)
        chunk = 1
        stream = sources.as_dataset(
            tasks_per_batch=bench.tasks_per_batch, inner_steps=1, batch_size=bench.batch_size,
            steps_per_chunk=1, seed=seed, with_task_ids=True,
        )
    else:
        model = MetaModel(net, heads=TaskHeads(sources.num_tasks, sources.task_classes, seed=seed))
        chunk = steps_per_chunk_of(bench, method)
        model.compile(
            optimizer=method.meta_optimizer(), inner_optimizer=bench.inner_optimizer(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            learner=method.learner(), inner_steps=bench.inner_steps,
            steps_per_execution=max(1, bench.steps_per_chunk // chunk),
        )
        stream = sources.as_dataset(
            tasks_per_batch=bench.tasks_per_batch, inner_steps=bench.inner_steps,
            batch_size=bench.batch_size, steps_per_chunk=chunk, seed=seed, with_task_ids=True,
        )
    # One epoch per checkpoint: Keras keeps the stream's iterator across epochs.
    model.fit(stream, steps_per_epoch=chunks_per_checkpoint(bench, chunk), epochs=len(steps),
              callbacks=[snapshots], verbose=0)
    return list(zip(steps, snapshots.weights))


# ------------------------------------------------------------ meta-test
def _target_data(bench, name, seed):
    task = load_task(name)
    (x, y), (xt, yt) = task.train, task.test
    if bench.finetune_examples is not None:
        keep = np.random.default_rng([seed, 1]).permutation(len(x))[: bench.finetune_examples]
        x, y = x[keep], y[keep]
    if bench.test_examples is not None:
        xt, yt = xt[: bench.test_examples], yt[: bench.test_examples]
    scale = lambda images: images.astype("float32") / 255.0  # noqa: E731
    return task.num_classes, (scale(x), y), (scale(xt), yt)


def finetune_optimizer(bench):
    """SGD, Nesterov momentum 0.9, lr step-decayed at the milestones (the CTS paper's meta-test)."""
    bounds = [int(m * bench.finetune_steps) for m in bench.finetune_milestones]
    rates = [bench.finetune_lr * bench.finetune_decay**i for i in range(len(bounds) + 1)]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(bounds, rates)
    return keras.optimizers.SGD(
        schedule, momentum=0.9, nesterov=True, weight_decay=bench.finetune_weight_decay
    )


@functools.lru_cache(maxsize=None)
def _source_classes(sources):
    """The sources' head size (their largest task's classes)."""
    return task_family(list(sources)).num_classes


_FINETUNERS = {}


def _finetuner(bench):
    """One `Finetuner` per fine-tuning recipe: Keras traces each head size once per process."""
    recipe = (bench.finetune_steps, bench.finetune_lr, bench.finetune_decay,
              tuple(bench.finetune_milestones), bench.finetune_weight_decay, bench.finetune_batch_size)
    if recipe not in _FINETUNERS:
        _FINETUNERS[recipe] = Finetuner(bench.finetune_steps, optimizer=finetune_optimizer(bench),
                                        batch_size=bench.finetune_batch_size)
    return _FINETUNERS[recipe]


def meta_test(bench, weights, seed, targets=None):
    """Fine-tune the body of `weights` with a fresh head on every target; `{target: metrics}`."""
    init = initial_model(bench, _source_classes(tuple(bench.sources)), seed)
    init.set_weights(weights)
    tune = _finetuner(bench)
    scores = {}
    for index, name in enumerate(targets or bench.targets):
        classes, train, test = _target_data(bench, name, seed)
        body = random_initialization(init, seed=seed)
        body.set_weights(init.get_weights())
        keras.utils.set_random_seed(1000 * seed + index)  # the fresh head's draw
        result = tune(with_new_head(body, classes), train, test, seed=seed)
        scores[name] = {
            "loss_auc": result.loss_auc,
            "error_auc": result.error_auc,
            "test_accuracy": 1.0 - result.test_error,
            "test_loss": result.test_loss,
            "final_train_loss": float(np.mean(result.losses[-10:])),
        }
    return scores


# ------------------------------------------------------------- the run
def load_results(path):
    """The results dict of a many-shot results.json, `{"experiment": "many_shot", "cells": {...}}`.

    A file of the older layout (`{"settings": ..., "cells": ...}`, one settings
    dict for every cell, keys without the fine-tuning rate, such as
    docs/figures/many_shot_results.json) is converted: each cell gets those
    settings, its `finetune_lr` and a key with it. Nothing is written.

    Example::

        results = load_results("docs/figures/many_shot_results.json")
        print(table(results))
    """
    return _read_results(path)[0]


def _read_results(path):
    """`(load_results(path), whether it was of the older layout)`, reading the file once."""
    path = pathlib.Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{path} cannot be read as JSON ({error}): pass the results.json of a many-shot run."
        ) from None
    if isinstance(results, dict) and results.get("experiment") == EXPERIMENT:
        return results, False
    if isinstance(results, dict) and set(results) == {"settings", "cells"}:
        shared, cells = results["settings"], {}
        for cell in results["cells"].values():
            settings = {**shared, "method": cell["method"], "kind": cell["kind"], "config": cell["config"]}
            key = cell_key(cell["method"], cell["seed"], cell["inner_steps"], shared["finetune_lr"])
            cells[key] = {**cell, "finetune_lr": shared["finetune_lr"], "settings": settings}
        return {"experiment": EXPERIMENT, "cells": cells}, True
    raise ConfigError(
        f"{path} is not a results.json of tools/many_shot.py (no \"experiment\": {EXPERIMENT!r}): "
        "pass another --output_dir."
    )


def finetune_rates(bench, finetune_lrs=None):
    """The fine-tuning rates to evaluate: `finetune_lrs`, or `(bench.finetune_lr,)` when None.

    Rates whose cells would share a key (`cell_key` writes 6 significant
    digits, e.g. 0.1234567 and 0.1234568) are refused.

    Example::

        finetune_rates(Benchmark(), [0.1, 0.03])   # (0.1, 0.03)
    """
    rates = (bench.finetune_lr,) if finetune_lrs is None else tuple(float(r) for r in finetune_lrs)
    if not rates or any(not np.isfinite(r) or r <= 0 for r in rates) or len(set(rates)) < len(rates):
        raise ConfigError(
            f"finetune_lrs={list(rates)} must be distinct numbers > 0, e.g. --finetune_lrs 0.1 0.03 0.01."
        )
    labels = [_rate_label(r) for r in rates]
    shared = {label: [r for r in rates if _rate_label(r) == label] for label in labels if labels.count(label) > 1}
    if shared:
        raise ConfigError(
            "finetune_lrs " + "; ".join(f"{' and '.join(map(repr, same))} would share the cell key {label}"
                                        for label, same in shared.items())
            + " (keys hold 6 significant digits): choose rates that differ within them, e.g. 0.1 0.03 0.01."
        )
    return rates


def _plan(bench, method, seed, rates):
    """`[(inner_steps, rate, key), ...]`: the cells of `method` x `seed`, checkpoint by checkpoint."""
    steps = [0] if method.kind == "none" else bench.checkpoint_steps()
    return [(s, r, cell_key(method.name, seed, s, r)) for s in steps for r in rates]


def missing_cells(bench, method, seed, cells, finetune_lrs=None):
    """The keys of `method` x `seed`'s cells (every checkpoint and rate) that `cells` lacks.

    Example::

        missing_cells(bench, method, 0, load_results(path)["cells"])   # [] when done
    """
    return [key for _, _, key in _plan(bench, method, seed, finetune_rates(bench, finetune_lrs))
            if key not in cells]


def _differ(stored, wanted, skip=()):
    return sorted(k for k in set(stored) | set(wanted) if k not in skip and stored.get(k) != wanted.get(k))


def _refuse(path, key, stored, wanted, names, why=""):
    shown = ", ".join(f"{n}={stored.get(n)!r} there, {wanted.get(n)!r} now" for n in names)
    raise ConfigError(
        f"--resume: cell {key} of {path} was computed with other settings ({shown}){why}: resume "
        "with the same gin files and bindings, or choose another --output_dir."
    )


def check_settings(bench, methods, seeds, cells, finetune_lrs=None, path="results.json"):
    """Refuse resuming `cells` (a results dict's) with other settings: a `ConfigError` naming the fields.

    A planned cell already in `cells` must have been computed with exactly
    this cell's settings; every other cell must share the benchmark's
    (all but `PER_METHOD`), so that one results.json holds one benchmark.

    Example::

        check_settings(bench, [method], [0, 1], load_results(path)["cells"], (0.1, 0.01))
    """
    for method in methods:
        for rate in finetune_rates(bench, finetune_lrs):
            wanted = cell_settings(dataclasses.replace(bench, finetune_lr=rate), method)
            planned = {key for seed in seeds for _, _, key in _plan(bench, method, seed, [rate])}
            for key, cell in cells.items():
                mine = key in planned
                names = _differ(cell["settings"], wanted, skip=() if mine else PER_METHOD)
                if names:
                    _refuse(path, key, cell["settings"], wanted, names,
                            "" if mine else "; one results.json holds one benchmark")


def run(bench, methods, seeds=(0, 1, 2), output_dir="runs/many_shot", resume=False, log=print,
        finetune_lrs=None):
    """Every cell of `methods` x `seeds` x checkpoints x `finetune_lrs`; the results dict (also in results.json).

    Cells are run seed by seed (so a partial run has whole seeds; the
    tool's `--jobs N` calls this once per method x seed unit, N units at a
    time, and can leave parts of several seeds), each written to
    `output_dir/results.json` as soon as it is done. Each
    meta-training (method x seed) is fine-tuned at every rate of
    `finetune_lrs` (default: `bench.finetune_lr` alone). `resume` keeps the
    cells already there, which must have been computed with the same
    settings (`check_settings`, before any training); a file of the older
    layout is then converted in place (`load_results`): a refused resume
    leaves the file as it was.
    """
    rates = finetune_rates(bench, finetune_lrs)
    out = pathlib.Path(output_dir)
    path = out / "results.json"
    if resume and path.is_file():
        previous, older = _read_results(path)
        check_settings(bench, methods, seeds, previous["cells"], rates, path)
        if older:
            atomic.write_text(path, json.dumps(previous, indent=1))
            log(f"{path}: converted to per-cell settings ({len(previous['cells'])} cells kept)")
    store = CellStore(out, EXPERIMENT, resume=resume)
    for seed in seeds:
        for method in methods:
            plan = [p for p in _plan(bench, method, seed, rates) if store.get(p[2]) is None]
            if not plan:
                continue
            wanted = [0] if method.kind == "none" else bench.checkpoint_steps()
            began = time.perf_counter()
            trained = pretrain(bench, method, seed, checkpoints=wanted.index(plan[-1][0]) + 1)
            seconds = time.perf_counter() - began
            for steps, weights in trained:
                for _, rate, key in (p for p in plan if p[0] == steps):
                    at_rate = dataclasses.replace(bench, finetune_lr=rate)
                    began = time.perf_counter()
                    scores = meta_test(at_rate, weights, seed)
                    store.put(key, {
                        "method": method.name, "kind": method.kind, "config": method.describe(),
                        "seed": seed, "inner_steps": steps, "task_steps": steps * bench.tasks_per_batch,
                        "finetune_lr": rate, "pretrain_seconds": seconds,
                        "finetune_seconds": time.perf_counter() - began, "targets": scores,
                        "settings": cell_settings(at_rate, method),
                    })
                    mean = np.mean([s["test_accuracy"] for s in scores.values()])
                    log(f"{key}: mean test accuracy {mean:.4f}")
    return {"experiment": EXPERIMENT, "cells": dict(store.cells)}


# ------------------------------------------------------------- reports
def rates_of(results):
    """`{method: sorted fine-tuning rates of its cells}`.

    Example::

        rates_of(load_results("docs/figures/many_shot_results.json"))["cts"]   # [0.1]
    """
    found = {}
    for cell in results["cells"].values():
        found.setdefault(cell["method"], set()).add(cell["finetune_lr"])
    return {method: sorted(rates) for method, rates in found.items()}


def _benchmark(results):
    """The benchmark settings the cells share (targets, budget, ...); one rate per method, or a ConfigError."""
    several = {m: r for m, r in rates_of(results).items() if len(r) > 1}
    if several:
        raise ConfigError(
            f"results hold cells at several fine-tuning rates {several}: the benchmark's tables "
            "need one per method; pick them with at_rates(results, best_finetune_lr(results)), "
            "or use rate_table for a validation run."
        )
    if not results["cells"]:
        raise ConfigError("results hold no cells yet: run some first.")
    return next(iter(results["cells"].values()))["settings"]


def at_rates(results, rates):
    """`results` with, for every method of `rates` (`{method: finetune_lr}`), only its cells at that rate.

    Example::

        table(at_rates(results, best_finetune_lr(results)))
    """
    cells = {key: cell for key, cell in results["cells"].items()
             if cell["method"] not in rates or cell["finetune_lr"] == rates[cell["method"]]}
    return {**results, "cells": cells}


def _final_cells(results):
    """`{method: [cell, ...]}` of each method's last checkpoint (one cell per seed)."""
    _benchmark(results)
    last = {}
    for cell in results["cells"].values():
        top = last.get((cell["method"], cell["seed"]))
        if top is None or cell["inner_steps"] > top["inner_steps"]:
            last[(cell["method"], cell["seed"])] = cell
    final = {}
    for (method, _), cell in sorted(last.items(), key=lambda item: item[0][1]):
        final.setdefault(method, []).append(cell)
    return final


def _last_steps(results):
    """`{method: inner steps of its last checkpoint}` (the largest of its cells, over all its rates)."""
    last = {}
    for cell in results["cells"].values():
        last[cell["method"]] = max(last.get(cell["method"], 0), cell["inner_steps"])
    return last


def _seed_means(results, metric):
    """`{method: {rate: {seed: mean over targets of metric}}}` at each method's last checkpoint.

    Every rate of a method's cells is there: `{}` when it has no cell at that checkpoint.
    """
    last = _last_steps(results)
    means = {}
    for cell in results["cells"].values():
        by_seed = means.setdefault(cell["method"], {}).setdefault(cell["finetune_lr"], {})
        if cell["inner_steps"] == last[cell["method"]]:
            by_seed[cell["seed"]] = float(np.mean([s[metric] for s in cell["targets"].values()]))
    return means


def incomplete(results):
    """`{method: why}`: methods whose rates cannot all be compared at their last checkpoint.

    A rate with no cell there (an interrupted run: its cells stop at an
    earlier checkpoint), or rates that share no seed there. `best_finetune_lr`
    gives these methods no rate; resuming the run completes them.

    Example::

        incomplete(results)   # {"cts": "lr 0.01 has no cell at 4000 steps"}
    """
    last, out = _last_steps(results), {}
    for method, by_rate in _seed_means(results, "test_accuracy").items():
        missing = sorted((r for r, by_seed in by_rate.items() if not by_seed), reverse=True)
        if missing:
            out[method] = "; ".join(f"lr {r:g} has no cell at {last[method]} steps" for r in missing)
        elif not set.intersection(*(set(by_seed) for by_seed in by_rate.values())):
            out[method] = f"its rates share no seed at {last[method]} steps"
    return out


def rate_table(results, metric="test_accuracy"):
    """Markdown: per method, the mean over targets of `metric` at each fine-tuning rate, mean ± std over seeds.

    Each entry is at the method's last checkpoint and says how many seeds it
    has; "incomplete" where the method has cells at that rate but none there
    (`incomplete`), "-" where it has none at all.

    Example::

        print(rate_table(run(bench, methods, [0, 1], out, finetune_lrs=(0.1, 0.01)), "loss_auc"))
    """
    means = _seed_means(results, metric)
    rates = sorted({r for by_rate in means.values() for r in by_rate}, reverse=True)
    lines = ["| method | " + " | ".join(f"lr {r:g}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for method, by_rate in means.items():
        row = [f"{_mean_std(list(by_rate[r].values()))} ({len(by_rate[r])})" if by_rate.get(r) else
               "incomplete" if r in by_rate else "-" for r in rates]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def best_finetune_lr(results):
    """`{method: rate}`: each method's fine-tuning rate of highest mean test accuracy (a validation run's choice).

    The mean is over targets and seeds at the method's last checkpoint, over
    the seeds that every one of its rates has (a partial run compares like
    with like); a tie goes to the lower mean training-loss AUC. Methods
    that are `incomplete` (a rate without a cell at that checkpoint, or
    rates that share no seed there) are left out. Results meta-tested on any of
    the benchmark's `TARGETS` are refused: the rate is chosen on sources only.

    Example::

        best_finetune_lr(load_results("runs/many_shot_validation_lr/results.json"))   # {"cts": 0.03, ...}
    """
    tuned = sorted({t for cell in results["cells"].values() for t in cell["targets"]} & set(TARGETS))
    if tuned:
        raise ConfigError(
            f"these results are fine-tuned on the benchmark's targets {tuned}: choosing the rate on them "
            "would tune on the targets; choose it on the source-only split (tools/many_shot.py --validation)."
        )
    accuracy, auc = _seed_means(results, "test_accuracy"), _seed_means(results, "loss_auc")
    best, left_out = {}, incomplete(results)
    for method, by_rate in accuracy.items():
        if method in left_out:
            continue
        seeds = set.intersection(*(set(by_seed) for by_seed in by_rate.values()))

        def score(rate):
            return (float(np.mean([by_rate[rate][s] for s in seeds])),
                    -float(np.mean([auc[method][rate][s] for s in seeds])))

        best[method] = max(sorted(by_rate, reverse=True), key=score)
    return best


def _mean_std(values):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.4f} ± {values.std():.4f}"


def table(results, metric="test_accuracy", methods=None):
    """Markdown table of each method's final `metric` per target, mean ± std over seeds.

    The last column says how many seeds the row has and at what budget.
    """
    final = _final_cells(results)
    targets = list(_benchmark(results)["targets"])
    order = [m for m in (methods or final) if m in final]
    head = "| method | " + " | ".join(targets) + " | mean | seeds (inner steps) |"
    lines = [head, "|---" * (len(targets) + 3) + "|"]
    for method in order:
        cells = final[method]
        row = [_mean_std([c["targets"][t][metric] for c in cells]) for t in targets]
        row.append(_mean_std([np.mean([c["targets"][t][metric] for t in targets]) for c in cells]))
        budgets = sorted({c["task_steps"] for c in cells})
        row.append(f"{len(cells)} ({', '.join(map(str, budgets))})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def convergence(results, metric="test_accuracy"):
    """`{method: (task_steps, mean over targets and seeds, std over seeds, seeds)}` along the budget.

    Methods without pretraining sit at 0 task-steps; every other method's
    curve starts there too (all of a seed's methods start from its init).
    """
    curves = {}
    for cell in results["cells"].values():
        value = np.mean([s[metric] for s in cell["targets"].values()])
        curves.setdefault(cell["method"], {}).setdefault(cell["task_steps"], []).append(value)
    return {
        method: [(steps, float(np.mean(v)), float(np.std(v)), len(v)) for steps, v in sorted(points.items())]
        for method, points in curves.items()
    }


def plot_convergence(results, path, metric="test_accuracy", title=None):
    """The meta-convergence figure: meta-test `metric` (mean over targets) vs task-steps spent."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = convergence(results, metric)
    start = curves.pop("no pretraining", None)
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for method, points in curves.items():
        if start:
            points = start + points
        steps, means, stds, _ = map(np.array, zip(*points))
        axes.errorbar(steps, means, yerr=stds, marker="o", capsize=3, label=method)
    if start:
        axes.axhline(start[0][1], color="grey", linestyle=":", label="no pretraining")
    axes.set_xlabel("inner steps spent in meta-training (task-steps)")
    axes.set_ylabel(f"meta-test {metric.replace('_', ' ')} (mean of targets)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title, fontsize=9)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_atomic(path) as handle:
        figure.savefig(handle, format="png", dpi=110)
    return path


def claims(results, best=None):
    """The issue's four claims checked on the final cells; `{claim: (holds, evidence)}`.

    Needs the methods named "cts", "cts without shifting", "reptile", "leap",
    "multi-task" and "no pretraining"; claims whose methods are missing are left out.
    """
    final = _final_cells(results)
    settings = _benchmark(results)
    targets = list(settings["targets"])
    held_out = [t for t in targets if t.split("/")[0] in HELD_OUT_DATASETS]

    def mean(method, target, metric):
        return float(np.mean([c["targets"][target][metric] for c in final[method]]))

    def overall(method):
        return float(np.mean([mean(method, t, "test_accuracy") for t in targets]))

    out = {}
    meta = [m for m in final if m != "no pretraining"]
    if "no pretraining" in final and meta:
        best = best or max(meta, key=overall)
        wins = {
            t: (mean(best, t, "loss_auc") < mean("no pretraining", t, "loss_auc"),
                mean(best, t, "test_accuracy") > mean("no pretraining", t, "test_accuracy"))
            for t in targets
        }
        out[f"best ({best}) beats no pretraining on every target, AUC and accuracy"] = (
            all(a and b for a, b in wins.values()),
            {t: {"lower AUC": a, "higher accuracy": b} for t, (a, b) in wins.items()},
        )
    if "cts" in final and "reptile" in final:
        reptile_final = overall("reptile")
        third = settings["budget"] * settings["tasks_per_batch"] / 3
        early = [(s, m) for s, m, _, _ in convergence(results)["cts"] if s <= third]
        steps, value = max(early) if early else (None, None)
        out["CTS reaches Reptile's final accuracy with <= 1/3 of the steps"] = (
            value is not None and value >= reptile_final,
            {"reptile final": reptile_final, f"cts at {steps} task-steps": value},
        )
        out["CTS ends at least as good as Reptile"] = (
            overall("cts") >= reptile_final, {"cts": overall("cts"), "reptile": reptile_final},
        )
    if "cts" in final and "cts without shifting" in final:
        out["CTS without shifting is worse than CTS"] = (
            overall("cts without shifting") < overall("cts"),
            {"cts": overall("cts"), "no shifting": overall("cts without shifting")},
        )
    if "multi-task" in final:
        for method in ("leap", "cts"):
            if method in final:
                rows = {t: (mean(method, t, "test_accuracy"), mean("multi-task", t, "test_accuracy"),
                            mean(method, t, "loss_auc"), mean("multi-task", t, "loss_auc"))
                        for t in held_out}
                out[f"{method} beats multi-task on the held-out datasets' targets"] = (
                    all(a > b and c < d for a, b, c, d in rows.values()),
                    {t: {"accuracy": (a, b), "loss AUC": (c, d)} for t, (a, b, c, d) in rows.items()},
                )
    return out
