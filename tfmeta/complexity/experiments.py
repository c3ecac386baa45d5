"""Real-data experiments of Achille, Mbeng & Soatto (figures 1 and 2), CPU-sized.

Three gin-configurable experiments, run by ``tools/complexity.py`` (see
docs/complexity.md and docs/results.md for settings and numbers):

* :func:`relabel_experiment` (figure 1, left): an MNIST subset with a growing
  fraction of randomly relabelled training examples; the complexity
  ``C_beta`` of the trained model on its training set and the SGD steps to a
  fixed training loss, over fractions and seeds, their Spearman correlation,
  a Kramers fit ``log steps = a + b C`` (eq. 16) and a sensitivity table over
  ``(lam, gamma)``;
* :func:`reachability_experiment` (figure 2): the static distance
  ``d(s -> t)`` and the measured fine-tuning steps between real tasks
  (MNIST, Fashion-MNIST, Omniglot characters, MNIST with random labels),
  per-task heads;
* :func:`ranking_experiment`: candidate initializations of a target task
  (random, models trained on other tasks, exported meta-learned ones) ranked
  by predicted ease and by measured fine-tuning steps.

Every experiment writes ``results.json``, ``summary.md`` (Markdown tables)
and a PNG into its output directory and returns the results as a dict.

Tasks are named (see :func:`task_arrays`): ``"mnist"``, ``"fashion_mnist"``,
``"fashion_mnist_inverted"``, ``"mnist_random"``, ``"mnist_0-4"``,
``"omniglot"``, optionally with ``"@k"`` to take another block of examples
(``"mnist@3"``: MNIST images 30000.., the same task on other samples).

Example::

    from tfmeta.complexity import experiments as ex
    out = ex.relabel_experiment("runs/relabel", fractions=(0, 0.5, 1), seeds=(0,),
                                examples=300)
    out["spearman"]["complexity_vs_steps"]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Callable, Mapping, Optional, Sequence

import gin
import keras
import numpy as np

from tfmeta.complexity.distance import (
    _union_pair,
    rank_initializations,
    rankdata,
    reachability_matrix,
    spearman,
)
from tfmeta.complexity.measure import complexity, complexity_terms, resolve_beta
from tfmeta.complexity.plot import plot_reachability
from tfmeta.complexity.training import TrainingRecipe, sgd, train

__all__ = [
    "BLOCK",
    "TASKS",
    "conv_classifier",
    "mlp_classifier",
    "ranking_experiment",
    "reachability_experiment",
    "relabel",
    "relabel_experiment",
    "run",
    "task_arrays",
]

#: Examples per block of a dataset's train split: task ``"name@k"`` takes its
#: examples from ``[k * BLOCK, (k + 1) * BLOCK)``, so tasks built from
#: different blocks of one dataset never share an image.
BLOCK = 10000

#: Named tasks: source dataset, default block, label space. Tasks in one
#: label space name the same classes (so a union shares their labels).
TASKS = {
    "mnist": ("mnist", 0, "digits"),
    "mnist_random": ("mnist", 1, "digits"),
    "mnist_0-4": ("mnist", 2, "digits"),
    "fashion_mnist": ("fashion_mnist", 0, "fashion"),
    "fashion_mnist_inverted": ("fashion_mnist", 0, "fashion"),
    "omniglot": ("omniglot", 0, "omniglot"),
}

OMNIGLOT_DRAWINGS = 20


def _say(log, message):
    if log is not None:
        log(message)


def _print(message):
    print(message, flush=True)


# --------------------------------------------------------------------------
# models and data


@gin.configurable(module="tfmeta.complexity")
def mlp_classifier(num_classes: int = 10, input_shape=(28, 28, 1), units=(256,)):
    """The experiments' network: Flatten -> [Dense(u, relu)]* -> Dense(logits).

    Example::

        model = mlp_classifier(num_classes=50)      # 784-256-50, 213,810 params
    """
    model = keras.Sequential([keras.Input(tuple(input_shape)), keras.layers.Flatten()],
                             name="mlp_classifier")
    for width in units:
        model.add(keras.layers.Dense(int(width), activation="relu"))
    model.add(keras.layers.Dense(int(num_classes), name="head"))
    return model


@gin.configurable(module="tfmeta.complexity")
def conv_classifier(num_classes: int = 10, input_shape=(28, 28, 1), filters=(16, 32),
                    units=128):
    """A small convnet: [Conv 3x3 (f, relu) -> MaxPool 2]* -> Flatten ->
    Dense(units, relu) -> Dense(logits). No BatchNorm, so the model has no
    non-trainable state and ``C_beta`` covers all of it.

    Example::

        model = conv_classifier(num_classes=10)     # 108,618 params for 10 classes
    """
    layers = keras.layers
    model = keras.Sequential([keras.Input(tuple(input_shape))], name="conv_classifier")
    for f in filters:
        model.add(layers.Conv2D(int(f), 3, activation="relu"))
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    if units:
        model.add(layers.Dense(int(units), activation="relu"))
    model.add(layers.Dense(int(num_classes), name="head"))
    return model


def _parse(spec):
    name, _, block = str(spec).partition("@")
    if name not in TASKS:
        raise ValueError(
            f"unknown task {spec!r}; known tasks: {sorted(TASKS)} (optionally with "
            "'@k' for another block of examples, e.g. 'mnist@3')"
        )
    dataset, default_block, space = TASKS[name]
    if block:
        try:
            block = int(block)
        except ValueError:
            raise ValueError(f"task {spec!r}: the block after '@' must be an integer") from None
    else:
        block = default_block
    return name, dataset, block, space


def label_space(spec) -> str:
    """The label space of a named task (``"digits"``, ``"fashion"``, ...)."""
    return _parse(spec)[3]


@functools.lru_cache(maxsize=4)
def _train_split(dataset, data_dir):
    from tfmeta.tasks.datasets import image_arrays

    arrays = image_arrays(dataset, "train", image_size=28, channels=1, data_dir=data_dir)
    return arrays["image"], arrays["label"].astype(np.int32)


@functools.lru_cache(maxsize=2)
def _omniglot(data_dir):
    from tfmeta.tasks.omniglot import omniglot_arrays

    arrays = omniglot_arrays(28, data_dir)
    return arrays["image"], arrays["label"].astype(np.int32)


def relabel(y, fraction, num_classes=10, seed=0):
    """Labels with ``round(fraction * N)`` examples (chosen uniformly without
    replacement) given labels drawn uniformly from ``0..num_classes-1``
    (about ``1/num_classes`` of them coincide with the true label, as in
    Zhang et al.'s random-label experiments).

    Example::

        y_noisy = relabel(y, 0.5, seed=1)
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    y = np.array(y, np.int32, copy=True)
    rng = np.random.default_rng([int(seed), 0xC0FFEE])
    chosen = rng.permutation(len(y))[: int(round(float(fraction) * len(y)))]
    y[chosen] = rng.integers(0, num_classes, size=len(chosen))
    return y


@gin.configurable(module="tfmeta.complexity")
def task_arrays(spec: str, examples: int = 1000, seed: int = 0, data_dir=None):
    """A named real task as ``(x, y)``: float32 ``[N, 28, 28, 1]`` in [0, 1]
    and int32 labels.

    Tasks (``spec``; ``"name@k"`` takes the examples from block ``k`` of the
    train split, i.e. indices ``k * BLOCK ..``):

    * ``"mnist"``: the first ``examples`` MNIST training images of block 0;
    * ``"fashion_mnist"``: the same from Fashion-MNIST;
    * ``"fashion_mnist_inverted"``: Fashion-MNIST with ``1 - x`` (the
      paper's "ifashion");
    * ``"mnist_random"``: MNIST images of block 1 with every label drawn
      uniformly at random (seeded by ``seed``); no image is shared with
      ``"mnist"``;
    * ``"mnist_0-4"``: the first ``examples`` block-2 MNIST images of digits
      0-4 (a 5-class sub-task of ``"mnist"`` on other images);
    * ``"omniglot"``: ``examples // 20`` Omniglot characters drawn at random
      (seeded by ``seed`` and the block) from all 50 alphabets, all 20
      drawings of each, labels ``0..examples//20 - 1`` (the character);
      grey 28x28, Lanczos-resized, inverted so strokes are bright on a dark
      ground like MNIST (``tfmeta.tasks.omniglot.omniglot_arrays``).

    The order is TFDS's (MNIST's is already mixed); training code shuffles.

    Example::

        x, y = task_arrays("omniglot", examples=1000)    # 50 characters x 20
        x.shape, int(y.max()) + 1                        # (1000, 28, 28, 1), 50
    """
    name, dataset, block, _ = _parse(spec)
    examples = int(examples)
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    if name == "omniglot":
        images, labels = _omniglot(data_dir)
        characters = examples // OMNIGLOT_DRAWINGS
        if characters < 2:
            raise ValueError(
                f"omniglot needs examples >= {2 * OMNIGLOT_DRAWINGS} (20 drawings per "
                f"character), got {examples}"
            )
        rng = np.random.default_rng([int(seed), block, 0x0A1])
        chosen = rng.choice(int(labels.max()) + 1, size=characters, replace=False)
        index = np.concatenate([np.flatnonzero(labels == c) for c in chosen])
        remap = np.full(int(labels.max()) + 1, -1, np.int32)
        remap[chosen] = np.arange(characters, dtype=np.int32)
        x, y = images[index], remap[labels[index]]
        order = np.random.default_rng([int(seed), block, 0x0A2]).permutation(len(x))
        x, y = x[order], y[order]
    else:
        images, labels = _train_split(dataset, data_dir)
        start = block * BLOCK
        if start >= len(images):
            raise ValueError(
                f"task {spec!r}: block {block} starts at {start}, past the "
                f"{len(images)} training images; use a block < {len(images) // BLOCK}"
            )
        stop = min(len(images), start + BLOCK)
        x, y = images[start:stop], labels[start:stop]
        if name == "mnist_0-4":
            keep = y < 5
            x, y = x[keep], y[keep]
        if examples > len(x):
            raise ValueError(
                f"task {spec!r} has only {len(x)} examples in its block; ask for fewer"
            )
        x, y = x[:examples], y[:examples]
        if name == "mnist_random":
            y = relabel(y, 1.0, 10, seed=int(seed) * 1000 + block)
    x = x.astype(np.float32) / 255.0
    if name == "fashion_mnist_inverted":
        x = 1.0 - x
    return x, np.asarray(y, np.int32)


def _default_recipe(weight_decay, **overrides):
    """SGD lr 0.1 with decoupled weight decay ``2 gamma`` (= the gradient of the
    penalty ``gamma ||w||^2`` of ``beta = 2 lam^2 gamma``), batch 32, training
    loss threshold 0.1."""
    base = dict(
        optimizer=functools.partial(sgd, learning_rate=0.1, weight_decay=2.0 * weight_decay),
        steps=20000, batch_size=32, loss_threshold=0.1, eval_every=10, seed=0,
    )
    base.update(overrides)
    return TrainingRecipe(**base)


def _write(output_dir, name, payload):
    if output_dir is None:
        return None
    path = pathlib.Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, str):
        path.write_text(payload)
    else:
        path.write_text(json.dumps(payload, indent=2, default=_json_default))
    return path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return repr(value)


def _recipe_dict(recipe):
    out = dataclasses.asdict(recipe)
    opt = recipe.optimizer
    if isinstance(opt, functools.partial):
        out["optimizer"] = f"{getattr(opt.func, '__name__', opt.func)}({opt.keywords})"
    else:
        out["optimizer"] = repr(opt)
    return out


def _within_groups(groups, a, b):
    """Mean Spearman rho of ``a`` vs ``b`` within each group (NaN groups skipped)."""
    rhos = [spearman(a[groups == g], b[groups == g]) for g in np.unique(groups)]
    rhos = [r for r in rhos if np.isfinite(r)]
    return float(np.mean(rhos)) if rhos else float("nan")


def _stats(values):
    v = np.asarray(values, np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                min=float(v.min()), max=float(v.max()))


# --------------------------------------------------------------------------
# figure 1 (left): random labels


@gin.configurable(module="tfmeta.complexity", denylist=["output_dir"])
def relabel_experiment(
    output_dir=None,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    dataset: str = "mnist",
    examples: int = 1000,
    model_fn: Callable = mlp_classifier,
    recipe: Optional[TrainingRecipe] = None,
    lam: float = 0.1,
    weight_decay: float = 5e-4,
    fisher_samples: Optional[int] = None,
    fisher_batch_size: int = 100,
    sensitivity_lams: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    sensitivity_weight_decays: Sequence[float] = (1e-4, 5e-4, 2e-3),
    plot: bool = True,
    data_dir=None,
    log: Optional[Callable[[str], None]] = _print,
) -> dict:
    """Complexity and time to converge vs. the fraction of random labels.

    For every fraction ``f`` and seed: ``round(f N)`` training labels of the
    ``examples``-example subset of ``dataset`` are replaced by uniform random
    ones (:func:`relabel`, seeded), a fresh ``model_fn(num_classes=10)``
    (seeded) is trained with ``recipe`` (seed = the run's seed) until the
    training loss (inference mode, all examples) is <= its threshold, and
    ``C_beta`` (``beta = 2 lam^2 gamma``, ``gamma = weight_decay``, Fisher on
    ``fisher_samples`` examples, labels sampled from the model) is measured at
    the result on the same (relabelled) training set.

    Reported: per-run rows, per-fraction mean/std of complexity and steps,
    Spearman's rho between complexity and steps over all runs (the goal is
    >= 0.9), between the per-fraction means, and of each with the fraction;
    the Kramers fit of eq. 16, ``log(steps) = a + b C`` (least squares over
    all runs, ``b = 1/D``) with its R^2; and rho recomputed for every
    ``(lam, gamma)`` of the sensitivity grid from the same trained models and
    Fisher diagonals (no retraining), plus the dataset-total convention
    (``reduction="sum"``).

    The default recipe is SGD lr 0.1 with decoupled weight decay
    ``2 * weight_decay`` (the gradient of ``gamma ||w||^2``, so training
    minimizes the potential whose ``beta`` is used), batch 32, threshold
    0.1, budget 20000 steps, checks every 10 steps.

    Example::

        out = relabel_experiment("runs/relabel", seeds=(0, 1, 2))
        out["spearman"]["complexity_vs_steps"], out["levels"]
    """
    began = time.perf_counter()
    recipe = recipe or _default_recipe(weight_decay)
    beta, lam = resolve_beta(None, lam, weight_decay)
    x, y_true = task_arrays(dataset, examples, seed=0, data_dir=data_dir)
    num_classes = int(y_true.max()) + 1
    runs, cache = [], []
    for seed in seeds:
        for fraction in fractions:
            t0 = time.perf_counter()
            y = relabel(y_true, fraction, num_classes, seed=seed)
            run_recipe = dataclasses.replace(recipe, seed=int(seed))
            result = train((x, y), run_recipe,
                           model_fn=lambda: model_fn(num_classes=num_classes))
            t1 = time.perf_counter()
            c = complexity(result.model, (x, y), beta, lam, fisher_samples=fisher_samples,
                           batch_size=fisher_batch_size, seed=int(seed))
            t2 = time.perf_counter()
            row = dict(
                fraction=float(fraction), seed=int(seed),
                steps=int(result.steps), converged=bool(result.converged),
                final_loss=float(result.final_loss),
                complexity=c.total, loss=c.loss, weight_term=c.weight_term,
                curvature_term=c.curvature_term, fisher_trace=c.fisher.trace,
                weight_sq_norm=c.weight_sq_norm, num_params=c.num_params,
                random_labels=int(np.sum(y != y_true)),
                train_seconds=t1 - t0, complexity_seconds=t2 - t1,
            )
            runs.append(row)
            cache.append((c.loss, c.weight_sq_norm, c.fisher.flat(), len(x)))
            _say(log, f"f={fraction:.2f} seed={seed}: {row['steps']} steps "
                      f"(converged {row['converged']}), C={c.total:.4f} "
                      f"[L {c.loss:.3f} + W {c.weight_term:.4f} + K {c.curvature_term:.4f}] "
                      f"({t1 - t0:.1f}+{t2 - t1:.1f} s)")
    if not all(r["converged"] for r in runs):
        _say(log, "warning: some runs did not reach the loss threshold within the budget; "
                  "their steps are the budget (raise recipe.steps)")
    comp = np.array([r["complexity"] for r in runs])
    steps = np.array([r["steps"] for r in runs], np.float64)
    frac = np.array([r["fraction"] for r in runs])
    levels = []
    for f in fractions:
        sel = frac == float(f)
        levels.append(dict(fraction=float(f), complexity=_stats(comp[sel]),
                           steps=_stats(steps[sel]),
                           weight_term=_stats([r["weight_term"] for r, s in zip(runs, sel) if s]),
                           curvature_term=_stats([r["curvature_term"] for r, s in zip(runs, sel) if s])))
    mean_c = [lv["complexity"]["mean"] for lv in levels]
    mean_s = [lv["steps"]["mean"] for lv in levels]
    slope, intercept = np.polyfit(comp, np.log(steps), 1)
    r = np.corrcoef(comp, np.log(steps))[0, 1]

    def rho_for(lam_, gamma_, reduction="mean"):
        beta_ = 2.0 * lam_**2 * gamma_
        totals = []
        for loss, sq, fisher, n in cache:
            if reduction == "sum":
                loss, fisher = loss * n, fisher * n
            totals.append(complexity_terms(loss, sq, fisher, beta_, lam_)[3])
        return spearman(totals, steps)

    sensitivity = [dict(lam=float(lm), weight_decay=float(g), rho=rho_for(lm, g))
                   for lm in sensitivity_lams for g in sensitivity_weight_decays]
    out = dict(
        experiment="relabel",
        settings=dict(
            dataset=dataset, examples=int(examples), fractions=[float(f) for f in fractions],
            seeds=[int(s) for s in seeds], lam=lam, weight_decay=weight_decay, beta=beta,
            fisher_samples=fisher_samples, recipe=_recipe_dict(recipe),
            num_params=runs[0]["num_params"], model=repr(model_fn),
        ),
        runs=runs,
        levels=levels,
        spearman=dict(
            complexity_vs_steps=spearman(comp, steps),
            level_means=spearman(mean_c, mean_s),
            fraction_vs_steps=spearman(frac, steps),
            fraction_vs_complexity=spearman(frac, comp),
            sum_reduction=rho_for(lam, weight_decay, "sum"),
            within_fraction=_within_groups(frac, comp, steps),
        ),
        kramers_fit=dict(slope=float(slope), intercept=float(intercept),
                         r2=float(r * r), inverse_slope_D=float(1.0 / slope) if slope else None),
        sensitivity=sensitivity,
        all_converged=all(rr["converged"] for rr in runs),
        seconds=time.perf_counter() - began,
    )
    from tfmeta.complexity.plot import plot_relabel

    return _finish(out, output_dir, plot and (lambda path: plot_relabel(out, path)),
                   "relabel.png", relabel_markdown, log)


def _finish(out, output_dir, plot_fn, figure_name, markdown, log):
    """Write an experiment's figure, results.json and summary.md; print the summary."""
    if output_dir is not None:
        if plot_fn:
            out["figure"] = str(plot_fn(pathlib.Path(output_dir) / figure_name))
        _write(output_dir, "results.json", out)
        _write(output_dir, "summary.md", markdown(out))
    _say(log, markdown(out))
    return out


def relabel_markdown(out) -> str:
    """Markdown tables of a :func:`relabel_experiment` result."""
    s = out["settings"]
    lines = [
        f"Random labels on {s['examples']} {s['dataset']} training examples, seeds "
        f"{s['seeds']}, lam {s['lam']}, gamma {s['weight_decay']} (beta {s['beta']:.3g}).",
        "",
        "| fraction random | C_beta mean ± std | weight term | curvature term | steps mean ± std (min-max) |",
        "|---|---|---|---|---|",
    ]
    for lv in out["levels"]:
        c, st = lv["complexity"], lv["steps"]
        lines.append(
            f"| {lv['fraction']:.2f} | {c['mean']:.4f} ± {c['std']:.4f} | "
            f"{lv['weight_term']['mean']:.4f} | {lv['curvature_term']['mean']:.4f} | "
            f"{st['mean']:.0f} ± {st['std']:.0f} ({st['min']:.0f}-{st['max']:.0f}) |"
        )
    sp, kf = out["spearman"], out["kramers_fit"]
    lines += [
        "",
        f"Spearman rho(C, steps) over all {len(out['runs'])} runs: "
        f"**{sp['complexity_vs_steps']:.3f}**; over the level means: {sp['level_means']:.3f}; "
        f"rho(fraction, steps) {sp['fraction_vs_steps']:.3f}, rho(fraction, C) "
        f"{sp['fraction_vs_complexity']:.3f}; dataset-total convention: "
        f"{sp['sum_reduction']:.3f}"
        + (f"; within a fraction (across seeds, mean): {sp['within_fraction']:.3f}."
           if "within_fraction" in sp else "."),
        f"Kramers fit log(steps) = {kf['intercept']:.2f} + {kf['slope']:.2f} C: "
        f"R^2 = {kf['r2']:.3f}.",
        f"All runs converged: {out['all_converged']}. Time: {out['seconds']:.0f} s.",
    ]
    if out.get("sensitivity"):
        lams = sorted({e["lam"] for e in out["sensitivity"]})
        gammas = sorted({e["weight_decay"] for e in out["sensitivity"]})
        table = {(e["lam"], e["weight_decay"]): e["rho"] for e in out["sensitivity"]}
        lines += ["", "rho(C, steps) for other (lam, gamma), same trained models:", "",
                  "| lam \\ gamma | " + " | ".join(f"{g:g}" for g in gammas) + " |",
                  "|---|" + "---|" * len(gammas)]
        for lm in lams:
            lines.append(f"| {lm:g} | " + " | ".join(
                f"{table[(lm, g)]:.3f}" for g in gammas) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# figure 2: reachability


@gin.configurable(module="tfmeta.complexity", denylist=["output_dir"])
def reachability_experiment(
    output_dir=None,
    tasks: Sequence[str] = ("mnist", "fashion_mnist", "omniglot", "mnist_random"),
    examples: int = 1000,
    model_fn: Callable = mlp_classifier,
    recipe: Optional[TrainingRecipe] = None,
    finetune_recipe: Optional[TrainingRecipe] = None,
    lam: float = 0.1,
    weight_decay: float = 5e-4,
    fisher_samples: Optional[int] = None,
    fisher_batch_size: int = 100,
    seed: int = 0,
    plot: bool = True,
    data_dir=None,
    log: Optional[Callable[[str], None]] = _print,
) -> dict:
    """Reachability matrix between named real tasks (figure 2).

    Every task (:func:`task_arrays`, ``examples`` each) gets its own head
    (``heads="per_task"`` of :func:`~tfmeta.complexity.reachability_matrix`):
    fine-tuning from source ``s`` to target ``t`` replaces the source model's
    head by a fresh one with ``t``'s classes (also on the diagonal). Unions
    share labels only within a label space (``TASKS``: ``mnist``,
    ``mnist_random`` and ``mnist_0-4`` are all digits), otherwise the label
    sets are disjoint. Defaults: the recipe of :func:`relabel_experiment` for
    pretraining and unions, the same for fine-tuning with a 10000-step budget.

    Writes ``reachability.png`` (colour: distance; text: fine-tuning steps;
    row labels: steps from scratch), ``results.json``, ``summary.md``.

    Example::

        out = reachability_experiment("runs/reach", tasks=("mnist", "fashion_mnist"))
        out["steps"], out["distance"], out["spearman_distance_steps"]
    """
    began = time.perf_counter()
    recipe = recipe or _default_recipe(weight_decay, seed=seed)
    finetune_recipe = finetune_recipe or dataclasses.replace(recipe, steps=10000)
    data = {t: task_arrays(t, examples, seed=seed, data_dir=data_dir) for t in tasks}
    spaces = {t: label_space(t) for t in tasks}
    reach = reachability_matrix(
        data, model_fn, recipe, finetune_recipe=finetune_recipe, lam=lam,
        weight_decay=weight_decay,
        complexity_kwargs=dict(fisher_samples=fisher_samples, batch_size=fisher_batch_size),
        heads="per_task", label_spaces=spaces, log=log,
    )
    out = dict(experiment="reachability",
               settings=dict(tasks=list(tasks), examples=int(examples), lam=lam,
                             weight_decay=weight_decay, seed=int(seed),
                             fisher_samples=fisher_samples, recipe=_recipe_dict(recipe),
                             finetune_recipe=_recipe_dict(finetune_recipe),
                             model=repr(model_fn)),
               **reach.to_dict())
    # Figure 1 (right) across tasks: complexity vs. steps from scratch.
    out["spearman_complexity_scratch_steps"] = spearman(
        [reach.complexity[t].total for t in reach.names], reach.scratch_steps())
    out["seconds"] = time.perf_counter() - began
    title = (f"fine-tuning steps to loss {finetune_recipe.loss_threshold} "
             f"(budget {finetune_recipe.steps})")
    _finish(out, output_dir, plot and (lambda path: plot_reachability(reach, path, title=title)),
            "reachability.png", reachability_markdown, log)
    out["_reachability"] = reach
    return out


def reachability_markdown(out) -> str:
    """Markdown tables of a :func:`reachability_experiment` result."""
    names = out["names"]
    lines = ["Fine-tuning steps to the loss threshold (rows: target, columns: source; "
             "n.c. = not converged), with d(source -> target) in brackets:", "",
             "| target \\ source | " + " | ".join(names) + " | from scratch |",
             "|---|" + "---|" * (len(names) + 1)]
    for ti, t in enumerate(names):
        cells = []
        for si in range(len(names)):
            st = out["steps"][ti][si]
            cells.append(f"{'n.c.' if st is None else st} ({out['distance'][ti][si]:+.3f})")
        scratch = out["scratch_steps"][t]
        lines.append(f"| **{t}** | " + " | ".join(cells)
                     + f" | {'n.c.' if scratch is None else scratch} |")
    if "total_distance" in out:
        lines += ["", "Size-weighted distance (N_u C(S u T) - N_s C(S)) / N_t "
                  "(`Reachability.total_distance`):", "",
                  "| target \\ source | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for ti, t in enumerate(names):
            lines.append(f"| **{t}** | " + " | ".join(
                f"{v:+.3f}" for v in out["total_distance"][ti]) + " |")
    lines += ["", "Steps relative to the target's steps from scratch (< 1: the source "
              "helps):", "",
              "| target \\ source | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for ti, t in enumerate(names):
        lines.append(f"| **{t}** | " + " | ".join(
            f"{v:.2f}" for v in out["relative_steps"][ti]) + " |")
    lines += ["", "| task | classes | C_beta | loss | weight term | curvature term | "
              "steps from scratch |", "|---|---|---|---|---|---|---|"]
    for t in names:
        c = out["complexity"][t]
        lines.append(f"| {t} | {out['num_classes'][t]} | {c['total']:.4f} | {c['loss']:.3f} | "
                     f"{c['weight_term']:.4f} | {c['curvature_term']:.4f} | "
                     f"{out['scratch_steps'][t]} |")
    if "spearman_complexity_scratch_steps" in out:
        lines += ["", "Spearman rho(C_beta, steps from scratch) across the tasks: "
                  f"{out['spearman_complexity_scratch_steps']:.3f}."]
    word = {True: "yes", False: "no", None: "tie"}
    lines += ["", "| pair a, b | d(a->b) | d(b->a) | steps a->b | steps b->a | "
              "smaller d = fewer steps? | relative a->b | relative b->a | "
              "smaller d = smaller relative? |", "|---|---|---|---|---|---|---|---|---|"]
    for row in out["asymmetry"]:
        lines.append(f"| {row['a']}, {row['b']} | {row['distance_ab']:+.4f} | "
                     f"{row['distance_ba']:+.4f} | {row['steps_ab']} | {row['steps_ba']} | "
                     f"{word[row['agrees']]} | {row['relative_ab']:.2f} | "
                     f"{row['relative_ba']:.2f} | {word[row['agrees_relative']]} |")
    agree = [r["agrees"] for r in out["asymmetry"] if r["agrees"] is not None]
    agree_rel = [r["agrees_relative"] for r in out["asymmetry"]
                 if r["agrees_relative"] is not None]
    within = out["spearman_within_target"]
    lines += [
        "",
        f"Spearman rho(distance, steps) over the {len(names) * (len(names) - 1)} "
        f"off-diagonal pairs: **{out['spearman_distance_steps']:.3f}**; "
        f"rho(distance, steps relative to scratch): "
        f"{out['spearman_distance_relative_steps']:.3f}"
        + (f"; size-weighted distance vs. steps: {out['spearman_total_distance_steps']:.3f}."
           if "spearman_total_distance_steps" in out else "."),
        "Within each target (which source is fastest): "
        + ", ".join(f"{k} {v:.2f}" for k, v in within.items()) + ".",
        f"Pairs whose smaller distance is the faster direction: {sum(agree)}/{len(agree)} "
        f"(raw steps), {sum(agree_rel)}/{len(agree_rel)} (relative to scratch). "
        f"Time: {out['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# ranking initializations


@gin.configurable(module="tfmeta.complexity", denylist=["output_dir"])
def ranking_experiment(
    output_dir=None,
    target: str = "mnist",
    sources: Sequence[str] = ("mnist@3", "fashion_mnist", "omniglot", "mnist_random"),
    initializations: Optional[Mapping[str, str]] = None,
    initialization_baselines: bool = True,
    scratch: bool = True,
    examples: int = 1000,
    model_fn: Callable = mlp_classifier,
    recipe: Optional[TrainingRecipe] = None,
    finetune_recipe: Optional[TrainingRecipe] = None,
    finetune_seeds: Optional[Sequence[int]] = (0, 1, 2),
    lam: float = 0.1,
    weight_decay: float = 5e-4,
    fisher_samples: Optional[int] = None,
    fisher_batch_size: int = 100,
    seed: int = 0,
    plot: bool = True,
    data_dir=None,
    log: Optional[Callable[[str], None]] = _print,
) -> dict:
    """Rank candidate initializations of ``target`` by predicted ease and by
    measured fine-tuning steps.

    Candidates: ``"scratch"`` (a fresh ``model_fn`` model), one model trained
    from scratch (``recipe``) on each of ``sources``, and each exported
    initialization of ``initializations`` (``{name: export path}``, loaded
    with ``tfmeta.export.load_initialization(path, num_classes=..,
    head="reset")``; it must take 28x28x1 inputs and end in a Dense head),
    with, if ``initialization_baselines``, a random initialization of the
    same architecture (``"<name>:random"``, ``keras.models.clone_model``
    under the seed), its own from-scratch baseline. Every candidate's head is replaced by a fresh one with the target's
    classes, then fine-tuned on the target with ``finetune_recipe`` (steps
    to the loss threshold), once per seed of ``finetune_seeds`` (the seed
    draws the new head and the batch order; non-converged runs count as the
    budget + 1); the measured cost is the mean over those seeds.

    Predictors (lower = predicted easier), each compared with the measured
    steps by Spearman's rho:

    * ``"distance"``: the static distance ``d(source -> target) =
      C(source u target) - C(source)`` (both at from-scratch minima, labels
      joined as in :func:`reachability_experiment`); for ``"scratch"``,
      ``d(empty -> target) = C(target)`` (``C`` of the empty task is 0: the
      optimal posterior is the prior). Undefined for exported
      initializations (their training data is not a task here).
    * ``"potential"``: ``C_beta(target; w)`` at the candidate's weights with
      the fresh head (:func:`~tfmeta.complexity.rank_initializations`), a
      heuristic reading of section 6.

    Example::

        out = ranking_experiment("runs/rank", target="mnist",
                                 initializations={"leap": "runs/leap/initialization"})
        out["predictors"]["distance"]["spearman"]
    """
    from tfmeta.export import load_initialization, read_export_info

    began = time.perf_counter()
    recipe = recipe or _default_recipe(weight_decay, seed=seed)
    finetune_recipe = finetune_recipe or dataclasses.replace(recipe, steps=10000)
    beta, lam = resolve_beta(None, lam, weight_decay)
    ckw = dict(fisher_samples=fisher_samples, batch_size=fisher_batch_size)
    names = [target, *sources]
    if len(set(names)) != len(names):
        raise ValueError(f"target and sources must be distinct tasks, got {names}")
    data = {t: task_arrays(t, examples, seed=seed, data_dir=data_dir) for t in names}
    classes = {t: int(data[t][1].max()) + 1 for t in names}
    spaces = {t: label_space(t) for t in names}
    n_target = classes[target]

    def fresh(k):
        return lambda: model_fn(num_classes=int(k))

    target_run = train(data[target], recipe, model_fn=fresh(n_target))
    c_target = complexity(target_run.model, data[target], beta, lam, seed=recipe.seed, **ckw)
    _say(log, f"target {target}: {target_run.steps} steps from scratch, C = {c_target.total:.4f}")
    candidates, distance, details = {}, {}, {}
    if scratch:
        keras.utils.set_random_seed(recipe.seed)
        candidates["scratch"] = model_fn(num_classes=n_target)
        distance["scratch"] = c_target.total
        details["scratch"] = dict(source_complexity=0.0, union_complexity=c_target.total)
    for s in sources:
        run_s = train(data[s], recipe, model_fn=fresh(classes[s]))
        c_s = complexity(run_s.model, data[s], beta, lam, seed=recipe.seed, **ckw)
        both, k_union = _union_pair(data, s, target, spaces, classes, recipe.seed)
        run_u = train(both, recipe, model_fn=fresh(k_union))
        c_u = complexity(run_u.model, both, beta, lam, seed=recipe.seed, **ckw)
        candidates[s] = run_s.model
        distance[s] = c_u.total - c_s.total
        details[s] = dict(source_complexity=c_s.total, union_complexity=c_u.total,
                          source_steps=int(run_s.steps), source_converged=bool(run_s.converged),
                          union_steps=int(run_u.steps), union_converged=bool(run_u.converged))
        _say(log, f"source {s}: C = {c_s.total:.4f}, C(u {target}) = {c_u.total:.4f}, "
                  f"d = {distance[s]:+.4f}")
    for name, path in (initializations or {}).items():
        info = read_export_info(path)
        if tuple(info["input_shape"]) != tuple(data[target][0].shape[1:]):
            raise ValueError(
                f"initialization {name!r} at {path} takes inputs of shape "
                f"{tuple(info['input_shape'])}, but the target {target!r} has "
                f"{tuple(data[target][0].shape[1:])}; export a model with a 28x28x1 input"
            )
        candidates[name] = load_initialization(path, num_classes=n_target, head="reset")
        details[name] = dict(export=str(path), metadata=info.get("metadata"),
                             created_utc=info.get("created_utc"),
                             model_sha256=info.get("files", {}).get(info.get("model_file")),
                             params=int(candidates[name].count_params()))
        if initialization_baselines:
            keras.utils.set_random_seed(recipe.seed)
            baseline = keras.models.clone_model(candidates[name])  # fresh initializers
            baseline.build(candidates[name].input_shape)
            candidates[f"{name}:random"] = baseline
            details[f"{name}:random"] = dict(architecture_of=name)
    if len(candidates) < 2:
        raise ValueError("ranking needs at least two candidates (scratch, sources, "
                         "initializations)")
    seeds = [int(x) for x in (finetune_seeds or (finetune_recipe.seed,))]
    per_seed = []
    for fs in seeds:
        per_seed.append(rank_initializations(
            data[target], candidates, dataclasses.replace(finetune_recipe, seed=fs),
            lam=lam, weight_decay=weight_decay, complexity_kwargs=ckw, num_classes=n_target,
        ))
        _say(log, f"fine-tuning seed {fs}: " + ", ".join(
            f"{k} {st if ok else 'n.c.'}" for k, st, ok in
            zip(per_seed[-1].names, per_seed[-1].steps, per_seed[-1].converged)))
    cand_names = list(per_seed[0].names)
    censored = np.array([np.where(r.converged, r.steps, finetune_recipe.steps + 1)
                         for r in per_seed], np.float64)       # [seeds, candidates]
    measured = censored.mean(axis=0)
    potential = np.mean([r.predicted for r in per_seed], axis=0)
    with_distance = [k for k in cand_names if k in distance]
    d_pred = [distance[k] for k in with_distance]
    d_steps = [measured[cand_names.index(k)] for k in with_distance]
    predictors = dict(
        distance=dict(names=with_distance, predicted=d_pred,
                      predicted_rank=rankdata(d_pred).tolist(),
                      spearman=spearman(d_pred, d_steps)),
        potential=dict(names=cand_names, predicted=potential.tolist(),
                       predicted_rank=rankdata(potential).tolist(),
                       spearman=spearman(potential, measured)),
    )
    measured_rank = rankdata(measured)
    rows = []
    for i, k in enumerate(cand_names):
        rows.append(dict(name=k, steps=float(measured[i]),
                         steps_std=float(censored[:, i].std(ddof=1)) if len(seeds) > 1 else 0.0,
                         steps_per_seed=censored[:, i].astype(int).tolist(),
                         converged=bool(all(r.converged[i] for r in per_seed)),
                         measured_rank=float(measured_rank[i]),
                         distance=distance.get(k), potential=float(potential[i]),
                         **{f"detail_{a}": b for a, b in details.get(k, {}).items()}))
    out = dict(
        experiment="ranking",
        settings=dict(target=target, sources=list(sources),
                      initializations=dict(initializations or {}), examples=int(examples),
                      lam=lam, weight_decay=weight_decay, seed=int(seed),
                      fisher_samples=fisher_samples, recipe=_recipe_dict(recipe),
                      finetune_recipe=_recipe_dict(finetune_recipe), model=repr(model_fn),
                      finetune_seeds=seeds),
        target_scratch_steps=int(target_run.steps),
        target_complexity=c_target.total,
        candidates=rows,
        predictors=predictors,
        max_steps=int(finetune_recipe.steps),
        seconds=time.perf_counter() - began,
    )
    from tfmeta.complexity.plot import plot_ranking

    return _finish(out, output_dir, plot and (lambda path: plot_ranking(out, path)),
                   "ranking.png", ranking_markdown, log)


def ranking_markdown(out) -> str:
    """Markdown table of a :func:`ranking_experiment` result."""
    s = out["settings"]
    seeds = s.get("finetune_seeds", [])
    lines = [f"Target {s['target']} ({s['examples']} examples); fine-tuning steps to the "
             f"loss threshold (budget {out['max_steps']}), new head for every candidate, "
             f"mean ± std over fine-tuning seeds {seeds}:", "",
             "| candidate | steps (mean ± std) | per seed | measured rank | "
             "d(source -> target) | potential C(target; w) |", "|---|---|---|---|---|---|"]
    for row in out["candidates"]:
        d = "n/a" if row["distance"] is None else f"{row['distance']:+.4f}"
        per = ", ".join(str(v) for v in row.get("steps_per_seed", []))
        lines.append(f"| {row['name']} | {row['steps']:.0f} ± {row.get('steps_std', 0):.0f} | "
                     f"{per} | {row['measured_rank']:g} | {d} | {row['potential']:.4f} |")
    p = out["predictors"]
    lines += ["", f"Target from scratch (pretraining run): {out['target_scratch_steps']} steps, "
              f"C(target) = {out['target_complexity']:.4f}.",
              "", f"Spearman rho(predicted, measured steps): distance "
              f"**{p['distance']['spearman']:.3f}** (over {len(p['distance']['names'])} "
              f"candidates), potential **{p['potential']['spearman']:.3f}** (over "
              f"{len(p['potential']['names'])}). Time: {out['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# entry point


@gin.configurable(module="tfmeta.complexity", denylist=["output_dir"])
def run(output_dir, experiment: Callable = gin.REQUIRED):
    """Run the gin-selected experiment (``run.experiment = @relabel_experiment``,
    ``@reachability_experiment`` or ``@ranking_experiment``) into ``output_dir``.

    Example (gin)::

        tfmeta.complexity.run.experiment = @tfmeta.complexity.relabel_experiment
    """
    if not callable(experiment):
        raise TypeError(
            "run.experiment must be an experiment function, e.g. "
            "'run.experiment = @relabel_experiment' (no parentheses)"
        )
    os.makedirs(output_dir, exist_ok=True)
    return experiment(output_dir=output_dir)
