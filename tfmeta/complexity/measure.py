"""Task complexity ``C_beta(w0)`` at a trained minimum (Achille et al., eq. 4).

With a Gaussian prior ``P(w) = N(0, lam^2 I)`` and the optimal Gaussian
posterior around ``w0``, the Lagrangian ``E_Q[L_D] + beta KL(Q || P)`` of the
structure function becomes, to second order,

    C_beta(w0) = L_D(w0) + beta/2 [ ||w0||^2 / lam^2
                                    + log det( (2 lam^2 / beta) F + I ) ]

with the Fisher ``F`` in place of the Hessian of ``L_D`` (as the paper does,
following Martens) and, here, a DIAGONAL Fisher, so that the log-determinant
is ``sum_i log(1 + 2 lam^2 F_ii / beta)``.

Conventions (chosen once, used everywhere in ``tfmeta.complexity`` so that
static distances compare):

* ``L_D`` is the per-example MEAN cross-entropy on the dataset,
  ``E_(x,y)~D[-log p_w(y|x)]`` as in the paper's section 2, evaluated in
  inference mode (``training=False``) on ALL examples of ``data`` (or the
  first ``loss_samples``). ``F`` is accordingly the per-example Fisher (the
  expectation over ``x``), i.e. the Fisher of the mean loss, whose Hessian
  eq. 4 uses. ``reduction="sum"`` switches to the dataset-total convention
  (``L = N * mean``, ``F -> N * F``), whose ``C`` is in nats for the whole
  dataset (the convention of the structure function's information
  interpretation); the two are not comparable with each other.
* ``w0`` and the sum over ``i`` run over the model's TRAINABLE variables
  only (kernels, biases, BatchNorm gamma/beta, ...); non-trainable state such
  as BatchNorm moving statistics is not a parameter of ``p_w`` and is left
  out. ``num_params`` is the ``k`` of the paper's KL.
* ``beta`` relates to weight decay by ``beta = 2 lam^2 gamma``
  (:func:`beta_from_weight_decay`, the paper's section 6). With it the weight
  term is ``gamma ||w0||^2``, which is exactly the penalty of
  ``keras.regularizers.L2(l2=gamma)``. (The paper writes the weight-decay
  potential as ``gamma/2 ||w||^2``, which is a factor 2 off its own
  ``beta = 2 lam^2 gamma``; for decoupled weight decay / SGD
  ``weight_decay=gamma``, which minimizes ``gamma/2 ||w||^2``, use
  ``beta = lam^2 gamma``.)
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from tfmeta.complexity import _data
from tfmeta.complexity.fisher import FisherEstimate, diagonal_fisher

__all__ = [
    "Complexity",
    "beta_from_weight_decay",
    "complexity",
    "complexity_terms",
    "resolve_beta",
]


def beta_from_weight_decay(gamma: float, lam: float) -> float:
    """``beta = 2 lam^2 gamma`` (Achille et al., section 6)."""
    return 2.0 * float(lam) ** 2 * float(gamma)


def resolve_beta(beta=None, lam=None, weight_decay=None):
    """``(beta, lam)`` from either ``beta`` or ``weight_decay`` (and ``lam``)."""
    if lam is None:
        raise ValueError("lam (the prior's standard deviation) is required")
    if (beta is None) == (weight_decay is None):
        raise ValueError("pass exactly one of beta and weight_decay")
    if beta is None:
        beta = beta_from_weight_decay(weight_decay, lam)
    if beta <= 0 or lam <= 0:
        raise ValueError("beta and lam must be positive")
    return float(beta), float(lam)


@dataclasses.dataclass
class Complexity:
    """``C_beta(w0)`` and its pieces (``total = loss + weight_term +
    curvature_term``).

    Attributes:
      total: ``C_beta(w0)``.
      loss: ``L_D(w0)`` (mean cross-entropy, or total with ``reduction="sum"``).
      weight_term: ``beta/2 * ||w0||^2 / lam^2``.
      curvature_term: ``beta/2 * sum_i log(1 + 2 lam^2 F_ii / beta)``.
      beta, lam: the prior/Lagrange parameters used.
      weight_sq_norm: ``||w0||^2`` over trainable variables.
      log_det: ``sum_i log(1 + 2 lam^2 F_ii / beta)``.
      num_params: number of trainable scalars.
      num_examples: examples the loss was averaged over.
      reduction: ``"mean"`` or ``"sum"``.
      fisher: the (per-example) Fisher estimate used.
    """

    total: float
    loss: float
    weight_term: float
    curvature_term: float
    beta: float
    lam: float
    weight_sq_norm: float
    log_det: float
    num_params: int
    num_examples: int
    reduction: str
    fisher: Optional[FisherEstimate] = None

    def as_dict(self):
        d = dataclasses.asdict(self)
        d.pop("fisher")
        return d


def complexity_terms(loss, weight_sq_norm, fisher_diagonal, beta, lam):
    """The pieces of ``C_beta`` from plain numbers (NumPy, float64).

    Returns ``(weight_term, curvature_term, log_det, total)``.
    """
    f = np.asarray(fisher_diagonal, np.float64).reshape(-1)
    if np.any(f < 0):
        raise ValueError("a Fisher diagonal is non-negative")
    log_det = float(np.sum(np.log1p(2.0 * lam**2 * f / beta)))
    weight_term = 0.5 * beta * float(weight_sq_norm) / lam**2
    curvature_term = 0.5 * beta * log_det
    return weight_term, curvature_term, log_det, float(loss) + weight_term + curvature_term


def complexity(
    model,
    data,
    beta: Optional[float] = None,
    lam: Optional[float] = None,
    *,
    weight_decay: Optional[float] = None,
    fisher: Optional[FisherEstimate] = None,
    fisher_samples: Optional[int] = 1024,
    loss_samples: Optional[int] = None,
    labels: str = "model",
    exact: bool = False,
    label_samples: int = 1,
    from_logits: bool = True,
    batch_size: Optional[int] = None,
    reduction: str = "mean",
    seed: int = 0,
) -> Complexity:
    """Complexity ``C_beta(w0)`` of the task ``data`` at the model's weights.

    ``C = L(w0) + beta/2 [ ||w0||^2/lam^2 + sum_i log(1 + 2 lam^2 F_ii/beta) ]``
    (see the module docstring for the conventions).

    Args:
      model: built Keras classifier producing logits (see
        :func:`~tfmeta.complexity.diagonal_fisher`), normally trained on
        ``data``.
      data: the task's training set, ``(x, y)`` arrays or a batched
        ``tf.data.Dataset`` of ``(x, y)``.
      beta, lam: Lagrange multiplier and prior standard deviation. Instead of
        ``beta`` one may pass ``weight_decay=gamma`` (then
        ``beta = 2 lam^2 gamma``).
      fisher: a precomputed per-example :class:`FisherEstimate`; otherwise
        one is estimated on the first ``fisher_samples`` examples (None: all)
        with ``labels``, ``exact``, ``label_samples``, ``seed``.
      loss_samples: examples for ``L`` (None: all).
      reduction: ``"mean"`` (default, the paper's ``L_D``) or ``"sum"``.
    """
    beta, lam = resolve_beta(beta, lam, weight_decay)
    if reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' or 'sum'")
    loss, n = _data.mean_cross_entropy(
        model, data, from_logits=from_logits, num_samples=loss_samples
    )
    if fisher is None:
        fisher = diagonal_fisher(
            model,
            data,
            num_samples=fisher_samples,
            labels=labels,
            exact=exact,
            label_samples=label_samples,
            from_logits=from_logits,
            batch_size=batch_size,
            seed=seed,
        )
    shapes = [tuple(np.shape(d)) for d in fisher.diagonal]
    wanted = [tuple(v.shape) for v in model.trainable_variables]
    if shapes != wanted:
        # Counting entries was not enough: another width's Fisher fitted the count.
        where = next((i for i, (a, b) in enumerate(zip(shapes, wanted)) if a != b), None)
        detail = (f"{len(shapes)} entries for {len(wanted)} variables" if where is None
                  else f"{shapes[where]} for variable {where} of shape {wanted[where]}")
        raise ValueError(
            f"the Fisher estimate is not this model's ({detail}): recompute it with "
            "diagonal_fisher(model, data), or leave fisher= out")
    used = fisher
    if reduction == "sum":
        loss = loss * n
        used = fisher.scaled(n)
    sq_norm = float(
        sum(np.sum(np.square(np.asarray(v.numpy(), np.float64)))
            for v in model.trainable_variables)
    )
    weight_term, curvature_term, log_det, total = complexity_terms(
        loss, sq_norm, used.flat(), beta, lam
    )
    return Complexity(
        total=total,
        loss=float(loss),
        weight_term=weight_term,
        curvature_term=curvature_term,
        beta=beta,
        lam=lam,
        weight_sq_norm=sq_norm,
        log_det=log_det,
        num_params=fisher.num_params,
        num_examples=n,
        reduction=reduction,
        fisher=fisher,
    )
