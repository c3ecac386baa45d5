"""Reachability between tasks (Achille et al., section 7.2, figure 2).

For every ordered pair of tasks, the static distance ``d(source -> target)``
(:mod:`tfmeta.complexity.distance`) and the measured fine-tuning time: the
number of SGD steps that fine-tuning the source-trained model on the target
needs to bring the target's training loss under ``recipe.loss_threshold``
(or "no convergence" within ``recipe.steps``). :class:`Reachability` holds
the matrices and the comparisons drawn from them.

Example::

    reach = reachability_matrix({"a": (xa, ya), "b": (xb, yb)}, model_fn, recipe,
                                lam=0.1, weight_decay=5e-4)
    reach.steps_or_none(), reach.correlation()
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from tfmeta.complexity.distance import joint_union, recipe_complexity, shuffled
from tfmeta.complexity.measure import Complexity, resolve_beta
from tfmeta.complexity.ranking import spearman
from tfmeta.complexity.training import (
    NOT_CONVERGED,
    TrainingRecipe,
    TrainResult,
    fit_to_threshold,
    replace_head,
    train,
)
from tfmeta.validation import ConfigError, check_keys

__all__ = ["Reachability", "reachability_matrix"]


@dataclasses.dataclass
class Reachability:
    """Reachability between tasks (rows = target, columns = source).

    Attributes:
      names: task names, the order of rows and columns.
      distance: ``distance[t, s] = d(names[s] -> names[t])
        = C(D_s u D_t) - C(D_s)``; zero on the diagonal.
      steps: fine-tuning steps from the model trained on source ``s`` to
        reach the loss threshold on target ``t``; ``NOT_CONVERGED`` (-1) when
        the budget ran out.
      converged: boolean matrix, ``steps != NOT_CONVERGED``.
      final_loss: target training loss at the end of each fine-tuning run.
      complexity: ``C(D)`` of each task's own trained model.
      union_complexity: ``C(D_a u D_b)`` for each unordered pair
        ``(a, b)`` (key in ``names`` order).
      pretraining: training result on each task from scratch (its ``steps``
        are the from-scratch steps to the threshold, the natural baseline of
        a row).
      max_steps: the fine-tuning step budget.
      heads: ``"shared"`` (one label space and output layer for all tasks,
        the source head is kept) or ``"per_task"`` (each task its own head
        size; fine-tuning replaces the source head by a fresh one).
      num_classes: classes of each task (``heads="per_task"``), or of the
        shared head.
      label_spaces: label space of each task (tasks in the same space share
        class meanings, so their union shares labels; see
        :func:`reachability_matrix`).
      seconds: wall-clock time of the whole computation.
    """

    names: List[str]
    distance: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    final_loss: np.ndarray
    complexity: Dict[str, Complexity]
    union_complexity: Dict[Tuple[str, str], Complexity]
    pretraining: Dict[str, TrainResult]
    max_steps: int
    heads: str = "shared"
    num_classes: Dict[str, int] = dataclasses.field(default_factory=dict)
    label_spaces: Dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = float("nan")

    def steps_or_none(self):
        """``steps`` as nested lists with None for non-converged runs."""
        return [
            [int(s) if c else None for s, c in zip(row, crow)]
            for row, crow in zip(self.steps, self.converged)
        ]

    def censored_steps(self) -> np.ndarray:
        """``steps`` with non-converged runs counted as ``max_steps + 1``."""
        return np.where(self.converged, self.steps, self.max_steps + 1)

    def correlation(self, include_diagonal=False):
        """Spearman correlation between distance and fine-tuning steps over
        off-diagonal pairs (non-converged runs count as ``max_steps + 1``)."""
        mask = ~np.eye(len(self.names), dtype=bool) if not include_diagonal else \
            np.ones_like(self.converged)
        return spearman(self.distance[mask], self.censored_steps()[mask])

    def total_distance(self) -> np.ndarray:
        """Size-weighted variant of ``distance``, per target example:
        ``(N_u C(D_s u D_t) - N_s C(D_s)) / N_t`` with ``N`` the examples of
        each set and ``C`` the per-example (``reduction="mean"``) complexity.

        ``N_D C_beta(D)`` is the complexity of the summed loss with the prior
        weight ``N_D beta`` (a fixed per-example weight decay), i.e. nats for
        the whole set; the difference is the extra nats needed to add
        ``D_t`` to ``D_s``. With the mean convention the union's per-example
        complexity is roughly the average of the two tasks', so ``distance``
        is about ``(C(D_t) - C(D_s)) / 2`` plus the interaction, and can be
        negative from a more complex source; this variant is about
        ``C(D_t)`` minus what the source already provides. Zero diagonal.
        """
        n = len(self.names)
        out = np.zeros((n, n))
        for ti, t in enumerate(self.names):
            for si, s in enumerate(self.names):
                if ti == si:
                    continue
                u = self.union_complexity[(s, t) if si < ti else (t, s)]
                cs, ct = self.complexity[s], self.complexity[t]
                out[ti, si] = (u.num_examples * u.total
                               - cs.num_examples * cs.total) / ct.num_examples
        return out

    def _relative_correlation(self):
        mask = ~np.eye(len(self.names), dtype=bool)
        return spearman(self.distance[mask], self.relative_steps()[mask])

    def scratch_steps(self) -> np.ndarray:
        """Steps each target needed from scratch (its pretraining run; a run
        that did not converge counts as its step count + 1)."""
        out = []
        for k in self.names:
            run = self.pretraining.get(k)
            if run is None:
                out.append(np.nan)
            else:
                out.append(run.steps if run.converged else run.steps + 1)
        return np.asarray(out, np.float64)

    def relative_steps(self) -> np.ndarray:
        """``steps[t, s] / scratch_steps[t]``: below 1, the source helps the
        target (positive transfer); above 1, it hurts. Removes the row
        (target difficulty) effect from the comparison of sources."""
        return self.censored_steps() / self.scratch_steps()[:, None]

    def row_correlations(self) -> Dict[str, float]:
        """Per target: Spearman correlation between ``d(s -> t)`` and the
        fine-tuning steps over the sources ``s != t`` (which source the
        distance predicts to be fastest for a fixed target); NaN when a row
        is constant."""
        steps = self.censored_steps()
        out = {}
        for t, name in enumerate(self.names):
            mask = np.arange(len(self.names)) != t
            out[name] = spearman(self.distance[t, mask], steps[t, mask])
        return out

    def asymmetry(self) -> List[dict]:
        """One entry per unordered pair ``{a, b}``: the distances and
        fine-tuning steps in both directions (also relative to each target's
        steps from scratch), and whether the direction with the smaller
        distance is also the faster one (``agrees``, on raw steps;
        ``agrees_relative``, on steps relative to scratch; None on a tie).

        Example::

            for row in reach.asymmetry():
                print(row["a"], "->", row["b"], row["steps_ab"], "vs", row["steps_ba"])
        """
        steps = self.censored_steps()
        relative = self.relative_steps()
        rows = []

        def agree(d1, d2, s1, s2):
            if d1 == d2 or s1 == s2 or not (np.isfinite(s1) and np.isfinite(s2)):
                return None
            return bool((d1 < d2) == (s1 < s2))

        for i, a in enumerate(self.names):
            for j in range(i + 1, len(self.names)):
                b = self.names[j]
                d_ab, d_ba = float(self.distance[j, i]), float(self.distance[i, j])
                s_ab, s_ba = int(steps[j, i]), int(steps[i, j])
                r_ab, r_ba = float(relative[j, i]), float(relative[i, j])
                rows.append(dict(a=a, b=b, distance_ab=d_ab, distance_ba=d_ba,
                                 steps_ab=s_ab, steps_ba=s_ba,
                                 relative_ab=r_ab, relative_ba=r_ba,
                                 agrees=agree(d_ab, d_ba, s_ab, s_ba),
                                 agrees_relative=agree(d_ab, d_ba, r_ab, r_ba)))
        return rows

    def to_dict(self) -> dict:
        """JSON-friendly summary (no models)."""
        return dict(
            names=list(self.names),
            distance=np.asarray(self.distance).tolist(),
            steps=self.steps_or_none(),
            final_loss=np.asarray(self.final_loss).tolist(),
            complexity={k: v.as_dict() for k, v in self.complexity.items()},
            union_complexity={f"{a}|{b}": v.as_dict()
                              for (a, b), v in self.union_complexity.items()},
            scratch_steps={k: (int(r.steps) if r.converged else None)
                           for k, r in self.pretraining.items()},
            max_steps=int(self.max_steps),
            heads=self.heads,
            num_classes=dict(self.num_classes),
            label_spaces=dict(self.label_spaces),
            spearman_distance_steps=self.correlation(),
            spearman_distance_relative_steps=self._relative_correlation(),
            total_distance=self.total_distance().tolist(),
            spearman_total_distance_steps=spearman(
                self.total_distance()[~np.eye(len(self.names), dtype=bool)],
                self.censored_steps()[~np.eye(len(self.names), dtype=bool)]),
            spearman_within_target=self.row_correlations(),
            relative_steps=self.relative_steps().tolist(),
            asymmetry=self.asymmetry(),
            seconds=self.seconds,
        )



def _num_classes_of(arrays, given, names):
    out = {}
    for k in names:
        seen = int(np.max(arrays[k][1])) + 1
        n = seen if given is None or k not in given else int(given[k])
        if n < seen:
            raise ValueError(
                f"task {k!r} has labels up to {seen - 1} but num_classes[{k!r}] = {n}; "
                f"raise num_classes[{k!r}] to at least {seen}"
            )
        out[k] = n
    return out



def reachability_matrix(
    datasets: Mapping[str, object],
    model_fn,
    recipe: Optional[TrainingRecipe] = None,
    *,
    finetune_recipe: Optional[TrainingRecipe] = None,
    beta: Optional[float] = None,
    lam: Optional[float] = None,
    weight_decay: Optional[float] = None,
    complexity_kwargs: Optional[dict] = None,
    max_examples: Optional[int] = None,
    heads: str = "shared",
    num_classes: Optional[Mapping[str, int]] = None,
    label_spaces: Optional[Mapping[str, str]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Reachability:
    """Distances and fine-tuning times between all ordered pairs of tasks.

    Trains a fresh model (seeded) on every task and on every pairwise union
    with ``recipe`` (``n + n(n-1)/2`` trainings), then fine-tunes every
    task's model on every other task with ``finetune_recipe`` (default:
    ``recipe``), counting steps to its loss threshold (``n^2`` runs).

    Heads (the label-space question):

    * ``heads="shared"`` (default): ``model_fn()`` takes no argument and all
      tasks share its output layer and label space (e.g. 10 classes); the
      source head is kept when fine-tuning, so the diagonal is 0 steps when
      the pretraining converged.
    * ``heads="per_task"``: ``model_fn(num_classes=k)`` builds a model with
      ``k`` outputs; task ``t`` has ``num_classes[t]`` classes (default: its
      largest label + 1). Fine-tuning from source ``s`` to target ``t``
      replaces the source's head by a fresh ``Dense(num_classes[t])``
      (:func:`~tfmeta.complexity.replace_head`, seeded by
      ``finetune_recipe.seed``), also on the diagonal, which then measures
      the cost of a new head alone. The union ``D_a u D_b`` keeps labels
      whose meaning is shared: tasks with equal ``label_spaces`` (default:
      each task its own space) share classes, otherwise ``b``'s labels are
      shifted past ``a``'s and the union model has ``n_a + n_b`` outputs.

    Example::

        reach = reachability_matrix(
            {"mnist": (x1, y1), "fashion": (x2, y2), "omniglot": (x3, y3)},
            lambda num_classes: mlp(num_classes), recipe, lam=0.1,
            weight_decay=5e-4, heads="per_task")
        reach.steps_or_none(), reach.correlation(), reach.asymmetry()
    """
    if heads not in ("shared", "per_task"):
        raise ValueError(f"heads must be 'shared' or 'per_task', got {heads!r}")
    recipe = recipe or TrainingRecipe()
    finetune_recipe = finetune_recipe or recipe
    beta, lam = resolve_beta(beta, lam, weight_decay)
    say = log or (lambda message: None)
    began = time.perf_counter()
    names = list(datasets)
    n = len(names)
    if n < 2:
        raise ValueError("reachability needs at least two tasks")
    check_keys("num_classes", num_classes, names)
    check_keys("label_spaces", label_spaces, names)
    if label_spaces and heads == "shared":
        raise ConfigError(
            "label_spaces applies to heads='per_task' only (with heads='shared' every task "
            "shares the model's one label space): drop label_spaces, or set heads='per_task'."
        )
    arrays = {k: shuffled(datasets[k], recipe.seed, max_examples) for k in names}
    shapes = {arrays[k][0].shape[1:] for k in names}
    if len(shapes) != 1:
        raise ValueError(
            f"all tasks must share one input shape, got {sorted(map(str, shapes))}; "
            "resize the images to a common shape first"
        )
    classes = _num_classes_of(arrays, num_classes, names)
    if heads == "shared":
        spaces = {k: "shared" for k in names}

        def build(k):
            return model_fn

    else:
        spaces = {k: (k if label_spaces is None else str(label_spaces.get(k, k)))
                  for k in names}
        for a in names:
            for b in names:
                if spaces[a] == spaces[b] and classes[a] != classes[b]:
                    # One space, one label set: the head must cover all of it.
                    classes[a] = classes[b] = max(classes[a], classes[b])

        def build(k_classes):
            return lambda: model_fn(num_classes=int(k_classes))

    pre, comp = {}, {}
    for k in names:
        pre[k] = train(arrays[k], recipe, model_fn=build(classes[k]))
        comp[k] = recipe_complexity(pre[k].model, arrays[k], beta, lam, recipe, complexity_kwargs)
        say(f"pretrain {k}: {pre[k].steps} steps (converged {pre[k].converged}), "
            f"C = {comp[k].total:.4f}")
    union_c = {}
    for i in range(n):
        for j in range(i + 1, n):
            a, b = names[i], names[j]
            both, k_union = joint_union(arrays[a], arrays[b], classes[a], classes[b],
                                        spaces[a] == spaces[b], recipe.seed)
            t = train(both, recipe, model_fn=build(k_union))
            union_c[(a, b)] = recipe_complexity(t.model, both, beta, lam, recipe, complexity_kwargs)
            say(f"union {a} u {b}: {t.steps} steps (converged {t.converged}), "
                f"C = {union_c[(a, b)].total:.4f}")
    distance = np.zeros((n, n))
    steps = np.full((n, n), NOT_CONVERGED, dtype=np.int64)
    converged = np.zeros((n, n), dtype=bool)
    final_loss = np.zeros((n, n))
    for ti, t in enumerate(names):
        for si, s in enumerate(names):
            if ti != si:
                key = (s, t) if si < ti else (t, s)
                distance[ti, si] = union_c[key].total - comp[s].total
            if heads == "shared":
                run = train(arrays[t], finetune_recipe, model_fn=model_fn, init=pre[s].model)
            else:
                start = replace_head(pre[s].model, classes[t], seed=finetune_recipe.seed)
                run = fit_to_threshold(start, arrays[t], finetune_recipe)
            converged[ti, si] = run.converged and finetune_recipe.loss_threshold is not None
            steps[ti, si] = run.steps if converged[ti, si] else NOT_CONVERGED
            final_loss[ti, si] = run.final_loss
            say(f"fine-tune {s} -> {t}: "
                f"{run.steps if converged[ti, si] else 'not converged'} steps, "
                f"d = {distance[ti, si]:.4f}")
    return Reachability(
        names=names,
        distance=distance,
        steps=steps,
        converged=converged,
        final_loss=final_loss,
        complexity=comp,
        union_complexity=union_c,
        pretraining=pre,
        max_steps=int(finetune_recipe.steps),
        heads=heads,
        num_classes=classes,
        label_spaces=spaces,
        seconds=time.perf_counter() - began,
    )
