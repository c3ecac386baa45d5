"""Predicting fine-tuning time on real data: ``predict_steps`` against
measured fine-tuning, with its constants fitted on held-out tasks.

For one network (``model_fn``) and several targets, the candidates of each
target are: a random initialization (``"scratch"``), models trained from
scratch on each source task (but the target itself), and exported
(meta-learned) initializations, each with a random initialization of its own
architecture (``"<name>:random"``). Every candidate gets a fresh head for
the target and, for each fine-tuning seed, is (a) predicted by
:func:`~tfmeta.complexity.predict_steps` and (b) fine-tuned to the loss
threshold, both timed. Cells are checkpointed (``resume=True`` continues).

The predictor's constants (``alpha``, ``kappa``) are fitted ONCE on the
cells of ``calibration_targets`` (:func:`fit_constants`) and the other
targets are evaluated with them: Spearman rho between the predicted and the
measured steps over the candidates (means over seeds), negative transfer
(every candidate slower than its random baseline must be predicted slower,
and faster ones faster), ratio to the measured steps, and the predictor's
cost as a fraction of the fine-tuning it predicts. Each fine-tuning's loss
curve is kept in its cell, and :func:`loss_curve_bound` reports how well the
fine-tunings' own loss at 5-50 % of the median run ranks the candidates:
what any probe that reads only the loss could see at that cost. Run by
``tools/complexity.py`` with ``gin/complexity_prediction.gin``; numbers in
docs/results.md.

Example::

    out = prediction_experiment("runs/pred", targets=("mnist",),
                                calibration_targets=("omniglot",), finetune_seeds=(0,))
    out["targets"]["mnist"]["spearman"]
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import time
from typing import Mapping, Optional, Sequence

import keras
import numpy as np

from tfmeta.complexity import rankdata, replace_head, spearman, train
from tfmeta.complexity.distance import shuffled
from tfmeta.complexity.prediction import (
    DEFAULT_CONSTANTS,
    PROBE_VERSION,
    PredictorConstants,
    combine_probes,
    predict_steps,
)
from tfmeta.experiments.complexity_figures import plot_prediction
from tfmeta.experiments.complexity_run import CellStore, say
from tfmeta.experiments.complexity_settings import TransferSettings, with_settings
from tfmeta.experiments.complexity_tasks import export_baseline

__all__ = ["ALPHAS", "BOUND_FRACTIONS", "KAPPAS", "fit_constants", "loss_curve_bound",
           "prediction_experiment", "prediction_markdown"]

#: The grid :func:`fit_constants` searches.
ALPHAS = tuple(float(a) for a in np.round(np.arange(0.5, 4.01, 0.25), 2))
KAPPAS = (0.0, *[float(sign * k) for k in np.geomspace(1e-6, 1e-1, 11) for sign in (1, -1)])


def _predicted(cell, constants):
    p = cell["prediction"]
    return combine_probes(p["loss_start_parts"], p["probes"], p["probe_steps"], p["threshold"],
                          p["noise_scale"], constants)["steps"]


def fit_constants(cells, alphas=ALPHAS, kappas=KAPPAS, cap=1e5):
    """The :class:`PredictorConstants` minimizing the mean squared
    ``log(predicted / measured)`` over ``cells`` (each with ``"prediction"``,
    a :meth:`StepsPrediction.as_dict`, and measured ``"steps"``), by grid
    search; non-converged runs are left out, and predictions are capped at
    ``cap`` (an infinite one, "never", counts as ``cap``).

    Example::

        constants, error = fit_constants(list(out["cells"].values()))
    """
    usable = [c for c in cells if c["converged"] and c["steps"] > 0]
    if not usable:
        raise ValueError("no converged cells to fit the predictor's constants on")
    measured = np.log([c["steps"] for c in usable])
    best = None
    for alpha, kappa in itertools.product(alphas, kappas):
        constants = PredictorConstants(alpha=alpha, kappa=kappa)
        pred = np.clip([_predicted(c, constants) for c in usable], 1.0, cap)
        error = float(np.mean((np.log(pred) - measured) ** 2))
        if best is None or error < best[1]:
            best = (constants, error)
    return best


def _cost(cells):
    """Predictor time over fine-tuning time, summed over ``cells``."""
    return float(sum(c["predict_seconds"] for c in cells)
                 / sum(c["finetune_seconds"] for c in cells))


def _baselines(names):
    """``{candidate: its random baseline}``: ``"<name>:random"`` for exports,
    ``"scratch"`` for every other non-random candidate."""
    out = {}
    for name in names:
        if name.endswith(":random") or name == "scratch":
            continue
        base = f"{name}:random"
        out[name] = base if base in names else ("scratch" if "scratch" in names else None)
    return {k: v for k, v in out.items() if v is not None}


def _summary(target, names, cells, constants, max_steps):
    rows = []
    for name in names:
        mine = [c for c in cells if c["candidate"] == name]
        steps = np.array([c["steps"] if c["converged"] else max_steps + 1 for c in mine],
                         np.float64)
        pred = np.array([_predicted(c, constants) for c in mine], np.float64)
        finite = np.all(np.isfinite(pred))
        pred_mean = float(np.exp(np.mean(np.log(pred)))) if finite else float("inf")
        rows.append(dict(
            name=name, steps=float(steps.mean()),
            steps_std=float(steps.std(ddof=1)) if len(steps) > 1 else 0.0,
            steps_per_seed=steps.astype(int).tolist(), predicted=pred_mean,
            predicted_per_seed=pred.tolist(),
            ratio=float(pred_mean / steps.mean()),
            predict_seconds=[c["predict_seconds"] for c in mine],
            finetune_seconds=[c["finetune_seconds"] for c in mine],
            cost_fraction=_cost([c for c in mine if not c["prediction"]["traced"]] or mine),
            repeats=[c["prediction"]["repeats"] for c in mine],
        ))
    measured = [r["steps"] for r in rows]
    predicted = [r["predicted"] for r in rows]
    by_name = {r["name"]: r for r in rows}
    transfer = []
    for name, base in _baselines(names).items():
        slower = by_name[name]["steps"] > by_name[base]["steps"]
        predicted_slower = by_name[name]["predicted"] > by_name[base]["predicted"]
        transfer.append(dict(candidate=name, baseline=base, measured_slower=bool(slower),
                             predicted_slower=bool(predicted_slower),
                             agree=bool(slower == predicted_slower)))
    ratios = np.array([r["ratio"] for r in rows])
    return dict(
        loss_curve_bound=loss_curve_bound(names, cells, measured),
        target=target, candidates=rows, spearman=spearman(predicted, measured),
        measured_rank=rankdata(measured).tolist(), predicted_rank=rankdata(predicted).tolist(),
        transfer=transfer,
        negative_transfer=[t for t in transfer if t["measured_slower"]],
        within_2x=float(np.mean(np.maximum(ratios, 1 / ratios) <= 2.0)),
        median_ratio=float(np.median(ratios)),
    )


#: Fractions of the target's median fine-tuning at which
#: :func:`loss_curve_bound` reads the fine-tunings' own loss curves.
BOUND_FRACTIONS = (0.05, 0.1, 0.25, 0.5)


def loss_curve_bound(names, cells, measured, fractions=BOUND_FRACTIONS):
    """What reading the loss along the fine-tuning itself would rank:
    for each fraction ``f``, Spearman rho between the candidates' measured
    steps (``measured``, in the order of ``names``) and their training loss
    at step ``k``, the first check at or after ``f`` x the median measured
    steps over the candidates (mean over seeds; a run that converged before
    ``k`` counts its last loss).

    A probe that reads only the loss and costs ``f`` of the median
    fine-tuning sees at most what this sees, so it bounds every loss-reading
    probe at that budget. Returns ``{f: {"step": k, "spearman": rho}}``
    (``{}`` when a cell has no recorded curve: cells measured before curves
    were kept).
    """
    if not all(c.get("curve") for c in cells):
        return {}
    median = float(np.median(measured))
    out = {}
    for f in fractions:
        checks = sorted({s for c in cells for s, _ in c["curve"] if s >= f * median})
        if not checks:
            continue
        k = checks[0]
        loss = []
        for name in names:
            mine = [c for c in cells if c["candidate"] == name]
            loss.append(float(np.mean([_loss_at(c["curve"], k) for c in mine])))
        out[f"{f:g}"] = dict(step=int(k), spearman=spearman(loss, measured))
    return out


def _loss_at(curve, step):
    """The loss at the last check at or before ``step``."""
    return [loss for s, loss in curve if s <= step][-1]


@with_settings(TransferSettings)
def prediction_experiment(
    output_dir=None,
    targets: Sequence[str] = ("mnist", "fashion_mnist"),
    calibration_targets: Sequence[str] = ("omniglot",),
    sources: Sequence[str] = ("mnist", "mnist@3", "fashion_mnist", "fashion_mnist@3",
                              "fashion_mnist_inverted", "omniglot", "mnist_random", "mnist_0-4"),
    initializations: Optional[Mapping[str, str]] = None,
    scratch: bool = True,
    finetune_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    probe_steps: int = 8,
    repeats: int = 3,
    max_cost_fraction: Optional[float] = 0.05,
    resume: bool = False,
    *,
    settings: TransferSettings,
) -> dict:
    """Predicted vs measured fine-tuning steps of candidate initializations
    on ``targets`` (see the module docstring), the predictor's constants
    fitted on ``calibration_targets`` only.

    The other keyword parameters are the fields of
    :class:`~tfmeta.experiments.complexity_settings.TransferSettings`
    (``examples``, ``model_fn``, ``recipe``, ``plot``, ``data_dir``, ``log``,
    ``finetune_recipe``, ``seed``). ``recipe`` trains the sources from
    scratch (default :func:`default_recipe` with ``seed``);
    ``finetune_recipe`` (default: the same with a 10000-step budget) is the
    fine-tuning that is predicted and measured. Trained sources are saved in
    ``output_dir/sources/`` and reused on resume.
    """
    from tfmeta.export import load_initialization, read_export_info

    began = time.perf_counter()
    recipe, finetune_recipe = settings.recipe, settings.finetune_recipe
    model_fn, log = settings.model_fn, settings.log
    all_targets = [*calibration_targets, *targets]
    if set(calibration_targets) & set(targets):
        raise ValueError(f"calibration_targets {list(calibration_targets)} and targets "
                         f"{list(targets)} must be disjoint: the constants are fitted on "
                         "tasks the evaluation does not use")
    store = CellStore(output_dir, "prediction", resume, log)
    data = settings.task_data({*all_targets, *sources})
    classes = {t: int(data[t][1].max()) + 1 for t in data}
    folder = None if output_dir is None else pathlib.Path(output_dir) / "sources"
    trained = {}
    for s in sources:
        keras.utils.set_random_seed(recipe.seed)
        model = model_fn(num_classes=classes[s])
        path = None if folder is None else folder / f"{s.replace('@', '_at_')}.weights.h5"
        if path is not None and resume and path.is_file():
            model.load_weights(path)
        else:
            run = train(data[s], recipe, model_fn=lambda: model_fn(num_classes=classes[s]))
            model = run.model
            say(log, f"source {s}: {run.steps} steps from scratch (converged {run.converged})")
            if path is not None:
                folder.mkdir(parents=True, exist_ok=True)
                model.save_weights(path)
        trained[s] = model
    exports = {}
    for name, path in (initializations or {}).items():
        info = read_export_info(path)
        exports[name] = (path, info)
    seeds = [int(s) for s in finetune_seeds]
    cells = {t: [] for t in all_targets}
    for target in all_targets:
        arrays = shuffled(data[target], finetune_recipe.seed)
        k = classes[target]
        candidates = {}
        if scratch:
            keras.utils.set_random_seed(recipe.seed)
            candidates["scratch"] = model_fn(num_classes=k)
        for s in sources:
            if s != target:
                candidates[s] = trained[s]
        for name, (path, _) in exports.items():
            candidates[name] = load_initialization(path, num_classes=k, head="reset")
            candidates[f"{name}:random"] = export_baseline(path, k, recipe.seed)
        names = list(candidates)
        keys = {(name, fs): f"{target}|{name}|{fs}" for name, fs in itertools.product(names, seeds)}
        # All predictions first, then all fine-tunings: as a user would
        # (predict, then fine-tune the best), and because every fresh head
        # and every fine-tuning reseeds TensorFlow (keras.utils.set_random_seed),
        # which clears its kernel cache and would charge the rebuild to
        # whichever call comes next.
        # A stored cell whose probe is of another PROBE_VERSION is predicted
        # again; its measured fine-tuning is kept.
        stale = {nf for nf, key in keys.items() if store.get(key) is None or store.get(key)
                 ["prediction"].get("probe_version") != PROBE_VERSION}
        todo = {nf for nf, key in keys.items() if not (store.get(key) or {}).get("done")}
        starts = {(name, fs): replace_head(candidates[name], k, seed=fs)
                  for (name, fs) in keys if (name, fs) in stale | todo}
        for (name, fs) in [nf for nf in keys if nf in stale]:
            prediction = predict_steps(
                starts[name, fs], arrays, dataclasses.replace(finetune_recipe, seed=fs),
                probe_steps=probe_steps, repeats=repeats,
                max_cost_fraction=max_cost_fraction, constants=DEFAULT_CONSTANTS)
            cell = dict(store.get(keys[name, fs]) or dict(target=target, candidate=name,
                                                          seed=fs, done=False))
            cell.update(predict_seconds=prediction.seconds, prediction=prediction.as_dict())
            store.put(keys[name, fs], cell)
        for (name, fs) in [nf for nf in keys if nf in todo]:
            start = starts[name, fs]
            cell = dict(store.get(keys[name, fs]))
            t0 = time.perf_counter()
            run = train(arrays, dataclasses.replace(finetune_recipe, seed=fs), init=start)
            cell.update(steps=int(run.steps), converged=bool(run.converged),
                        finetune_seconds=time.perf_counter() - t0, done=True,
                        curve=[[int(step), float(loss)] for step, loss in run.curve])
            store.put(keys[name, fs], cell)
            p = cell["prediction"]
            say(log, f"{target} | {name} | seed {fs}: {cell['steps']} steps "
                      f"({cell['finetune_seconds']:.2f} s), predicted {p['steps']:.0f} "
                      f"({p['low']:.0f}-{p['high']:.0f}, {p['seconds']:.3f} s, "
                      f"{p['repeats']} probes)")
        cells[target] = [store.get(key) for key in keys.values()]
    calibration = [c for t in calibration_targets for c in cells[t]]
    constants, error = fit_constants(calibration)
    say(log, f"fitted on {list(calibration_targets)}: alpha = {constants.alpha}, "
              f"kappa = {constants.kappa} (mean squared log error {error:.3f})")
    per_target = {}
    for target in all_targets:
        names = list(dict.fromkeys(c["candidate"] for c in cells[target]))
        per_target[target] = _summary(target, names, cells[target], constants,
                                      finetune_recipe.steps)
        per_target[target]["calibration"] = target in calibration_targets
    evaluated = [c for t in targets for c in cells[t]]
    later = [c for c in evaluated if not c["prediction"]["traced"]]
    cost = dict(
        total_fraction=_cost(evaluated),
        fraction_after_tracing=_cost(later) if later else None,
        cells_over_5_percent=float(np.mean([c["predict_seconds"] > 0.05 * c["finetune_seconds"]
                                            for c in later or evaluated])),
        median_predict_seconds=float(np.median([c["predict_seconds"] for c in evaluated])),
        median_finetune_seconds=float(np.median([c["finetune_seconds"] for c in evaluated])),
    )
    out = dict(
        experiment="prediction",
        settings=dict(targets=list(targets), calibration_targets=list(calibration_targets),
                      sources=list(sources), initializations=dict(initializations or {}),
                      **settings.describe(), finetune_seeds=seeds,
                      probe_steps=int(probe_steps), repeats=int(repeats),
                      max_cost_fraction=max_cost_fraction),
        constants=dataclasses.asdict(constants), fit_error=error,
        targets=per_target, cost=cost, max_steps=int(finetune_recipe.steps),
        cells=store.cells, seconds=time.perf_counter() - began,
    )
    return settings.write_outputs(out, output_dir, lambda path: plot_prediction(out, path),
                                  "prediction.png", prediction_markdown)


def prediction_markdown(out) -> str:
    """Markdown tables of a :func:`prediction_experiment` result."""
    s, c = out["settings"], out["constants"]
    lines = [f"Model {s['model']}; constants fitted on {s['calibration_targets']}: alpha = "
             f"{c['alpha']}, kappa = {c['kappa']:g} (mean squared log error "
             f"{out['fit_error']:.3f}); fine-tuning seeds {s['finetune_seeds']}, probe "
             f"{s['probe_steps']} steps x up to {s['repeats']} repeats.", ""]
    for target, t in out["targets"].items():
        role = "calibration (fitted on)" if t["calibration"] else "held out"
        lines += [f"**{target}** ({role}): Spearman rho(predicted, measured) = "
                  f"**{t['spearman']:.3f}** over {len(t['candidates'])} candidates; median "
                  f"predicted/measured {t['median_ratio']:.2f}, within 2x "
                  f"{t['within_2x']:.0%}.", "",
                  "| candidate | measured steps (mean ± std) | per seed | predicted (geo. mean) | "
                  "measured rank | predicted rank | predict / fine-tune time |",
                  "|---|---|---|---|---|---|---|"]
        for row, mr, pr in zip(t["candidates"], t["measured_rank"], t["predicted_rank"]):
            seeds = ", ".join(str(v) for v in row["steps_per_seed"])
            lines.append(f"| {row['name']} | {row['steps']:.0f} ± {row['steps_std']:.0f} | "
                         f"{seeds} | {row['predicted']:.0f} | {mr:g} | {pr:g} | "
                         f"{row['cost_fraction']:.1%} |")
        if t["loss_curve_bound"]:
            lines += ["", "The fine-tunings' own loss at step k, as a predictor (Spearman rho "
                      "with the measured steps; k = the first check at a fraction of the "
                      "median fine-tuning): " + "; ".join(
                          f"{f} (k = {b['step']}): {b['spearman']:.2f}"
                          for f, b in t["loss_curve_bound"].items()) + "."]
        if t["transfer"]:
            lines += ["", "Against the random baseline (slower = negative transfer): " + "; ".join(
                f"{x['candidate']} vs {x['baseline']}: measured "
                f"{'slower' if x['measured_slower'] else 'faster'}, predicted "
                f"{'slower' if x['predicted_slower'] else 'faster'}"
                f"{'' if x['agree'] else ' (MISS)'}" for x in t["transfer"]) + "."]
        lines.append("")
    cost = out["cost"]
    after = cost["fraction_after_tracing"]
    lines += [f"Cost on the held-out targets: predictor time / fine-tuning time = "
              f"{cost['total_fraction']:.1%} in total, "
              f"{'n/a' if after is None else f'{after:.1%}'} without the calls that traced the "
              f"probe (once per architecture); cells over 5 %: "
              f"{cost['cells_over_5_percent']:.0%}; median "
              f"{cost['median_predict_seconds']:.3f} s vs {cost['median_finetune_seconds']:.2f} s. "
              f"Time: {out['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"
