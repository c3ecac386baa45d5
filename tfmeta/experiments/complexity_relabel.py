"""Figure 1 (left) of Achille, Mbeng & Soatto on real data: random labels.

An MNIST subset with a growing fraction of randomly relabelled training
examples: the complexity ``C_beta`` of the trained model on its training set
and the SGD steps to a fixed training loss, over fractions and seeds, their
Spearman correlation, a Kramers fit ``log steps = a + b C`` (eq. 16) and a
sensitivity table over ``(lam, gamma)``. Run by ``tools/complexity.py``
with ``gin/complexity_relabel.gin``; numbers in docs/results.md.

Example::

    out = relabel_experiment("runs/relabel", fractions=(0, 0.5, 1), seeds=(0,),
                             examples=300)
    out["spearman"]["complexity_vs_steps"]
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from tfmeta.complexity import complexity, complexity_terms, spearman, train
from tfmeta.experiments.complexity_figures import plot_relabel
from tfmeta.experiments.complexity_run import CellStore, say
from tfmeta.experiments.complexity_settings import ComplexitySettings, with_settings
from tfmeta.experiments.complexity_tasks import relabel

__all__ = ["relabel_experiment", "relabel_markdown"]


def _within_groups(groups, a, b):
    """Mean Spearman rho of ``a`` vs ``b`` within each group (NaN groups skipped)."""
    rhos = [spearman(a[groups == g], b[groups == g]) for g in np.unique(groups)]
    rhos = [r for r in rhos if np.isfinite(r)]
    return float(np.mean(rhos)) if rhos else float("nan")


def _stats(values):
    v = np.asarray(values, np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                min=float(v.min()), max=float(v.max()))


@with_settings(ComplexitySettings)
def relabel_experiment(
    output_dir=None,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    dataset: str = "mnist",
    sensitivity_lams: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    sensitivity_weight_decays: Sequence[float] = (1e-4, 5e-4, 2e-3),
    resume: bool = False,
    *,
    settings: ComplexitySettings,
) -> dict:
    """Complexity and time to converge vs. the fraction of random labels.

    The other keyword parameters are the fields of
    :class:`~tfmeta.experiments.complexity_settings.ComplexitySettings`
    (``examples``, ``model_fn``, ``recipe``, ``plot``, ``data_dir``, ``log``,
    ``lam``, ``weight_decay``, ``fisher_samples``, ``fisher_batch_size``).

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
    0.1, budget 20000 steps, checks every 10 steps and, once the loss is
    within 2x of the threshold, every step (``fine_check_factor=2``): each
    run stops, and ``C_beta`` is measured, at the first step whose loss is
    under the threshold.

    Finished runs are checkpointed in ``output_dir/results.json`` (with the
    sensitivity grid's totals, not the Fisher diagonals); ``resume=True``
    continues an interrupted run from them.

    Example::

        out = relabel_experiment("runs/relabel", seeds=(0, 1, 2))
        out["spearman"]["complexity_vs_steps"], out["levels"]
    """
    began = time.perf_counter()
    recipe, model_fn, log = settings.recipe, settings.model_fn, settings.log
    beta, lam = settings.beta, settings.lam
    x, y_true = settings.task(dataset)
    num_classes = int(y_true.max()) + 1
    grid = [(float(lm), float(g)) for lm in sensitivity_lams for g in sensitivity_weight_decays]
    store = CellStore(output_dir, "relabel", resume, log)
    runs = []
    for seed in seeds:
        for fraction in fractions:
            key = f"f{float(fraction):g}_s{int(seed)}"
            if store.get(key) is not None:
                runs.append(store.get(key))
                continue
            t0 = time.perf_counter()
            y = relabel(y_true, fraction, num_classes, seed=seed)
            run_recipe = dataclasses.replace(recipe, seed=int(seed))
            result = train((x, y), run_recipe,
                           model_fn=lambda: model_fn(num_classes=num_classes))
            t1 = time.perf_counter()
            c = complexity(result.model, (x, y), beta, lam, seed=int(seed),
                           **settings.complexity_kwargs)
            t2 = time.perf_counter()
            fisher = c.fisher.flat()
            # rho for other (lam, gamma) and the dataset-total convention need
            # only these totals, so the Fisher diagonal is not kept
            totals = {f"{lm:g}_{g:g}": complexity_terms(c.loss, c.weight_sq_norm, fisher,
                                                        2.0 * lm**2 * g, lm)[3]
                      for lm, g in grid}
            sum_total = complexity_terms(c.loss * len(x), c.weight_sq_norm, fisher * len(x),
                                         beta, lam)[3]
            row = dict(
                fraction=float(fraction), seed=int(seed),
                steps=int(result.steps), converged=bool(result.converged),
                resolution=int(result.resolution), final_loss=float(result.final_loss),
                complexity=c.total, loss=c.loss, weight_term=c.weight_term,
                curvature_term=c.curvature_term, fisher_trace=c.fisher.trace,
                weight_sq_norm=c.weight_sq_norm, num_params=c.num_params,
                random_labels=int(np.sum(y != y_true)),
                train_seconds=t1 - t0, complexity_seconds=t2 - t1,
                sensitivity_totals=totals, sum_total=sum_total,
            )
            runs.append(store.put(key, row))
            say(log, f"f={fraction:.2f} seed={seed}: {row['steps']} steps "
                      f"(converged {row['converged']}), C={c.total:.4f} "
                      f"[L {c.loss:.3f} + W {c.weight_term:.4f} + K {c.curvature_term:.4f}] "
                      f"({t1 - t0:.1f}+{t2 - t1:.1f} s)")
    if not all(r["converged"] for r in runs):
        say(log, "warning: some runs did not reach the loss threshold within the budget; "
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

    sensitivity = [dict(lam=lm, weight_decay=g, rho=spearman(
        [r["sensitivity_totals"][f"{lm:g}_{g:g}"] for r in runs], steps)) for lm, g in grid]
    out = dict(
        experiment="relabel",
        settings=dict(
            dataset=dataset, fractions=[float(f) for f in fractions],
            seeds=[int(s) for s in seeds], num_params=runs[0]["num_params"],
            **settings.describe(),
        ),
        runs=runs,
        levels=levels,
        spearman=dict(
            complexity_vs_steps=spearman(comp, steps),
            level_means=spearman(mean_c, mean_s),
            fraction_vs_steps=spearman(frac, steps),
            fraction_vs_complexity=spearman(frac, comp),
            sum_reduction=spearman([r["sum_total"] for r in runs], steps),
            within_fraction=_within_groups(frac, comp, steps),
        ),
        kramers_fit=dict(slope=float(slope), intercept=float(intercept),
                         r2=float(r * r), inverse_slope_D=float(1.0 / slope) if slope else None),
        sensitivity=sensitivity,
        all_converged=all(rr["converged"] for rr in runs),
        cells=store.cells,
        seconds=time.perf_counter() - began,
    )
    return settings.write_outputs(out, output_dir, lambda path: plot_relabel(out, path),
                                  "relabel.png", relabel_markdown)


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
