"""PNG figures of the complexity experiments (matplotlib, Agg canvas).

Figures are experiment output, so they live here and not in the measurement
library ``tfmeta.complexity`` (which does not import matplotlib):

* :func:`plot_reachability`: heatmap of a
  :class:`~tfmeta.complexity.Reachability` (figure 2);
* :func:`plot_relabel`: complexity and steps vs. the fraction of random
  labels, and log-steps vs. complexity (figure 1, left);
* :func:`plot_ranking`: predicted vs. measured ease of candidate
  initializations;
* :func:`plot_kramers`: time to converge vs. batch size, measured and
  predicted by Kramers' rate (figure 1, centre);
* :func:`plot_prediction`: predicted vs. measured fine-tuning steps of the
  ``predict_steps`` predictor, one panel per (model, target).

All draw on a ``FigureCanvasAgg`` directly, so the global matplotlib backend
is left alone, write the PNG atomically and return the path written.

Example::

    plot_reachability(reach, "runs/reach/reachability.png")
"""

from __future__ import annotations

import os

import numpy as np

from tfmeta import atomic

__all__ = ["plot_kramers", "plot_prediction", "plot_ranking", "plot_reachability",
           "plot_relabel"]


def _save(fig, path, dpi):
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    with atomic.open_atomic(path) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return path


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_reachability(reach, path, title=None, cmap="viridis", dpi=120, scratch=True,
                      show_distance=True):
    """Save ``reach`` (a :class:`~tfmeta.complexity.Reachability`) as a PNG.

    Cell colour: static distance ``d(source -> target)`` (rows = target,
    columns = source, as in the paper's figure 2); annotation: fine-tuning
    steps to the loss threshold, "n.c." when it did not converge, and with
    ``show_distance`` the distance under it. With
    ``scratch``, each row label also gives the target's steps from scratch
    (``reach.pretraining``). Returns ``path``.

    Example::

        plot_reachability(reach, "runs/reach/reachability.png")
    """
    names = list(reach.names)
    n = len(names)
    size = max(3.5, 1.0 + 0.9 * n)
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    dist = np.asarray(reach.distance, np.float64)
    image = ax.imshow(dist, cmap=cmap)
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label("d(source -> target) = C(S u T) - C(S)")
    ax.set_xticks(range(n), labels=names, rotation=45, ha="right")
    rows = names
    if scratch and getattr(reach, "pretraining", None):
        rows = []
        for k in names:
            run = reach.pretraining.get(k)
            if run is None:
                rows.append(k)
            else:
                rows.append(f"{k}\n(scratch {run.steps if run.converged else 'n.c.'})")
    ax.set_yticks(range(n), labels=rows)
    ax.set_xlabel("source (pre-training)")
    ax.set_ylabel("target (fine-tuning)")
    finite = dist[np.isfinite(dist)]
    mid = 0.5 * (finite.min() + finite.max()) if finite.size else 0.0
    for t in range(n):
        for s in range(n):
            text = str(int(reach.steps[t, s])) if reach.converged[t, s] else "n.c."
            if t != s and show_distance:
                text += f"\nd={dist[t, s]:+.2f}"
            color = "black" if dist[t, s] > mid else "white"
            ax.text(s, t, text, ha="center", va="center", color=color, fontsize=8)
    ax.set_title(title or f"fine-tuning steps (budget {reach.max_steps})")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_relabel(result, path, dpi=100):
    """Figure 1 (left) from a
    :func:`~tfmeta.experiments.complexity_relabel.relabel_experiment`
    result: complexity and steps (mean and std over seeds) vs. the fraction
    of random labels (left), and log-steps vs. complexity for every run with
    the Kramers fit ``log(steps) = a + b C`` (right). Returns ``path``.

    Example::

        plot_relabel(relabel_experiment(None, seeds=(0,)), "relabel.png")
    """
    levels = result["levels"]
    frac = np.array([lv["fraction"] for lv in levels])
    c_mean = np.array([lv["complexity"]["mean"] for lv in levels])
    c_std = np.array([lv["complexity"]["std"] for lv in levels])
    s_mean = np.array([lv["steps"]["mean"] for lv in levels])
    s_std = np.array([lv["steps"]["std"] for lv in levels])
    fig = _figure(10, 4)
    ax = fig.add_subplot(1, 2, 1)
    ax.errorbar(frac, c_mean, yerr=c_std, marker="o", color="tab:blue", capsize=3,
                label="complexity C_beta")
    ax.set_xlabel("fraction of randomly relabelled training examples")
    ax.set_ylabel("C_beta (mean ± std over seeds)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.errorbar(frac, s_mean, yerr=s_std, marker="s", color="tab:red", capsize=3,
                 label="SGD steps to threshold")
    ax2.set_ylabel("SGD steps to loss threshold", color="tab:red")
    settings = result["settings"]
    ax.set_title(f"{settings['dataset']}, {settings['examples']} examples, "
                 f"{len(settings['seeds'])} seeds")
    bx = fig.add_subplot(1, 2, 2)
    runs = result["runs"]
    comp = np.array([r["complexity"] for r in runs])
    steps = np.array([r["steps"] for r in runs], np.float64)
    colours = np.array([r["fraction"] for r in runs])
    sc = bx.scatter(comp, steps, c=colours, cmap="viridis", s=28)
    fig.colorbar(sc, ax=bx, label="fraction random")
    fit = result.get("kramers_fit")
    if fit:
        grid = np.linspace(comp.min(), comp.max(), 50)
        bx.plot(grid, np.exp(fit["intercept"] + fit["slope"] * grid), "k--", lw=1,
                label=f"log steps = {fit['intercept']:.1f} + {fit['slope']:.1f} C "
                      f"(R² {fit['r2']:.2f})")
        bx.legend(loc="upper left", fontsize=8)
    bx.set_yscale("log")
    bx.set_xlabel("C_beta of the trained model")
    bx.set_ylabel("SGD steps to loss threshold (log)")
    bx.set_title(f"Spearman rho = {result['spearman']['complexity_vs_steps']:.3f}")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_ranking(result, path, dpi=100):
    """Predicted cost vs. measured fine-tuning steps of candidate
    initializations (one panel per predictor) from a
    :func:`~tfmeta.experiments.complexity_ranking.ranking_experiment` result.

    Example::

        plot_ranking(out, "runs/rank/ranking.png")
    """
    predictors = result["predictors"]
    rows = {r["name"]: r for r in result["candidates"]}
    budget = result["max_steps"]
    fig = _figure(5 * len(predictors), 4)
    for i, (pname, pred) in enumerate(predictors.items()):
        ax = fig.add_subplot(1, len(predictors), i + 1)
        for name, value in zip(pred["names"], pred["predicted"]):
            steps = rows[name]["steps"]
            y = budget + 1 if steps is None else steps
            err = rows[name].get("steps_std", 0.0)
            ax.errorbar([value], [y], yerr=[err], fmt="o", ms=5, capsize=3)
            ax.annotate(name, (value, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel({"distance": "d(source -> target)",
                       "potential": "C_beta(target; candidate)"}.get(pname, pname))
        ax.set_ylabel("fine-tuning steps to threshold (mean ± std)")
        ax.set_title(f"{pname}: Spearman rho = {pred['spearman']:.2f}")
    fig.suptitle(f"target {result['settings']['target']}")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_kramers(result, path, dpi=100):
    """Figure 1 (centre) from a
    :func:`~tfmeta.experiments.complexity_kramers.kramers_experiment` result:
    SGD steps to the loss threshold against the batch size at a fixed
    learning rate, measured (mean ± std over seeds, one line per fraction of
    random labels) and predicted by eq. 16 fitted on the fit runs (dashed;
    dotted: with the diffusion floor ``D = D0 + k lr/B``), left; eq. 16's
    prediction vs. measured for every run, fit and held-out, right.

    Example::

        plot_kramers(kramers_experiment(None, seeds=(0, 1), fit_seeds=(0,)), "kramers.png")
    """
    from tfmeta.experiments.complexity_kramers import X_OF, floor_x

    runs = result["runs"]
    fit = result["fits"]["kramers"]
    pred = np.exp(fit["a"] + fit["b"] * np.array([X_OF["kramers"](r) for r in runs]))
    floor = result["fits"].get("kramers_floor")
    pred_floor = None if floor is None else np.exp(
        floor["a"] + floor["b"] * np.array([floor_x(r, floor["ratio"]) for r in runs]))
    settings = result["settings"]
    fig = _figure(10, 4)
    ax = fig.add_subplot(1, 2, 1)
    for j, f in enumerate(settings["fractions"]):
        colour = f"C{j}"
        sizes = settings["batch_sizes"]
        meas = [[r["steps"] for r in runs if r["fraction"] == f and r["batch_size"] == b]
                for b in sizes]
        pr = [np.mean([p for p, r in zip(pred, runs)
                       if r["fraction"] == f and r["batch_size"] == b]) for b in sizes]
        ax.errorbar(sizes, [np.mean(m) for m in meas], yerr=[np.std(m) for m in meas],
                    marker="o", color=colour, capsize=3, label=f"measured, {f:.0%} random")
        ax.plot(sizes, pr, "--", color=colour, label=f"eq. 16, {f:.0%} random")
        if pred_floor is not None:
            pf = [np.mean([p for p, r in zip(pred_floor, runs)
                           if r["fraction"] == f and r["batch_size"] == b]) for b in sizes]
            ax.plot(sizes, pf, ":", color=colour, label=f"D = D0 + k lr/B, {f:.0%} random")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"batch size B (lr {settings['learning_rate']} fixed)")
    ax.set_ylabel("SGD steps to loss threshold")
    ax.legend(fontsize=7)
    ax.set_title(f"{settings['dataset']}, {settings['examples']} examples")
    bx = fig.add_subplot(1, 2, 2)
    fitted = set(result["fit_runs"])
    meas = np.array([r["steps"] for r in runs], np.float64)
    for is_fit, marker, label in ((True, "s", "fit runs"), (False, "o", "held-out runs")):
        sel = np.array([(i in fitted) == is_fit for i in range(len(runs))])
        if sel.any():
            bx.scatter(meas[sel], pred[sel], marker=marker, s=20, label=label)
    lo, hi = min(meas.min(), pred.min()), max(meas.max(), pred.max())
    grid = np.array([lo, hi])
    bx.plot(grid, grid, "k-", lw=0.8)
    bx.fill_between(grid, grid / 1.5, grid * 1.5, color="grey", alpha=0.2, label="within 1.5x")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("measured steps")
    bx.set_ylabel("predicted steps (eq. 16)")
    bx.set_title(f"held-out within 1.5x: {result['heldout']['within_1.5x']:.0%}")
    bx.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_prediction(result, path, dpi=100):
    """Predicted vs. measured fine-tuning steps (means over seeds, log-log,
    with the diagonal) of every candidate, one panel per target, from a
    :func:`~tfmeta.experiments.complexity_prediction.prediction_experiment`
    result. Returns ``path``.

    Example::

        plot_prediction(out, "runs/pred/prediction.png")
    """
    targets = result["targets"]
    fig = _figure(4.5 * len(targets), 4.2)
    for i, (name, t) in enumerate(targets.items()):
        ax = fig.add_subplot(1, len(targets), i + 1)
        meas = np.array([r["steps"] for r in t["candidates"]])
        pred = np.array([r["predicted"] for r in t["candidates"]])
        ax.errorbar(meas, pred, xerr=[r["steps_std"] for r in t["candidates"]], fmt="o",
                    ms=4, capsize=2)
        for r in t["candidates"]:
            ax.annotate(r["name"], (r["steps"], r["predicted"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=7)
        finite = np.concatenate([meas, pred[np.isfinite(pred)]])
        grid = np.array([finite.min() * 0.8, finite.max() * 1.25])
        ax.plot(grid, grid, "k-", lw=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured fine-tuning steps (mean ± std)")
        ax.set_ylabel("predicted steps (predict_steps)")
        role = "calibration" if t["calibration"] else "held out"
        ax.set_title(f"{name} ({role}): rho = {t['spearman']:.2f}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)
