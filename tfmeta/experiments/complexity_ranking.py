"""Ranking candidate initializations of a target task by predicted ease.

Candidates (random, models trained on other named tasks, exported
meta-learned initializations) are ranked by the static distance from their
task and by the complexity potential at their weights, and compared with
the measured fine-tuning steps. Run by ``tools/complexity.py`` with
``gin/complexity_ranking.gin``; numbers in docs/results.md.

Example::

    out = ranking_experiment("runs/rank", target="mnist",
                             initializations={"leap": "runs/leap/initialization"})
    out["predictors"]["distance"]["spearman"]
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Optional, Sequence

import keras
import numpy as np

from tfmeta.complexity import (
    complexity,
    joint_union,
    rank_initializations,
    rankdata,
    spearman,
    train,
)
from tfmeta.experiments.complexity_figures import plot_ranking
from tfmeta.experiments.complexity_run import say
from tfmeta.experiments.complexity_settings import FinetuneSettings, with_settings
from tfmeta.experiments.complexity_tasks import export_baseline, label_space

__all__ = ["ranking_experiment", "ranking_markdown"]


@with_settings(FinetuneSettings)
def ranking_experiment(
    output_dir=None,
    target: str = "mnist",
    sources: Sequence[str] = ("mnist@3", "fashion_mnist", "omniglot", "mnist_random"),
    initializations: Optional[Mapping[str, str]] = None,
    initialization_baselines: bool = True,
    scratch: bool = True,
    finetune_seeds: Optional[Sequence[int]] = (0, 1, 2),
    *,
    settings: FinetuneSettings,
) -> dict:
    """Rank candidate initializations of ``target`` by predicted ease and by
    measured fine-tuning steps.

    The shared settings (``examples``, ``model_fn``, ``recipe``,
    ``finetune_recipe``, ``lam``, ``weight_decay``, ``fisher_samples``,
    ``fisher_batch_size``, ``seed``, ``plot``, ``data_dir``, ``log``) are
    keyword parameters too: the fields of
    :class:`~tfmeta.experiments.complexity_settings.FinetuneSettings`.

    Candidates: ``"scratch"`` (a fresh ``model_fn`` model), one model trained
    from scratch (``recipe``) on each of ``sources``, and each exported
    initialization of ``initializations`` (``{name: export path}``, loaded
    with ``tfmeta.export.load_initialization(path, num_classes=..,
    head="reset")``; it must take 28x28x1 inputs and end in a Dense head),
    with, if ``initialization_baselines``, a random initialization of the
    same architecture (``"<name>:random"``, ``keras.models.clone_model``
    under the seed, :func:`export_baseline`), its own from-scratch
    baseline. Every candidate's head is replaced by a fresh one with the
    target's classes, then fine-tuned on the target with ``finetune_recipe``
    (steps to the loss threshold), once per seed of ``finetune_seeds`` (the
    seed draws the new head and the batch order; non-converged runs count as
    the budget + 1); the measured cost is the mean over those seeds.

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
    recipe, finetune_recipe = settings.recipe, settings.finetune_recipe
    model_fn, log, ckw = settings.model_fn, settings.log, settings.complexity_kwargs
    beta, lam = settings.beta, settings.lam
    names = [target, *sources]
    if len(set(names)) != len(names):
        raise ValueError(f"target and sources must be distinct tasks, got {names}")
    data = settings.task_data(names)
    classes = {t: int(data[t][1].max()) + 1 for t in names}
    spaces = {t: label_space(t) for t in names}
    n_target = classes[target]

    def fresh(k):
        return lambda: model_fn(num_classes=int(k))

    target_run = train(data[target], recipe, model_fn=fresh(n_target))
    c_target = complexity(target_run.model, data[target], beta, lam, seed=recipe.seed, **ckw)
    say(log, f"target {target}: {target_run.steps} steps from scratch, C = {c_target.total:.4f}")
    candidates, distance, details = {}, {}, {}
    if scratch:
        keras.utils.set_random_seed(recipe.seed)
        candidates["scratch"] = model_fn(num_classes=n_target)
        distance["scratch"] = c_target.total
        details["scratch"] = dict(source_complexity=0.0, union_complexity=c_target.total)
    for s in sources:
        run_s = train(data[s], recipe, model_fn=fresh(classes[s]))
        c_s = complexity(run_s.model, data[s], beta, lam, seed=recipe.seed, **ckw)
        both, k_union = joint_union(data[s], data[target], classes[s], classes[target],
                                    spaces[s] == spaces[target], recipe.seed)
        run_u = train(both, recipe, model_fn=fresh(k_union))
        c_u = complexity(run_u.model, both, beta, lam, seed=recipe.seed, **ckw)
        candidates[s] = run_s.model
        distance[s] = c_u.total - c_s.total
        details[s] = dict(source_complexity=c_s.total, union_complexity=c_u.total,
                          source_steps=int(run_s.steps), source_converged=bool(run_s.converged),
                          union_steps=int(run_u.steps), union_converged=bool(run_u.converged))
        say(log, f"source {s}: C = {c_s.total:.4f}, C(u {target}) = {c_u.total:.4f}, "
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
            candidates[f"{name}:random"] = export_baseline(path, n_target, recipe.seed)
            details[f"{name}:random"] = dict(architecture_of=name)
    if len(candidates) < 2:
        raise ValueError("ranking needs at least two candidates (scratch, sources, "
                         "initializations)")
    seeds = [int(x) for x in (finetune_seeds or (finetune_recipe.seed,))]
    per_seed = []
    for fs in seeds:
        per_seed.append(rank_initializations(
            data[target], candidates, dataclasses.replace(finetune_recipe, seed=fs),
            lam=lam, weight_decay=settings.weight_decay, complexity_kwargs=ckw,
            num_classes=n_target,
            # this experiment's documented "potential" column (predict_steps,
            # the default, is measured by complexity_prediction)
            predictor="potential",
        ))
        say(log, f"fine-tuning seed {fs}: " + ", ".join(
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
                      initializations=dict(initializations or {}), **settings.describe(),
                      finetune_seeds=seeds),
        target_scratch_steps=int(target_run.steps),
        target_complexity=c_target.total,
        candidates=rows,
        predictors=predictors,
        max_steps=int(finetune_recipe.steps),
        seconds=time.perf_counter() - began,
    )
    return settings.write_outputs(out, output_dir, lambda path: plot_ranking(out, path),
                                  "ranking.png", ranking_markdown)


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
