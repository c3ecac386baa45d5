"""Ranks, Spearman correlation, and the ranking of candidate initializations.

:func:`rank_initializations` predicts, for each candidate initialization,
how easily fine-tuning reaches a target task (by default the fine-tuning
steps :func:`~tfmeta.complexity.predict_steps` predicts from a short probe;
or the complexity potential at the candidate's weights, or the static
distance from the candidate's own task), measures the fine-tuning steps,
and compares the two by Spearman's rank correlation (:func:`spearman`,
average ranks for ties).

Example::

    ranking = rank_initializations((x, y), {"scratch": fresh, "other": trained},
                                   recipe, lam=0.1, weight_decay=5e-4)
    ranking.order(), ranking.steps, ranking.spearman
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Mapping, Optional

import keras
import numpy as np

from tfmeta.complexity.distance import recipe_complexity, shuffled, static_distance
from tfmeta.complexity.measure import resolve_beta
from tfmeta.complexity.prediction import predict_steps
from tfmeta.complexity.training import NOT_CONVERGED, TrainingRecipe, replace_head, train
from tfmeta.validation import ConfigError, check_keys

#: The predictors of :func:`rank_initializations`, the default first.
PREDICTORS = ("steps", "potential", "distance")

__all__ = ["PREDICTORS", "InitializationRanking", "rank_initializations", "rankdata", "spearman"]


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
      predictor: ``"steps"``, ``"potential"`` or ``"distance"``.
      details: per-candidate ``StepsPrediction`` (steps), ``Complexity``
        (potential) or ``StaticDistance``.
      predict_seconds, finetune_seconds: wall-clock time of each
        candidate's prediction and of its measured fine-tuning.
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
    predict_seconds: Optional[np.ndarray] = None
    finetune_seconds: Optional[np.ndarray] = None

    def order(self) -> List[str]:
        """Candidate names, predicted easiest first."""
        return [self.names[i] for i in np.argsort(self.predicted, kind="mergesort")]


def rank_initializations(
    target,
    candidates: Mapping[str, keras.Model],
    recipe: Optional[TrainingRecipe] = None,
    *,
    beta: Optional[float] = None,
    lam: Optional[float] = None,
    weight_decay: Optional[float] = None,
    predictor: str = "steps",
    sources: Optional[Mapping[str, object]] = None,
    model_fn=None,
    complexity_kwargs: Optional[dict] = None,
    max_examples: Optional[int] = None,
    num_classes: Optional[int] = None,
    predict_kwargs: Optional[dict] = None,
) -> InitializationRanking:
    """Rank candidate initializations by predicted ease of reaching ``target``
    and measure the actual fine-tuning steps.

    Predictors (lower = easier):

    * ``"steps"`` (default): the fine-tuning steps to
      ``recipe.loss_threshold`` that :func:`~tfmeta.complexity.predict_steps`
      predicts from a short SGD probe with the recipe (``predict_kwargs``
      are passed on; its ``seed`` is ``recipe.seed``). It needs neither
      ``beta``/``lam`` nor the candidates' training data.
    * ``"potential"`` (needs nothing but the candidate's weights):
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
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
    if predictor != "steps":
        beta, lam = resolve_beta(beta, lam, weight_decay)
    if len(candidates) < 2:
        raise ConfigError(
            f"rank_initializations needs at least two candidates to rank, got "
            f"{list(candidates)}: add e.g. a random initialization "
            "(tfmeta.finetune.random_initialization(model)) as a baseline."
        )
    for name, cand in candidates.items():
        if not isinstance(cand, keras.Model):
            raise ConfigError(
                f"candidates[{name!r}] is {cand!r}, not a Keras model: load an exported "
                "initialization with tfmeta.load_initialization(path)."
            )
    check_keys("sources", sources, list(candidates), what="candidates")
    if predictor == "distance":
        missing = sorted(set(candidates) - set(sources or {}))
        if missing:
            raise ValueError(
                f"predictor='distance' needs sources[name] (the candidate's training set) "
                f"for every candidate; missing for {missing}: add them to sources, or use "
                "predictor='potential'"
            )
    if recipe.loss_threshold is None:
        raise ValueError("ranking needs a loss_threshold in the recipe")
    names = list(candidates)
    arrays = shuffled(target, recipe.seed, max_examples)
    if num_classes is not None:
        candidates = {k: replace_head(candidates[k], num_classes, seed=recipe.seed)
                      for k in names}
        model_fn = None
    predicted, details = [], {}
    steps, converged, predict_seconds, finetune_seconds = [], [], [], []
    # Every prediction before any fine-tuning (each fine-tuning reseeds
    # TensorFlow, which clears its kernel cache: a prediction right after
    # one would pay the rebuild).
    for name in names:
        cand = candidates[name]
        t0 = time.perf_counter()
        if predictor == "steps":
            c = predict_steps(cand, arrays, recipe, **(predict_kwargs or {}))
            predicted.append(c.steps)
        elif predictor == "potential":
            c = recipe_complexity(cand, arrays, beta, lam, recipe, complexity_kwargs)
            predicted.append(c.total)
        else:
            c = static_distance(
                sources[name], arrays, recipe, model_fn=model_fn, init=cand,
                beta=beta, lam=lam, complexity_kwargs=complexity_kwargs,
                max_examples=max_examples,
            )
            predicted.append(c.distance)
        details[name] = c
        predict_seconds.append(time.perf_counter() - t0)
    for name in names:
        t0 = time.perf_counter()
        run = train(arrays, recipe, model_fn=model_fn, init=candidates[name])
        finetune_seconds.append(time.perf_counter() - t0)
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
        predict_seconds=np.asarray(predict_seconds),
        finetune_seconds=np.asarray(finetune_seconds),
    )
