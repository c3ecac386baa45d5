"""Figure 2 of Achille, Mbeng & Soatto on real data: reachability between tasks.

The static distance ``d(s -> t)`` and the measured fine-tuning steps between
named real tasks (MNIST, Fashion-MNIST, Omniglot characters, MNIST with
random labels, ...), each task with its own head. Run by
``tools/complexity.py`` with ``gin/complexity_reachability.gin``; numbers in
docs/results.md.

Example::

    out = reachability_experiment("runs/reach", tasks=("mnist", "fashion_mnist"))
    out["steps"], out["distance"], out["spearman_distance_steps"]
"""

from __future__ import annotations

import time
from typing import Sequence

from tfmeta.complexity import reachability_matrix, spearman
from tfmeta.experiments.complexity_figures import plot_reachability
from tfmeta.experiments.complexity_settings import FinetuneSettings, with_settings
from tfmeta.experiments.complexity_tasks import label_space

__all__ = ["reachability_experiment", "reachability_markdown"]


@with_settings(FinetuneSettings)
def reachability_experiment(
    output_dir=None,
    tasks: Sequence[str] = ("mnist", "fashion_mnist", "omniglot", "mnist_random"),
    *,
    settings: FinetuneSettings,
) -> dict:
    """Reachability matrix between named real tasks (figure 2).

    Every task (:func:`task_arrays`, ``examples`` each) gets its own head
    (``heads="per_task"`` of :func:`~tfmeta.complexity.reachability_matrix`):
    fine-tuning from source ``s`` to target ``t`` replaces the source model's
    head by a fresh one with ``t``'s classes (also on the diagonal). Unions
    share labels only within a label space (``TASKS``: ``mnist``,
    ``mnist_random`` and ``mnist_0-4`` are all digits), otherwise the label
    sets are disjoint. The other keyword parameters are the fields of
    :class:`~tfmeta.experiments.complexity_settings.FinetuneSettings`
    (``examples``, ``model_fn``, ``recipe``, ``finetune_recipe``, ``lam``,
    ``weight_decay``, ``fisher_samples``, ``fisher_batch_size``, ``seed``,
    ``plot``, ``data_dir``, ``log``). Defaults: the recipe of
    :func:`relabel_experiment` for pretraining and unions, the same for
    fine-tuning with a 10000-step budget.

    Writes ``reachability.png`` (colour: distance; text: fine-tuning steps;
    row labels: steps from scratch), ``results.json``, ``summary.md``.

    Example::

        out = reachability_experiment("runs/reach", tasks=("mnist", "fashion_mnist"))
        out["steps"], out["distance"], out["spearman_distance_steps"]
    """
    began = time.perf_counter()
    finetune_recipe = settings.finetune_recipe
    reach = reachability_matrix(
        settings.task_data(tasks), settings.model_fn, settings.recipe,
        finetune_recipe=finetune_recipe, lam=settings.lam, weight_decay=settings.weight_decay,
        complexity_kwargs=settings.complexity_kwargs, heads="per_task",
        label_spaces={t: label_space(t) for t in tasks}, log=settings.log,
    )
    out = dict(experiment="reachability",
               settings=dict(tasks=list(tasks), **settings.describe()),
               **reach.to_dict())
    # Figure 1 (right) across tasks: complexity vs. steps from scratch.
    out["spearman_complexity_scratch_steps"] = spearman(
        [reach.complexity[t].total for t in reach.names], reach.scratch_steps())
    out["seconds"] = time.perf_counter() - began
    title = (f"fine-tuning steps to loss {finetune_recipe.loss_threshold} "
             f"(budget {finetune_recipe.steps})")
    settings.write_outputs(out, output_dir,
                           lambda path: plot_reachability(reach, path, title=title),
                           "reachability.png", reachability_markdown)
    out["_reachability"] = reach
    return out


def _matrix_table(caption, names, matrix, cell_format):
    """Markdown lines of a target x source matrix, under ``caption``."""
    lines = ["", caption, "", "| target \\ source | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for t, row in zip(names, matrix):
        lines.append(f"| **{t}** | " + " | ".join(cell_format.format(v) for v in row) + " |")
    return lines


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
        lines += _matrix_table("Size-weighted distance (N_u C(S u T) - N_s C(S)) / N_t "
                               "(`Reachability.total_distance`):",
                               names, out["total_distance"], "{:+.3f}")
    lines += _matrix_table("Steps relative to the target's steps from scratch (< 1: the "
                           "source helps):", names, out["relative_steps"], "{:.2f}")
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
