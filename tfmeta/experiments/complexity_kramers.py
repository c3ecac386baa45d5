"""Figure 1 (centre) of Achille, Mbeng & Soatto on real data: Kramers' rate
(eq. 16) and the batch size.

Eq. 16 gives the rate of convergence ``1/tau = C exp(-Delta C_beta / D)``
with the diffusion constant ``D = k lr / B``. Trained from scratch,
``Delta C_beta`` is the complexity of the minimum reached (the prior's is
0), so::

    log tau = -log C + (B / (k lr)) C_beta      i.e.   log tau = a + b x,  x = C_beta B / lr

with two constants ``a = -log C`` and ``b = 1/k``. For every batch size,
fraction of random labels and seed, a fresh model is trained with SGD at a
fixed learning rate to the loss threshold (checked every step near it,
``fine_check_factor``), ``C_beta`` is measured there, and ``(a, b)`` are
fitted ONCE by least squares on the fit runs (``fit_seeds`` x
``fit_batch_sizes``); the other runs are predicted from their ``C_beta`` and
``B`` and compared with their measured steps (goal: within a factor 1.5 for
>= 80 % of them). A second, step-time-free check: ``a`` and ``b`` are also
fitted with ``x`` replaced by ``B / lr`` alone (``C`` dropped), to show what
the complexity adds. Runs are checkpointed (``resume=True`` continues).
Run by ``tools/complexity.py`` with ``gin/complexity_kramers.gin``; numbers
in docs/results.md.

Example::

    out = kramers_experiment("runs/kramers", batch_sizes=(16, 64), seeds=(0, 1),
                             fit_seeds=(0,), examples=300)
    out["heldout"]["within_1.5x"]
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import numpy as np

from tfmeta.complexity import complexity, train
from tfmeta.experiments.complexity_figures import plot_kramers
from tfmeta.experiments.complexity_run import CellStore, say
from tfmeta.experiments.complexity_settings import ComplexitySettings, with_settings
from tfmeta.experiments.complexity_tasks import relabel

__all__ = ["X_OF", "fit_kramers", "kramers_experiment", "kramers_markdown"]


#: The abscissa of each fit: eq. 16's ``Delta C / D`` up to ``k``
#: (``C_beta B / lr``), and ``B / lr`` alone (the complexity left out).
X_OF = {
    "kramers": lambda r: r["complexity"] * r["batch_size"] / r["learning_rate"],
    "batch_only": lambda r: r["batch_size"] / r["learning_rate"],
}

#: Ratios ``r = k / D0`` tried by :func:`fit_kramers_floor` (0: no lr/B part).
FLOOR_RATIOS = (0.0, *np.geomspace(1e-4, 1e4, 81))


def floor_x(r, ratio):
    """``C_beta / (1 + ratio lr / B)``: ``Delta C / D`` up to ``D0`` for
    ``D = D0 + k lr / B`` with ``ratio = k / D0``."""
    return r["complexity"] / (1.0 + ratio * r["learning_rate"] / r["batch_size"])


def fit_kramers_floor(rows):
    """Fit ``log steps = a + b C / (1 + ratio lr / B)`` (``D = D0 + k lr/B``,
    ``b = 1/D0``, ``ratio = k/D0``): least squares in ``(a, b)`` for every
    ratio of :data:`FLOOR_RATIOS`, the best kept. Returns ``(a, b, ratio)``.

    Example::

        a, b, ratio = fit_kramers_floor(out["runs"])
    """
    best = None
    log_steps = np.log([r["steps"] for r in rows])
    for ratio in FLOOR_RATIOS:
        a, b = fit_kramers([floor_x(r, ratio) for r in rows], [r["steps"] for r in rows])
        sse = float(np.sum((a + b * np.array([floor_x(r, ratio) for r in rows]) - log_steps) ** 2))
        if best is None or sse < best[0]:
            best = (sse, a, b, float(ratio))
    return best[1], best[2], best[3]


def fit_kramers(x, steps):
    """Least-squares ``log steps = a + b x``; returns ``(a, b)``.

    Example::

        a, b = fit_kramers(np.array([1.0, 2.0]), np.array([10.0, 100.0]))   # b = log 10
    """
    x = np.asarray(x, np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("the Kramers fit needs at least two runs with different x")
    b, a = np.polyfit(x, np.log(np.asarray(steps, np.float64)), 1)
    return float(a), float(b)


def _evaluate(rows, fit, x_of):
    """Predicted steps of ``rows`` under the fit, and the ratio to measured."""
    a, b = fit
    pred = np.exp(a + b * np.array([x_of(r) for r in rows]))
    meas = np.array([r["steps"] for r in rows], np.float64)
    ratio = np.maximum(pred / meas, meas / pred)
    return dict(predicted=pred.tolist(), ratio=ratio.tolist(),
                within_1_5x=float(np.mean(ratio <= 1.5)) if len(rows) else float("nan"),
                median_ratio=float(np.median(ratio)) if len(rows) else float("nan"))


@with_settings(ComplexitySettings)
def kramers_experiment(
    output_dir=None,
    batch_sizes: Sequence[int] = (8, 16, 32, 64, 128, 256),
    learning_rate: float = 0.1,
    fractions: Sequence[float] = (0.0, 0.5),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    fit_seeds: Sequence[int] = (0, 1),
    fit_batch_sizes: Optional[Sequence[int]] = (8, 32, 128),
    dataset: str = "mnist",
    resume: bool = False,
    *,
    settings: ComplexitySettings,
) -> dict:
    """Time to converge against batch size at a fixed learning rate, measured
    and predicted by eq. 16 with ``D = k lr / B`` (see the module docstring).

    The other keyword parameters are the fields of
    :class:`~tfmeta.experiments.complexity_settings.ComplexitySettings`
    (``examples``, ``model_fn``, ``recipe``, ``plot``, ``data_dir``, ``log``,
    ``lam``, ``weight_decay``, ``fisher_samples``, ``fisher_batch_size``).
    ``recipe`` (default :func:`default_recipe` with ``fine_check_factor=2``)
    gives the threshold, budget and weight decay; its batch size and learning
    rate are replaced by each run's ``B`` and ``learning_rate``. The fit runs
    are the runs with a seed in ``fit_seeds`` and (unless None) a batch size
    in ``fit_batch_sizes``; every other run is held out.
    """
    began = time.perf_counter()
    recipe, model_fn, log = settings.recipe, settings.model_fn, settings.log
    x, y_true = settings.task(dataset)
    num_classes = int(y_true.max()) + 1
    store = CellStore(output_dir, "kramers", resume, log)
    runs = []
    for fraction in fractions:
        for batch in batch_sizes:
            for seed in seeds:
                key = f"f{float(fraction):g}_b{int(batch)}_s{int(seed)}"
                row = store.get(key)
                if row is None:
                    t0 = time.perf_counter()
                    y = relabel(y_true, fraction, num_classes, seed=seed)
                    run_recipe = dataclasses.replace(
                        recipe, seed=int(seed), batch_size=int(batch),
                        optimizer=_with_learning_rate(recipe.optimizer, learning_rate))
                    result = train((x, y), run_recipe,
                                   model_fn=lambda: model_fn(num_classes=num_classes))
                    c = complexity(result.model, (x, y), settings.beta, settings.lam,
                                   seed=int(seed), **settings.complexity_kwargs)
                    row = store.put(key, dict(
                        fraction=float(fraction), batch_size=int(batch), seed=int(seed),
                        learning_rate=float(learning_rate), steps=int(result.steps),
                        converged=bool(result.converged), resolution=int(result.resolution),
                        final_loss=float(result.final_loss), complexity=c.total,
                        loss=c.loss, weight_term=c.weight_term,
                        curvature_term=c.curvature_term,
                        seconds=time.perf_counter() - t0))
                    say(log, f"f={fraction:.2f} B={batch} seed={seed}: {row['steps']} steps, "
                              f"C={row['complexity']:.4f} ({row['seconds']:.1f} s)")
                runs.append(row)
    if not all(r["converged"] for r in runs):
        say(log, "warning: some runs did not converge; their steps are the budget")
    fit_rows = [r for r in runs if r["seed"] in set(fit_seeds) and
                (fit_batch_sizes is None or r["batch_size"] in set(fit_batch_sizes))]
    held = [r for r in runs if r not in fit_rows]
    fits = {}
    for name, x_of in X_OF.items():
        a, b = fit_kramers([x_of(r) for r in fit_rows], [r["steps"] for r in fit_rows])
        fits[name] = dict(a=a, b=b, fit=_evaluate(fit_rows, (a, b), x_of),
                          heldout=_evaluate(held, (a, b), x_of))
    a, b, ratio = fit_kramers_floor(fit_rows)
    fits["kramers_floor"] = dict(a=a, b=b, ratio=ratio,
                                 D0=1.0 / b if b else None, k=ratio / b if b else None,
                                 fit=_evaluate(fit_rows, (a, b), lambda r: floor_x(r, ratio)),
                                 heldout=_evaluate(held, (a, b), lambda r: floor_x(r, ratio)))
    k = 1.0 / fits["kramers"]["b"] if fits["kramers"]["b"] else None
    out = dict(
        experiment="kramers",
        settings=dict(dataset=dataset, fractions=list(map(float, fractions)),
                      batch_sizes=list(map(int, batch_sizes)), learning_rate=float(learning_rate),
                      seeds=list(map(int, seeds)), fit_seeds=list(map(int, fit_seeds)),
                      fit_batch_sizes=(None if fit_batch_sizes is None
                                       else list(map(int, fit_batch_sizes))),
                      **settings.describe()),
        runs=runs,
        fit_runs=[runs.index(r) for r in fit_rows],
        fits=fits,
        D_constant_k=k,
        heldout={"within_1.5x": fits["kramers"]["heldout"]["within_1_5x"],
                 "within_1.5x_floor": fits["kramers_floor"]["heldout"]["within_1_5x"],
                 "count": len(held)},
        cells=store.cells,
        seconds=time.perf_counter() - began,
    )
    return settings.write_outputs(out, output_dir, lambda path: plot_kramers(out, path),
                                  "kramers.png", kramers_markdown)


def _with_learning_rate(factory, learning_rate):
    """``factory`` (an optimizer factory such as ``functools.partial(sgd, ...)``)
    with its learning rate replaced."""
    import functools

    if isinstance(factory, functools.partial):
        return functools.partial(factory.func, *factory.args,
                                 **{**factory.keywords, "learning_rate": float(learning_rate)})
    return functools.partial(factory, learning_rate=float(learning_rate))


def kramers_markdown(out) -> str:
    """Markdown tables of a :func:`kramers_experiment` result."""
    s = out["settings"]
    lines = [f"{s['dataset']}, {s['examples']} examples, lr {s['learning_rate']}, seeds "
             f"{s['seeds']} (fit on seeds {s['fit_seeds']}, batch sizes "
             f"{s['fit_batch_sizes']}); steps to the loss threshold, measured and predicted "
             "by eq. 16 (log steps = a + b C B / lr):", "",
             "| fraction random | batch | steps mean ± std | C_beta mean | predicted (eq. 16) | "
             "predicted (D = D0 + k lr/B) | predicted (B only) |", "|---|---|---|---|---|---|---|"]
    runs = out["runs"]
    pred = {name: [float(np.exp(out["fits"][name]["a"] + out["fits"][name]["b"] * x_of(r)))
                   for r in runs] for name, x_of in X_OF.items()}
    ff = out["fits"]["kramers_floor"]
    pred["kramers_floor"] = [float(np.exp(ff["a"] + ff["b"] * floor_x(r, ff["ratio"])))
                             for r in runs]
    for f in s["fractions"]:
        for bsz in s["batch_sizes"]:
            idx = [i for i, r in enumerate(runs) if r["fraction"] == f and r["batch_size"] == bsz]
            st = np.array([runs[i]["steps"] for i in idx], np.float64)
            lines.append(
                f"| {f:.2f} | {bsz} | {st.mean():.0f} ± "
                f"{st.std(ddof=1) if len(st) > 1 else 0:.0f} | "
                f"{np.mean([runs[i]['complexity'] for i in idx]):.4f} | "
                f"{np.mean([pred['kramers'][i] for i in idx]):.0f} | "
                f"{np.mean([pred['kramers_floor'][i] for i in idx]):.0f} | "
                f"{np.mean([pred['batch_only'][i] for i in idx]):.0f} |")
    fk, fb = out["fits"]["kramers"], out["fits"]["batch_only"]
    k_text = "n/a" if out["D_constant_k"] is None else f"{out['D_constant_k']:.4g}"
    lines += ["", f"Eq. 16 fit: a = {fk['a']:.3f}, b = {fk['b']:.4g} (k = 1/b = {k_text}); "
              f"held-out runs within 1.5x: **{fk['heldout']['within_1_5x']:.0%}** of "
              f"{out['heldout']['count']} (median ratio {fk['heldout']['median_ratio']:.2f}); "
              f"fit runs {fk['fit']['within_1_5x']:.0%}.",
              f"With a diffusion floor, D = D0 + k lr / B (ours): D0 = {ff['D0']:.4g}, "
              f"k = {ff['k']:.4g}, a = {ff['a']:.3f}; held-out within 1.5x "
              f"**{ff['heldout']['within_1_5x']:.0%}** (median ratio "
              f"{ff['heldout']['median_ratio']:.2f}).",
              f"Without C (log steps = a + b B / lr): held-out within 1.5x "
              f"{fb['heldout']['within_1_5x']:.0%} (median ratio "
              f"{fb['heldout']['median_ratio']:.2f}).",
              f"Time: {out['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
