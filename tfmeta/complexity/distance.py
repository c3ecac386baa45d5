"""Static distance between tasks (Achille et al., section 4)::

    d_beta(D1 -> D2) = C_beta(D1 u D2) - C_beta(D1)

where ``C_beta(D)`` is :func:`~tfmeta.complexity.complexity` at the weights
reached by training on ``D`` with a fixed :class:`TrainingRecipe` (the
paper's ``min_Q`` is replaced by "whatever minimum this recipe finds": we
cannot minimize over all weights). ``D1 u D2`` is the concatenation of the two
training sets, shuffled together (:func:`union`); :func:`joint_union` also
joins their label sets. The reachability matrix
(:mod:`tfmeta.complexity.reachability`) and the ranking of initializations
(:mod:`tfmeta.complexity.ranking`) are built on these.

Example::

    d = static_distance((x1, y1), (x2, y2), recipe, model_fn=model_fn,
                        lam=0.1, weight_decay=5e-4)
    d.distance, d.source.total, d.union.total
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import keras
import numpy as np

from tfmeta.complexity import _data
from tfmeta.complexity.measure import Complexity, complexity, resolve_beta
from tfmeta.complexity.training import TrainingRecipe, TrainResult, train

__all__ = [
    "StaticDistance",
    "joint_union",
    "recipe_complexity",
    "shuffled",
    "static_distance",
    "union",
]


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


def joint_union(d_a, d_b, num_classes_a, num_classes_b, same_label_space, seed=0):
    """``D_a u D_b`` with labels in the joint label space, and its class count.

    Tasks in the same label space keep their labels (the classes mean the
    same thing; ``max(n_a, n_b)`` classes); otherwise ``b``'s labels are
    shifted past ``a``'s, so the union has ``n_a + n_b`` classes.

    Example::

        both, k = joint_union(mnist, omniglot, 10, 50, same_label_space=False)  # k = 60
    """
    xb, yb = _data.to_numpy(d_b)
    if same_label_space:
        return union(d_a, (xb, yb), seed), max(int(num_classes_a), int(num_classes_b))
    return union(d_a, (xb, yb + int(num_classes_a)), seed), int(num_classes_a) + int(num_classes_b)


def shuffled(data, seed, max_examples=None):
    """``data`` as ``(x, y)`` arrays (the first ``max_examples``), shuffled (seeded).

    Example::

        x, y = shuffled(dataset, seed=0, max_examples=1000)
    """
    x, y = _data.to_numpy(data, max_examples)
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order]


def recipe_complexity(model, data, beta, lam, recipe, complexity_kwargs=None):
    """:func:`~tfmeta.complexity.complexity` of ``model`` on ``data`` with the
    recipe's ``from_logits`` and ``seed`` (unless ``complexity_kwargs`` set
    them), as every comparison of trained models uses it.

    Example::

        c = recipe_complexity(run.model, (x, y), beta, lam, recipe, dict(fisher_samples=512))
    """
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
    source = shuffled(d1, recipe.seed, max_examples)
    both = union(d1, d2, recipe.seed, max_examples)
    t_source = train(source, recipe, model_fn=model_fn, init=init)
    t_union = train(both, recipe, model_fn=model_fn, init=init)
    c_source = recipe_complexity(t_source.model, source, beta, lam, recipe, complexity_kwargs)
    c_union = recipe_complexity(t_union.model, both, beta, lam, recipe, complexity_kwargs)
    return StaticDistance(
        distance=c_union.total - c_source.total,
        source=c_source,
        union=c_union,
        source_training=t_source,
        union_training=t_union,
    )
