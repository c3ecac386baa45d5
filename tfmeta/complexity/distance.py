"""Static distance, reachability matrix and ranking of initializations.

Static (asymmetric) distance (Achille et al., section 4)::

    d_beta(D1 -> D2) = C_beta(D1 u D2) - C_beta(D1)

where ``C_beta(D)`` is :func:`~tfmeta.complexity.complexity` at the weights
reached by training on ``D`` with a fixed :class:`TrainingRecipe` (the
paper's ``min_Q`` is replaced by "whatever minimum this recipe finds": we
cannot minimize over all weights). ``D1 u D2`` is the concatenation of the two
training sets, shuffled together.

Reachability (section 7.2, figure 2): for every ordered pair, the distance
``d(source -> target)`` and the measured fine-tuning time, the number of SGD
steps that fine-tuning the source-trained model on the target needs to bring
the target's training loss under ``recipe.loss_threshold`` (or "no
convergence" within ``recipe.steps``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import gin
import keras
import numpy as np

from tfmeta.complexity import _data
from tfmeta.complexity.measure import Complexity, complexity, resolve_beta
from tfmeta.complexity.training import (
    TrainingRecipe,
    TrainResult,
    fit_to_threshold,
    replace_head,
    train,
)

__all__ = [
    "NOT_CONVERGED",
    "InitializationRanking",
    "Reachability",
    "StaticDistance",
    "rank_initializations",
    "rankdata",
    "reachability_matrix",
    "spearman",
    "static_distance",
    "union",
]

#: Marks a fine-tuning run that did not reach the threshold in ``steps``.
NOT_CONVERGED = -1


def _canonical_order(x, y):
    """An order of the examples that depends only on their values (a fixed
    random projection of ``x``, then ``y``), so that ``union(a, b)`` and
    ``union(b, a)`` give identical arrays."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    proj = np.random.default_rng(12345).normal(size=flat.shape[1])
    return np.lexsort((y, flat @ proj))


def union(d1, d2, seed=0, max_examples=None):
    """``D1 u D2``: both training sets concatenated, then shuffled (seeded).

    Each argument is ``(x, y)`` arrays or a batched dataset; returns arrays.
    The result does not depend on the argument order (the examples are put
    in a value-determined order before the seeded permutation), so
    ``C(D1 u D2)`` is the same number in ``d(D1 -> D2)`` and ``d(D2 -> D1)``.
    """
    x1, y1 = _data.to_numpy(d1, max_examples)
    x2, y2 = _data.to_numpy(d2, max_examples)
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(f"input shapes differ: {x1.shape[1:]} vs {x2.shape[1:]}")
    x = np.concatenate([x1, x2.astype(x1.dtype)])
    y = np.concatenate([y1, y2])
    canonical = _canonical_order(x, y)
    x, y = x[canonical], y[canonical]
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order]


def _shuffled(data, seed, max_examples):
    x, y = _data.to_numpy(data, max_examples)
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order]


def _complexity(model, data, beta, lam, recipe, complexity_kwargs):
    kwargs = dict(complexity_kwargs or {})
    kwargs.setdefault("from_logits", recipe.from_logits)
    kwargs.setdefault("seed", recipe.seed)
    return complexity(model, data, beta, lam, **kwargs)


@dataclasses.dataclass
class StaticDistance:
    """``distance = union.total - source.total`` and what it came from."""

    distance: float
    source: Complexity
    union: Complexity
    source_training: TrainResult
    union_training: TrainResult


@gin.configurable(module="tfmeta.complexity")
def static_distance(
    d1,
    d2,
    recipe: Optional[TrainingRecipe] = None,
    *,
    model_fn=None,
    init: Optional[keras.Model] = None,
    beta: Optional[float] = None,
    lam: Optional[float] = None,
    weight_decay: Optional[float] = None,
    complexity_kwargs: Optional[dict] = None,
    max_examples: Optional[int] = None,
) -> StaticDistance:
    """``d_beta(D1 -> D2) = C_beta(D1 u D2) - C_beta(D1)``.

    Two models are trained with the same ``recipe``: on ``D1`` and on
    ``D1 u D2``, each from ``model_fn()`` (seeded by ``recipe.seed``, so both
    start from the same weights) or, for fine-tuning, from a copy of
    ``init``. ``C`` is evaluated on each model's own training set.

    Args:
      d1, d2: ``(x, y)`` arrays or batched datasets of ``(x, y)`` sharing the
        input shape and label space.
      recipe: :class:`TrainingRecipe` (default: ``TrainingRecipe()``).
      model_fn: zero-argument factory of a fresh built Keras model.
      init: optional model to fine-tune from instead of ``model_fn()``.
      beta, lam, weight_decay: see :func:`~tfmeta.complexity.complexity`.
      complexity_kwargs: extra arguments for ``complexity`` (e.g.
        ``fisher_samples``, ``labels``, ``exact``, ``reduction``).
      max_examples: cap on the examples taken from each dataset.
    """
    recipe = recipe or TrainingRecipe()
    beta, lam = resolve_beta(beta, lam, weight_decay)
    source = _shuffled(d1, recipe.seed, max_examples)
    both = union(d1, d2, recipe.seed, max_examples)
    t_source = train(source, recipe, model_fn=model_fn, init=init)
    t_union = train(both, recipe, model_fn=model_fn, init=init)
    c_source = _complexity(t_source.model, source, beta, lam, recipe, complexity_kwargs)
    c_union = _complexity(t_union.model, both, beta, lam, recipe, complexity_kwargs)
    return StaticDistance(
        distance=c_union.total - c_source.total,
        source=c_source,
        union=c_union,
        source_training=t_source,
        union_training=t_union,
    )


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


def _union_pair(arrays, a, b, spaces, classes, seed):
    """``D_a u D_b`` with labels in the joint label space, and its class count.

    Tasks in the same label space keep their labels (the classes mean the
    same thing); otherwise ``b``'s labels are shifted past ``a``'s, so the
    union head has ``n_a + n_b`` outputs.
    """
    xa, ya = arrays[a]
    xb, yb = arrays[b]
    if spaces[a] == spaces[b]:
        n = max(classes[a], classes[b])
    else:
        yb = yb + classes[a]
        n = classes[a] + classes[b]
    return union((xa, ya), (xb, yb), seed), n


@gin.configurable(module="tfmeta.complexity")
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
    arrays = {k: _shuffled(datasets[k], recipe.seed, max_examples) for k in names}
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
        comp[k] = _complexity(pre[k].model, arrays[k], beta, lam, recipe, complexity_kwargs)
        say(f"pretrain {k}: {pre[k].steps} steps (converged {pre[k].converged}), "
            f"C = {comp[k].total:.4f}")
    union_c = {}
    for i in range(n):
        for j in range(i + 1, n):
            a, b = names[i], names[j]
            both, k_union = _union_pair(arrays, a, b, spaces, classes, recipe.seed)
            t = train(both, recipe, model_fn=build(k_union))
            union_c[(a, b)] = _complexity(t.model, both, beta, lam, recipe, complexity_kwargs)
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


def rankdata(a) -> np.ndarray:
    """Ranks (1 = smallest) with ties given their average rank."""
    a = np.asarray(a, np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), np.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks);
    NaN when either side is constant or fewer than 2 points."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) != len(rb):
        raise ValueError("length mismatch")
    if len(ra) < 2:
        return float("nan")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    if denom == 0:
        return float("nan")
    return float(np.sum(ra * rb) / denom)


@dataclasses.dataclass
class InitializationRanking:
    """Predicted vs measured ease of reaching a target from initializations.

    Attributes:
      names: candidate names, in the order given.
      predicted: predicted cost per candidate (lower = predicted easier).
      predicted_rank: rank of ``predicted`` (1 = predicted easiest).
      steps: measured fine-tuning steps to the threshold, ``NOT_CONVERGED``
        (-1) if the budget ran out.
      converged: per candidate.
      measured_rank: rank of the measured steps (non-converged runs tie last).
      spearman: rank correlation between predicted cost and measured steps
        (1 = perfect prediction).
      predictor: ``"potential"`` or ``"distance"``.
      details: per-candidate ``Complexity`` (potential) or ``StaticDistance``.
    """

    names: List[str]
    predicted: np.ndarray
    predicted_rank: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    measured_rank: np.ndarray
    spearman: float
    predictor: str
    details: Dict[str, object]

    def order(self) -> List[str]:
        """Candidate names, predicted easiest first."""
        return [self.names[i] for i in np.argsort(self.predicted, kind="mergesort")]


@gin.configurable(module="tfmeta.complexity")
def rank_initializations(
    target,
    candidates: Mapping[str, keras.Model],
    recipe: Optional[TrainingRecipe] = None,
    *,
    beta: Optional[float] = None,
    lam: Optional[float] = None,
    weight_decay: Optional[float] = None,
    predictor: str = "potential",
    sources: Optional[Mapping[str, object]] = None,
    model_fn=None,
    complexity_kwargs: Optional[dict] = None,
    max_examples: Optional[int] = None,
    num_classes: Optional[int] = None,
) -> InitializationRanking:
    """Rank candidate initializations by predicted ease of reaching ``target``
    and measure the actual fine-tuning steps.

    Predictors (lower = easier):

    * ``"potential"`` (default, needs nothing but the candidate's weights):
      ``C_beta(D_target; w_c)``, the target's complexity functional evaluated
      at the candidate's weights. Section 6 of the paper identifies ``C_beta``
      with the effective potential SGD descends, so by Kramers' rate (eq. 16)
      the expected time grows with the potential difference to the target's
      minimum; the end point being common to all candidates, ranking by the
      starting potential ranks the predicted times. Note that ``C`` is here
      used away from a minimum, where eq. 4's Gaussian approximation is only
      heuristic.
    * ``"distance"``: ``d(D_c -> D_target)`` with ``sources[name]`` the
      dataset the candidate was trained on, via :func:`static_distance`
      fine-tuned from the candidate (``init=candidate``).

    The measurement fine-tunes a copy of each candidate on ``target`` with
    ``recipe`` and counts steps to ``recipe.loss_threshold``.

    ``num_classes``: when given, every candidate's head (its final Dense
    layer) is first replaced by a fresh one with ``num_classes`` outputs
    (:func:`~tfmeta.complexity.replace_head`, seeded by ``recipe.seed``),
    for candidates trained on other label sets; prediction and measurement
    then both start from that model. ``model_fn`` is then not used.

    Example::

        ranking = rank_initializations(
            (x, y), {"scratch": fresh, "fashion": fashion_model}, recipe,
            lam=0.1, weight_decay=5e-4, num_classes=10)
        ranking.order(), ranking.steps, ranking.spearman
    """
    recipe = recipe or TrainingRecipe()
    beta, lam = resolve_beta(beta, lam, weight_decay)
    if predictor not in ("potential", "distance"):
        raise ValueError("predictor must be 'potential' or 'distance'")
    if predictor == "distance" and (sources is None or set(sources) < set(candidates)):
        raise ValueError("predictor='distance' needs sources[name] for every candidate")
    if recipe.loss_threshold is None:
        raise ValueError("ranking needs a loss_threshold in the recipe")
    names = list(candidates)
    arrays = _shuffled(target, recipe.seed, max_examples)
    if num_classes is not None:
        candidates = {k: replace_head(candidates[k], num_classes, seed=recipe.seed)
                      for k in names}
        model_fn = None
    predicted, details = [], {}
    steps, converged = [], []
    for name in names:
        cand = candidates[name]
        if predictor == "potential":
            c = _complexity(cand, arrays, beta, lam, recipe, complexity_kwargs)
            predicted.append(c.total)
        else:
            c = static_distance(
                sources[name], arrays, recipe, model_fn=model_fn, init=cand,
                beta=beta, lam=lam, complexity_kwargs=complexity_kwargs,
                max_examples=max_examples,
            )
            predicted.append(c.distance)
        details[name] = c
        run = train(arrays, recipe, model_fn=model_fn, init=cand)
        converged.append(bool(run.converged))
        steps.append(run.steps if run.converged else NOT_CONVERGED)
    predicted = np.asarray(predicted)
    steps = np.asarray(steps, np.int64)
    converged = np.asarray(converged)
    censored = np.where(converged, steps, recipe.steps + 1)
    return InitializationRanking(
        names=names,
        predicted=predicted,
        predicted_rank=rankdata(predicted),
        steps=steps,
        converged=converged,
        measured_rank=rankdata(censored),
        spearman=spearman(predicted, censored),
        predictor=predictor,
        details=details,
    )
