"""Fisher-based task complexity, static distance and reachability.

Implements Achille, Mbeng & Soatto, "Dynamics and Reachability of Learning
Tasks" (sections 2-4 and 6) for Keras 3 classifiers:

* :func:`diagonal_fisher`: diagonal Fisher information, labels sampled from
  the model (or exact expectation, or the empirical Fisher by name);
* :func:`complexity`: ``C_beta(w0) = L(w0) + beta/2 [||w0||^2/lam^2
  + sum_i log(1 + 2 lam^2 F_ii / beta)]`` and its pieces;
* :func:`static_distance`: ``d(D1 -> D2) = C(D1 u D2) - C(D1)``;
* :func:`reachability_matrix` / :func:`plot_reachability`: distances and
  measured fine-tuning steps between tasks;
* :func:`rank_initializations`: predicted vs measured ease of reaching a task
  from candidate initializations, with Spearman correlation.

See docs/complexity.md.
"""

from tfmeta.complexity.distance import (
    NOT_CONVERGED,
    InitializationRanking,
    Reachability,
    StaticDistance,
    rank_initializations,
    rankdata,
    reachability_matrix,
    spearman,
    static_distance,
    union,
)
from tfmeta.complexity.fisher import FisherEstimate, diagonal_fisher
from tfmeta.complexity.measure import (
    Complexity,
    beta_from_weight_decay,
    complexity,
    complexity_terms,
)
from tfmeta.complexity.plot import plot_reachability
from tfmeta.complexity.training import (
    TrainingRecipe,
    TrainResult,
    copy_model,
    fit_to_threshold,
    replace_head,
    sgd,
    train,
)

__all__ = [
    "NOT_CONVERGED",
    "Complexity",
    "FisherEstimate",
    "InitializationRanking",
    "Reachability",
    "StaticDistance",
    "TrainResult",
    "TrainingRecipe",
    "beta_from_weight_decay",
    "complexity",
    "complexity_terms",
    "copy_model",
    "diagonal_fisher",
    "fit_to_threshold",
    "plot_reachability",
    "rank_initializations",
    "rankdata",
    "reachability_matrix",
    "replace_head",
    "sgd",
    "spearman",
    "static_distance",
    "train",
    "union",
]
