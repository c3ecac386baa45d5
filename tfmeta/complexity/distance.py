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
from typing import Dict, List, Mapping, Optional, Tuple

import gin
import keras
import numpy as np

from tfmeta.complexity import _data
from tfmeta.complexity.measure import Complexity, complexity, resolve_beta
from tfmeta.complexity.training import TrainingRecipe, TrainResult, train

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
      pretraining: training result on each task from scratch.
      max_steps: the fine-tuning step budget.
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

    def steps_or_none(self):
        """``steps`` as nested lists with None for non-converged runs."""
        return [
            [int(s) if c else None for s, c in zip(row, crow)]
            for row, crow in zip(self.steps, self.converged)
        ]

    def correlation(self, include_diagonal=False):
        """Spearman correlation between distance and fine-tuning steps over
        off-diagonal pairs (non-converged runs count as ``max_steps + 1``)."""
        mask = ~np.eye(len(self.names), dtype=bool) if not include_diagonal else \
            np.ones_like(self.converged)
        steps = np.where(self.converged, self.steps, self.max_steps + 1)
        return spearman(self.distance[mask], steps[mask])


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
) -> Reachability:
    """Distances and fine-tuning times between all ordered pairs of tasks.

    Trains ``model_fn()`` (seeded) on every task and on every pairwise union
    with ``recipe`` (``n + n(n-1)/2`` trainings), then fine-tunes every
    task's model on every other task with ``finetune_recipe`` (default:
    ``recipe``), counting steps to its loss threshold (``n^2`` runs; the
    diagonal is 0 when the pretraining converged).

    All tasks must share the input shape and the label space of ``model_fn``'s
    output (e.g. 10 classes).
    """
    recipe = recipe or TrainingRecipe()
    finetune_recipe = finetune_recipe or recipe
    beta, lam = resolve_beta(beta, lam, weight_decay)
    names = list(datasets)
    n = len(names)
    arrays = {k: _shuffled(datasets[k], recipe.seed, max_examples) for k in names}
    pre, comp = {}, {}
    for k in names:
        pre[k] = train(arrays[k], recipe, model_fn=model_fn)
        comp[k] = _complexity(pre[k].model, arrays[k], beta, lam, recipe, complexity_kwargs)
    union_c = {}
    for i in range(n):
        for j in range(i + 1, n):
            a, b = names[i], names[j]
            both = union(arrays[a], arrays[b], recipe.seed)
            t = train(both, recipe, model_fn=model_fn)
            union_c[(a, b)] = _complexity(t.model, both, beta, lam, recipe, complexity_kwargs)
    distance = np.zeros((n, n))
    steps = np.full((n, n), NOT_CONVERGED, dtype=np.int64)
    converged = np.zeros((n, n), dtype=bool)
    final_loss = np.zeros((n, n))
    for ti, t in enumerate(names):
        for si, s in enumerate(names):
            if ti != si:
                key = (s, t) if si < ti else (t, s)
                distance[ti, si] = union_c[key].total - comp[s].total
            run = train(arrays[t], finetune_recipe, model_fn=model_fn, init=pre[s].model)
            converged[ti, si] = run.converged and finetune_recipe.loss_threshold is not None
            steps[ti, si] = run.steps if converged[ti, si] else NOT_CONVERGED
            final_loss[ti, si] = run.final_loss
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
