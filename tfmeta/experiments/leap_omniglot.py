"""Leap's Omniglot experiment (Leap paper section 3, figure 2), resumable cell by cell.

Each alphabet is one 20-way task (`tfmeta.tasks.omniglot_alphabets`). For
every number of pretraining alphabets and seed, an initialization is
pretrained by each method and fine-tuned on the seed's 10 held-out
alphabets (100 steps of SGD, as `tfmeta.evaluation.heldout_finetuning`),
measuring the area under the training-loss curve and the test error:

- `"leap"`, `"reptile"`, `"fomaml"`: meta-trained by the `tfmeta.train` job
  of gin/<method>_omniglot.gin with this run's sizes bound over it
  (`learner_bindings`; the caller applies them, see `run`);
- `"multi-headed"`: `tfmeta.multitask.MultiTaskModel` (one head per
  pretraining alphabet) on the meta-learners' own task stream, as many
  task-steps as one meta-learner run (meta_updates x K steps of
  min(tasks_per_batch, alphabets) tasks);
- `"no pretraining"`: the seed's random initialization, the one every other
  method of the seed starts from. It does not depend on the pretraining
  alphabets, so it is one cell per seed (`alphabets` None).

The held-out alphabets depend only on the seed: the split draws one order of
the eligible alphabets and holds out its first 10, so the pretraining sets
of 1, 3, ..., 25 alphabets are nested and every column compares the same 10
held-out tasks.

A cell is (method, alphabets, seed, fraction): `fraction` < 1 are the stages
of figure 2 (left), a meta-learner trained for that fraction of the
meta-updates. Every finished cell goes to `output_dir/results.json` at once
(atomically) with the settings it was computed with; `resume=True` skips
the recorded cells (a recorded cell with other settings is an error naming
the difference) and continues a meta-learner killed mid-cell from its last
`tfmeta.train` checkpoint (written every 5 minutes), so a killed run loses
at most part of one cell.

Example::

    config = Config(meta_updates=80, inner_steps=50)
    cells = plan(["leap", "no pretraining"], alphabets=[5, 20], seeds=[0, 1, 2])
    # train_learner: e.g. tools/leap_omniglot.py's, which runs the gin-configured tfmeta.train job
    results = run(config, cells, "runs/leap_omniglot", train_learner)
    print(table(results))
    plot_auc(results, "docs/figures/leap_omniglot_auc.png")
    plot_stages(results, "docs/figures/leap_omniglot_stages.png")
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Optional

import keras
import numpy as np

from tfmeta import atomic
from tfmeta.evaluation import finetune_every_task, mean_curves, summary
from tfmeta.experiments import machine
from tfmeta.experiments.complexity_run import stop_if_interrupted
from tfmeta.models import convnet
from tfmeta.multitask import MultiTaskModel
from tfmeta.tasks import omniglot_alphabets, random_affine
from tfmeta.validation import ConfigError, check_positive_int

__all__ = [
    "ALPHABETS",
    "Cell",
    "Config",
    "LEARNERS",
    "METHODS",
    "learner_bindings",
    "load_results",
    "plan",
    "plot_auc",
    "plot_stages",
    "run",
    "series",
    "table",
]

#: Meta-learners, each meta-trained with gin/<name>_omniglot.gin.
LEARNERS = ("leap", "reptile", "fomaml")
#: Every compared method, in the order of tables and legends.
METHODS = (*LEARNERS, "multi-headed", "no pretraining")
#: The paper's numbers of pretraining alphabets (figure 2, right).
ALPHABETS = (1, 3, 5, 10, 15, 20, 25)
FORMAT = "tfmeta.leap_omniglot"
WAYS = 20  # characters per alphabet task, as in the paper


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes every cell shares (the gin files hold the rest: learning rates, batch 20, ...).

    Attributes:
        meta_updates: meta-updates of a meta-learner run (the paper: 1000).
        inner_steps: K, inner steps per trajectory (the paper: 100).
        tasks_per_batch: tasks per meta-batch, capped by the number of
            pretraining alphabets (the paper: 20).
        filters: convnet width (the paper: 64).
        num_heldout: held-out alphabets (the paper: 10).
        finetune_steps: fine-tuning steps on each held-out alphabet (100).
        finetune_lr: its SGD learning rate (0.1).
        batch_size: examples per task per step, in pretraining and fine-tuning (20).
        multihead_lr: the multi-headed baseline's SGD rate per task-step:
            each task's gradient is stepped with it, as a meta-learner's
            inner step is (0.1, the inner learning rate).

    Example::

        Config(meta_updates=1000, inner_steps=100, tasks_per_batch=20, filters=64)
    """

    meta_updates: int = 80
    inner_steps: int = 50
    tasks_per_batch: int = 5
    filters: int = 16
    num_heldout: int = 10
    finetune_steps: int = 100
    finetune_lr: float = 0.1
    batch_size: int = 20
    multihead_lr: float = 0.1

    def __post_init__(self):
        for field in ("meta_updates", "inner_steps", "tasks_per_batch", "filters", "num_heldout",
                      "finetune_steps", "batch_size"):
            check_positive_int(field, getattr(self, field), fix=f"pass --{field} 1 or more")
        for field in ("finetune_lr", "multihead_lr"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{field}={value!r} must be a number > 0: pass e.g. --{field} 0.1.")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One result: `method` pretrained on `alphabets` alphabets with `seed`, for `fraction` of the meta-updates.

    Example::

        Cell("leap", 25, seed=0, fraction=0.5).key     # "leap/a25/s0@0.5"
    """

    method: str
    alphabets: Optional[int]
    seed: int
    fraction: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {METHODS}: choose one of them.")
        if (self.alphabets is None) != (self.method == "no pretraining"):
            raise ConfigError(
                f"Cell({self.method!r}, alphabets={self.alphabets!r}): only 'no pretraining' "
                "has no pretraining alphabets (None); every other method needs a number."
            )
        if not 0 < self.fraction <= 1 or (self.fraction < 1 and self.method not in LEARNERS):
            raise ConfigError(
                f"Cell({self.method!r}, fraction={self.fraction!r}): a fraction of the "
                f"meta-updates must be in (0, 1], and below 1 only for {LEARNERS}."
            )

    @property
    def key(self):
        """Its key in results.json: `"<method>/a<alphabets>/s<seed>"`, `@<fraction>` for a stage."""
        where = "" if self.alphabets is None else f"/a{self.alphabets}"
        stage = "" if self.fraction == 1 else f"@{self.fraction:g}"
        return f"{self.method}{where}/s{self.seed}{stage}"

    def tasks_per_batch(self, config):
        return min(config.tasks_per_batch, self.alphabets)

    def meta_updates(self, config):
        """The meta-updates this cell trains: `fraction` of the run's, at least 1."""
        updates = round(config.meta_updates * self.fraction)
        if updates < 1:
            raise ConfigError(
                f"cell {self.key}: {self.fraction:g} of {config.meta_updates} meta-updates is "
                "none: choose larger --stages fractions or more --meta_updates."
            )
        return updates

    def settings(self, config):
        """What this cell's numbers depend on, by the command-line names (stored with its record)."""
        out = {k: getattr(config, k) for k in
               ("filters", "num_heldout", "finetune_steps", "finetune_lr", "batch_size")}
        if self.method != "no pretraining":
            # A stage's own meta-updates follow from the run's and its fraction (in its key).
            out.update(meta_updates=config.meta_updates, inner_steps=config.inner_steps,
                       tasks_per_batch=self.tasks_per_batch(config))
        if self.method == "multi-headed":
            out.update(multihead_lr=config.multihead_lr)
        return out


def plan(methods=METHODS, alphabets=ALPHABETS, seeds=(0, 1, 2), stages=(0.25, 0.5), stage_method="leap"):
    """The cells of a run, in the order they run: seed by seed, so a partial run has whole seeds.

    Within a seed: no pretraining, then every method per number of
    alphabets (ascending), then `stage_method`'s `stages` (fractions of the
    meta-updates) at the largest number of alphabets, for figure 2 (left)
    (only if `stage_method` is among `methods`).

    Example::

        plan(["leap", "no pretraining"], alphabets=[5, 20], seeds=[0])
        # no pretraining/s0, leap/a5/s0, leap/a20/s0, leap/a20/s0@0.25, leap/a20/s0@0.5
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"methods {unknown} are not among {METHODS}: choose from them.")
    sizes = sorted(set(int(a) for a in alphabets))
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"alphabets {list(alphabets)} must be numbers >= 1, e.g. --alphabets 5 20.")
    cells = []
    for seed in seeds:
        if "no pretraining" in methods:
            cells.append(Cell("no pretraining", None, seed))
        cells += [Cell(m, a, seed) for a in sizes for m in METHODS if m in methods and m != "no pretraining"]
        if stage_method in methods:
            cells += [Cell(stage_method, sizes[-1], seed, float(f)) for f in sorted(stages) if f != 1]
    return cells


def learner_bindings(config, cell, resume=False):
    """The gin bindings that size gin/<method>_omniglot.gin's `tfmeta.train` job to `cell`.

    Example::

        learner_bindings(Config(), Cell("leap", 5, seed=1))[:2]
        # ['omniglot_alphabets.num_pretrain = 5', 'omniglot_alphabets.num_heldout = 10']
    """
    chunk = math.gcd(10, config.inner_steps)  # the gin files' 10, dividing K
    return [
        f"omniglot_alphabets.num_pretrain = {cell.alphabets}",
        f"omniglot_alphabets.num_heldout = {config.num_heldout}",
        f"omniglot_alphabets.seed = {cell.seed}",
        f"convnet.filters = {config.filters}",
        f"train.meta_updates = {cell.meta_updates(config)}",
        f"train.inner_steps = {config.inner_steps}",
        f"train.tasks_per_batch = {cell.tasks_per_batch(config)}",
        f"train.batch_size = {config.batch_size}",
        f"train.steps_per_chunk = {chunk}",
        "train.epochs = 1",
        f"train.seed = {cell.seed}",
        "train.evaluation = None",
        # Resuming continues a cell killed mid-training from its checkpoint.
        f"train.overwrite = {not resume}",
        "train.verbose = 0",
    ]


# ------------------------------------------------------------ one cell
def initial_model(config, seed):
    """The seed's random initialization (gin's `@convnet()` builds the same one after this seeding)."""
    keras.utils.set_random_seed(seed)
    return convnet(WAYS, filters=config.filters)


def _multiheaded(config, cell):
    """The body of `MultiTaskModel` trained on the meta-learners' stream; its head is the untrained init's."""
    pretrain, _ = omniglot_alphabets(num_pretrain=cell.alphabets, num_heldout=config.num_heldout,
                                     seed=cell.seed, augment=random_affine())
    T = cell.tasks_per_batch(config)
    steps = config.meta_updates * config.inner_steps
    net = initial_model(config, cell.seed)
    model = MultiTaskModel(net, num_classes=pretrain.task_classes, seed=cell.seed)
    # MultiTaskModel steps with the mean of the T task losses: a rate of
    # T x multihead_lr steps each task's gradient with multihead_lr.
    model.compile(optimizer=keras.optimizers.SGD(config.multihead_lr * T),
                  steps_per_execution=math.gcd(steps, 10))
    stream = pretrain.as_dataset(tasks_per_batch=T, inner_steps=1, batch_size=config.batch_size,
                                 steps_per_chunk=1, seed=cell.seed, with_task_ids=True)
    # The stream is already shuffled; Keras would warn that shuffle=True is ignored.
    model.fit(stream, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
    return net


def _evaluate(config, model, heldout, seed):
    """Leap's metrics on the held-out alphabets, with the task-mean training curves (figure 2, left)."""
    runs = finetune_every_task(model, heldout, config.finetune_steps, config.finetune_lr,
                               config.batch_size, seed)
    curves = mean_curves(runs)
    return {**summary(runs), "curve": {"loss": curves.losses, "error": curves.errors}}


def _pretrained(config, cell, output_dir, train_learner, resume):
    if cell.method == "no pretraining":
        return initial_model(config, cell.seed)
    if cell.method == "multi-headed":
        return _multiheaded(config, cell)
    # Seeded here because gin builds the model inside `train_learner`.
    keras.utils.set_random_seed(cell.seed)
    run_dir = pathlib.Path(output_dir) / cell.key.replace("/", "_")
    return train_learner(f"{cell.method}_omniglot.gin", learner_bindings(config, cell, resume), run_dir, resume)


# ------------------------------------------------------------ the run
def load_results(path):
    """The results dict of a results.json written by `run`, or a ConfigError saying what it is not."""
    path = pathlib.Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} cannot be read as JSON ({error}): pass the results.json of a run.") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ConfigError(
            f"{path} is not a results.json of tools/leap_omniglot.py (no \"format\": {FORMAT!r}; "
            "an older run's list of records?): run again into another --output_dir."
        )
    return results


def _check_settings(path, record, cell, settings):
    stored = record.get("settings", {})
    differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
    if differ:
        name = differ[0]
        more = f" ({len(differ) - 1} more differ: {', '.join(differ[1:])})" if len(differ) > 1 else ""
        raise ConfigError(
            f"{path}: cell {cell.key} was computed with {name}={stored.get(name)!r}, this run "
            f"has {name}={settings.get(name)!r}{more}: resume with --{name} {stored.get(name)} "
            "to continue that run, or pass another --output_dir (or --overwrite to start over)."
        )


def run(config, cells, output_dir, train_learner, resume=False, overwrite=False, log=print):
    """Compute every cell of `cells` not yet in `output_dir/results.json`; return the results dict.

    Each finished cell is written at once (atomically) with its settings and
    the `machine` it was computed on; kept cells of other kernels get one
    logged note (`machine.other_kernels`).
    `train_learner(gin_file, bindings, run_dir, resume)` meta-trains with
    gin/<gin_file> under `bindings` in `run_dir` and returns the learned
    `keras.Model` (tools/leap_omniglot.py's runs the `tfmeta.train` job).

    Raises:
        ConfigError: results.json exists and neither `resume` nor
            `overwrite` is set, or a recorded cell has other settings.
    """
    if resume and overwrite:
        raise ConfigError("resume and overwrite contradict each other: pass --resume or --overwrite, not both.")
    out = pathlib.Path(output_dir)
    path = out / "results.json"
    if path.exists() and not (resume or overwrite):
        raise ConfigError(
            f"{path} exists: pass --resume to continue that run (its finished cells are kept) "
            "or --overwrite to start over."
        )
    results = load_results(path) if resume and path.exists() else {"format": FORMAT, "cells": {}}
    recorded = results["cells"]
    for cell in cells:  # settings first: a mismatch costs seconds, not a run
        if cell.key in recorded:
            _check_settings(path, recorded[cell.key], cell, cell.settings(config))
    computed_on = machine.describe()  # a record in every cell: resume does not compare it
    note = machine.other_kernels([record.get("machine") for record in recorded.values()], computed_on)
    if note:
        log(f"note: {note}")
    out.mkdir(parents=True, exist_ok=True)
    heldout = {}
    for cell in cells:
        if cell.key in recorded:
            continue
        if cell.seed not in heldout:
            heldout[cell.seed] = omniglot_alphabets(num_pretrain=1, num_heldout=config.num_heldout,
                                                    seed=cell.seed)[1]
        began = time.perf_counter()
        model = _pretrained(config, cell, out, train_learner, resume)
        trained = time.perf_counter()
        scores = _evaluate(config, model, heldout[cell.seed], cell.seed)
        recorded[cell.key] = {
            "method": cell.method, "alphabets": cell.alphabets, "seed": cell.seed,
            "fraction": cell.fraction, "settings": cell.settings(config), "machine": computed_on,
            "meta_updates_trained": cell.meta_updates(config) if cell.method in LEARNERS else None,
            "pretrain_seconds": trained - began, "finetune_seconds": time.perf_counter() - trained,
            **scores,
        }
        atomic.write_text(path, json.dumps(results, indent=1))
        log(f"{cell.key}: loss AUC {scores['loss_auc']:.4f}, test error {scores['test_error']:.4f} "
            f"({time.perf_counter() - began:.0f} s)")
        stop_if_interrupted()  # a Ctrl-C that a library swallowed stops here, the cell saved
    return results


# ------------------------------------------------------------ reports
def series(results, metric="loss_auc"):
    """`{method: {alphabets: [value per seed]}}` of the finished (fraction 1) cells.

    "no pretraining" is given at every number of alphabets any other method has.

    Example::

        series(results)["leap"][20]       # [0.86, 0.85, 0.88]
    """
    final = [r for r in results["cells"].values() if r["fraction"] == 1]
    sizes = sorted({r["alphabets"] for r in final if r["alphabets"] is not None})
    out = {}
    for method in METHODS:
        rows = sorted((r for r in final if r["method"] == method), key=lambda r: r["seed"])
        for r in rows:
            for a in (sizes if r["alphabets"] is None else [r["alphabets"]]):
                out.setdefault(method, {}).setdefault(a, []).append(r[metric])
    return {m: dict(sorted(v.items())) for m, v in out.items()}


def table(results, metrics=("loss_auc", "test_error")):
    """Markdown table: one row per method, `metrics` mean ± std over seeds per number of alphabets.

    Example::

        print(table(results))
        # | method | loss AUC, 5 alphabets | test error, 5 alphabets | ...
    """
    columns = {metric: series(results, metric) for metric in metrics}
    sizes = sorted({a for per in columns[metrics[0]].values() for a in per})
    names = {m: m.replace("_", " ").replace("auc", "AUC") for m in metrics}
    head = [f"{names[m]}, {a} alphabets" for a in sizes for m in metrics]
    lines = ["| method | " + " | ".join(head) + " | seeds |", "|---" * (len(head) + 2) + "|"]
    for method, per in columns[metrics[0]].items():
        row = []
        for a in sizes:
            for metric in metrics:
                values = np.asarray(columns[metric][method].get(a, [np.nan]), dtype=float)
                row.append(f"{values.mean():.3f} ± {values.std():.3f}")
        seeds = sorted({len(v) for v in per.values()})
        lines.append(f"| {method} | " + " | ".join(row) + f" | {'/'.join(map(str, seeds))} |")
    return "\n".join(lines)


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # drawn off-screen: the global matplotlib backend is left alone
    return figure, figure.subplots()


def _band(axes, x, mean, std, **style):
    """A mean line and its ± std shading, in the line's colour."""
    line, = axes.plot(x, mean, **style)
    axes.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def _label_and_save(figure, path, xlabel, ylabel, title):
    axes = figure.axes[0]
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_atomic(path) as handle:  # a crash keeps the previous PNG
        figure.savefig(handle, format="png", dpi=110)
    return path


def plot_auc(results, path, metric="loss_auc"):
    """Figure 2 (right): held-out `metric` against the number of pretraining alphabets, mean ± std over seeds.

    Example::

        plot_auc(load_results("runs/leap_omniglot/results.json"), "docs/figures/leap_omniglot_auc.png")
    """
    figure, axes = _figure(6.5, 4.2)
    for method, per in series(results, metric).items():
        sizes = np.array(list(per))
        values = [np.asarray(v, dtype=float) for v in per.values()]
        mean, std = np.array([v.mean() for v in values]), np.array([v.std() for v in values])
        style = {"linestyle": ":", "color": "grey"} if method == "no pretraining" else {"marker": "o"}
        _band(axes, sizes, mean, std, label=method, **style)
    seeds = sorted({r["seed"] for r in results["cells"].values()})
    return _label_and_save(figure, path, "pretraining alphabets",
                 f"held-out training {metric.replace('_auc', '').replace('_', ' ')} AUC",
                 f"Omniglot, {len(seeds)} seed(s): mean, shading ± std over seeds")


def plot_stages(results, path, method="leap", alphabets=None, curve="loss"):
    """Figure 2 (left): `method`'s held-out fine-tuning curves at each stage of meta-training.

    Stages are its cells at `alphabets` (default: the largest it has) with
    their fractions of the meta-updates, and 0 %, the seed's random
    initialization (the "no pretraining" cells). Each curve is the mean
    over seeds of the mean over held-out alphabets, shaded ± std over seeds.

    Example::

        plot_stages(results, "docs/figures/leap_omniglot_stages.png")
    """
    cells = list(results["cells"].values())
    mine = [r for r in cells if r["method"] == method]
    if not mine:
        raise ConfigError(f"results hold no {method!r} cells: figure 2 (left) needs them; run them first.")
    alphabets = alphabets or max(r["alphabets"] for r in mine)
    stages = {}
    for r in cells:
        if r["method"] == "no pretraining":
            stages.setdefault(0.0, []).append(r)
        elif r["method"] == method and r["alphabets"] == alphabets:
            stages.setdefault(r["fraction"], []).append(r)
    figure, axes = _figure(6.5, 4.2)
    colours = _stage_colours(len(stages))
    for colour, (fraction, rows) in zip(colours, sorted(stages.items())):
        values = np.array([r["curve"][curve] for r in rows], dtype=float)
        mean, std = values.mean(axis=0), values.std(axis=0)
        steps = np.arange(1, len(mean) + 1)
        updates = rows[0]["meta_updates_trained"] if fraction else 0  # 0: the random init
        seeds = f"{len(rows)} seed{'s' if len(rows) > 1 else ''}"
        _band(axes, steps, mean, std, color=colour, label=f"{fraction:.0%} ({updates} meta-updates, {seeds})")
    return _label_and_save(figure, path, "fine-tuning step on a held-out alphabet",
                 f"training {curve} (mean of held-out alphabets)",
                 f"{method}, {alphabets} pretraining alphabets, by stage of meta-training")


def _stage_colours(count):
    """`count` colours of the viridis map, dark (early stages) to light (late)."""
    from matplotlib import colormaps

    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.85, count)]
