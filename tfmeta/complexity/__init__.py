"""Fisher-based task complexity, static distance, reachability and ranking.

Implements the measurements of Achille, Mbeng & Soatto, "Dynamics and
Reachability of Learning Tasks" (sections 2-4 and 6) for Keras 3 classifiers:

* :func:`diagonal_fisher`: diagonal Fisher information, labels sampled from
  the model (or exact expectation, or the empirical Fisher by name); its
  per-example gradients take the path :func:`gradient_path` names;
* :func:`complexity`: ``C_beta(w0) = L(w0) + beta/2 [||w0||^2/lam^2
  + sum_i log(1 + 2 lam^2 F_ii / beta)]`` and its pieces;
* :func:`static_distance`: ``d(D1 -> D2) = C(D1 u D2) - C(D1)``;
* :func:`reachability_matrix`: distances and measured fine-tuning steps
  between tasks;
* :func:`predict_steps`: predicted fine-tuning steps from a start point to a
  loss threshold, with an uncertainty, from a short SGD probe with Fisher
  estimates along it (the effective potential of sections 5-6);
* :func:`rank_initializations`: predicted vs measured ease of reaching a task
  from candidate initializations, with Spearman correlation.

The real-data experiments built on them (and their figures) live in
``tfmeta.experiments.complexity_*``. See docs/complexity.md.

Example::

    from tfmeta import complexity as cx
    fisher = cx.diagonal_fisher(model, (x, y), num_samples=1024)
    c = cx.complexity(model, (x, y), lam=0.1, weight_decay=5e-4, fisher=fisher)
"""

from tfmeta.complexity.distance import (
    StaticDistance,
    joint_union,
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
from tfmeta.complexity.per_example import gradient_path
from tfmeta.complexity.prediction import (
    PredictorConstants,
    StepsPrediction,
    predict_steps,
    repredict,
)
from tfmeta.complexity.ranking import (
    InitializationRanking,
    rank_initializations,
    rankdata,
    spearman,
)
from tfmeta.complexity.reachability import Reachability, reachability_matrix
from tfmeta.complexity.training import (
    NOT_CONVERGED,
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
    "PredictorConstants",
    "Reachability",
    "StaticDistance",
    "StepsPrediction",
    "TrainResult",
    "TrainingRecipe",
    "beta_from_weight_decay",
    "complexity",
    "complexity_terms",
    "copy_model",
    "diagonal_fisher",
    "fit_to_threshold",
    "gradient_path",
    "joint_union",
    "predict_steps",
    "rank_initializations",
    "rankdata",
    "reachability_matrix",
    "replace_head",
    "repredict",
    "sgd",
    "spearman",
    "static_distance",
    "train",
    "union",
]
