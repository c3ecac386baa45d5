"""Predicting fine-tuning time from a start point, before fine-tuning.

:func:`predict_steps` predicts how many SGD steps a fine-tuning run with a
:class:`~tfmeta.complexity.TrainingRecipe` needs, from a candidate start
point, to bring the target's training loss to ``recipe.loss_threshold``.
It runs a short **probe**: ``probe_steps`` SGD steps from (a copy of) the
start point with the recipe's optimizer, learning rate and batch size, with
a diagonal Fisher estimate at every step, and reads off the quantities of
Achille et al.'s section 5-6 along it:

* ``U``: the target's training loss (mean cross-entropy, inference mode, on
  ``eval_examples`` examples) at the start and at the end of the probe;
* ``log|H|``: ``sum_i log(1 + F_ii / gamma)``, the log-determinant of the
  curvature ``gamma I + F`` (Fisher in place of the Hessian, ``gamma`` the
  recipe's weight decay), in the first and the second half of the probe;
* the effective potential ``U_eff = U + D log|H|`` (eq. 14) with the SGD
  diffusion constant ``D = kappa lr / (2 B)``;
* its slope along the first steps, as the descent speed ``v`` of the law
  below.

Prediction (derived in docs/complexity.md, "Predicting fine-tuning time"):
along the most likely path (eq. 13-14) the weights descend ``U_eff``; with
the descent speed law ``|grad U_eff|^2 ∝ U_eff^(1 + 1/alpha)`` (``alpha = 1``:
the cross-entropy tail, where the gradient scales with the loss),
``G(t) = U_eff(t)^(-1/alpha)`` grows linearly in the step ``t``, so::

    v = (G_eff(k) - G_eff(0)) / k,        T = k + (thr^(-1/alpha) - U(k)^(-1/alpha)) / v

with ``k = probe_steps`` and ``thr = recipe.loss_threshold``. The two
constants ``alpha`` and ``kappa`` (:data:`DEFAULT_CONSTANTS`) were fitted once
on candidates fine-tuned to a task the evaluation does not use (see
docs/complexity.md). With several probe repeats (batch orders) ``T`` is
extrapolated from their mean descent; the uncertainty combines the spread of
the repeats' own ``log T`` and the two halves of the evaluation examples.

Example::

    recipe = TrainingRecipe(optimizer=lambda: keras.optimizers.SGD(0.1), batch_size=32,
                            loss_threshold=0.1)
    p = predict_steps(pretrained_model, (x, y), recipe, num_classes=10)
    p.steps, p.low, p.high, p.seconds
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import time
from typing import Callable, List, Optional, Union

import keras
import numpy as np
import tensorflow as tf

from tfmeta.complexity import _data
from tfmeta.complexity.training import TrainingRecipe, copy_model, replace_head

#: Bumped whenever what a probe measures changes, so that stored probes
#: (``StepsPrediction.probes``) of another version are not mixed with new ones.
PROBE_VERSION = 2

__all__ = ["DEFAULT_CONSTANTS", "PROBE_VERSION", "PredictorConstants", "StepsPrediction",
           "combine_probes", "predict_steps", "repredict", "steps_from_probe"]


@dataclasses.dataclass(frozen=True)
class PredictorConstants:
    """The fitted constants of :func:`predict_steps`.

    Attributes:
      alpha: exponent of the descent law ``U(t) ∝ (1 + c t)^(-alpha)``
        (``|grad U|^2 ∝ U^(1 + 1/alpha)``); 1 is the cross-entropy tail.
      kappa: ``D = |kappa| lr / (2 B)``: the diffusion constant in units of
        the SGD noise scale (``|kappa| = 1`` when the gradient noise
        covariance is the Fisher); its sign is that of the curvature term,
        ``U_eff = U + sign(kappa) D log|H|`` (the paper writes both
        ``U + D log|H|``, eq. 14 and section 6, and ``U - D log|H|_+``,
        section 5.2); 0 drops the term.
    """

    alpha: float = 1.0
    kappa: float = 0.0

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not math.isfinite(self.kappa):
            raise ValueError(f"kappa must be finite, got {self.kappa!r}")


#: Fitted once on the calibration set of docs/results.md (section 4): the
#: Omniglot target's cells of both networks (MLP and convnet, 20 candidates
#: x seeds 0-1; all five seeds give the same values), by
#: ``tfmeta.experiments.complexity_prediction.fit_constants``; MNIST and
#: Fashion-MNIST were not used.
DEFAULT_CONSTANTS = PredictorConstants(alpha=3.5, kappa=10 ** -2.5)


@dataclasses.dataclass
class StepsPrediction:
    """What :func:`predict_steps` returns.

    Attributes:
      steps: predicted SGD steps to ``recipe.loss_threshold``, from the
        repeats' mean descent (``inf`` when the effective potential did not
        descend on their mean).
      stderr_log: standard error of ``log(steps)``.
      low, high: ``steps * exp(-/+ stderr_log)``.
      per_repeat: the prediction of each probe repeat on its own.
      loss_start, loss_end: ``U`` before and after the probe (mean over
        repeats for the end).
      log_det_start, log_det_end: ``sum_i log(1 + F_ii/gamma)`` in the first
        and the second half of the probe (mean over repeats).
      diffusion: ``kappa lr / (2 B)`` (``D`` with the curvature term's sign).
      effective_start, effective_end: ``U_eff`` at the start and the end.
      speed: ``v``, the slope of ``U_eff^(-1/alpha)`` per step (mean).
      probe_steps, repeats: the probe's length and how many repeats ran.
      seconds: wall-clock time of the whole call.
      constants: the :class:`PredictorConstants` used.
      threshold: the loss threshold predicted for.
      noise_scale: ``lr / (2 B)`` (``diffusion = kappa * noise_scale``).
      loss_start_parts: ``U`` at the start on the two halves of the
        evaluation examples and on all of them.
      probes: per repeat, ``loss_end`` (the same three) and ``log_det``
        (the two halves of the probe): what :func:`repredict` needs.
      traced: whether this call traced the probe (the first call for an
        architecture and optimizer configuration; later ones reuse it).
    """

    steps: float
    stderr_log: float
    low: float
    high: float
    per_repeat: List[float]
    loss_start: float
    loss_end: float
    log_det_start: float
    log_det_end: float
    diffusion: float
    effective_start: float
    effective_end: float
    speed: float
    probe_steps: int
    repeats: int
    seconds: float
    constants: PredictorConstants
    threshold: float
    noise_scale: float
    loss_start_parts: tuple
    probes: List[dict]
    traced: bool = False

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["constants"] = dataclasses.asdict(self.constants)
        d["probe_version"] = PROBE_VERSION
        return d


def steps_from_probe(loss_start, loss_end, effective_start, effective_end, probe_steps,
                     threshold, alpha=1.0):
    """Predicted steps to ``threshold`` from a probe's losses (the formula of
    the module docstring): ``v = (E_k^(-1/a) - E_0^(-1/a)) / k`` with ``E``
    the effective potential, ``T = k + (thr^(-1/a) - U_k^(-1/a)) / v``.

    Inside the probe (``U_k <= thr``) the crossing is interpolated on
    ``U^(-1/a)``; ``U_0 <= thr`` gives 0; no descent (``v <= 0``) gives inf.

    Example::

        steps_from_probe(2.0, 1.0, 2.0, 1.0, 10, 0.1)   # 1/U grows 0.05 per step: 10 + 9/0.05 = 190
    """
    if loss_start <= threshold:
        return 0.0
    inv = -1.0 / float(alpha)
    g_thr = threshold ** inv
    if loss_end <= threshold:
        g0, gk = loss_start ** inv, loss_end ** inv
        return float(probe_steps) * (g_thr - g0) / (gk - g0)
    e0, ek = max(effective_start, 1e-12), max(effective_end, 1e-12)
    speed = (ek ** inv - e0 ** inv) / float(probe_steps)
    if not speed > 0:
        return math.inf
    return float(probe_steps) + (g_thr - loss_end ** inv) / speed


# One _Prober per architecture and optimizer configuration (a candidate set
# usually has a few architectures), least recently used dropped first.
_PROBES: "collections.OrderedDict" = collections.OrderedDict()
_MAX_PROBES = 8


def _architecture_key(model, optimizer, from_logits, shapes):
    """What makes two models share traced probes: their configuration with
    layer names replaced by positions (copies and fresh heads get new
    names), the variables' shapes, the optimizer's configuration."""
    try:
        arch = model.to_json()
    except Exception:  # subclassed models without a config: per instance
        arch = f"id:{id(model)}"
    names = dict.fromkeys(re.findall(r'"name": "([^"]*)"', arch))
    for i, name in enumerate(names):  # also renames references to them (functional)
        arch = arch.replace(f'"{name}"', f'"#{i}"')
    variables = tuple((tuple(v.shape), str(v.dtype))
                      for v in [*model.trainable_variables, *model.non_trainable_variables])
    config = dict(optimizer.get_config())
    config.pop("name", None)  # "sgd_3": a counter, not a setting
    return (arch, variables, json.dumps(config, sort_keys=True, default=repr),
            bool(from_logits), shapes)


def _has_batchnorm(model):
    """Whether ``model`` (or a model nested in it) has a BatchNormalization layer."""
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            return True
        stack.extend(getattr(layer, "layers", []))
    return False


class _Prober:
    """A scratch copy of one architecture with its optimizer and the traced
    probe, reused for every start point of that architecture: the weights
    are loaded into the copy and the optimizer's state is reset before each
    probe, so the tracing is paid once, not once per candidate.

    ``evaluate(x, y)`` -> per-example losses: in inference mode, or, for a
    model with BatchNormalization, with batch statistics (the whole
    evaluation set is one batch): after a few steps the moving statistics
    still hold mostly their initial values, so the inference-mode loss of
    a probe would describe the stale statistics, not the weights. (It then
    updates the moving statistics of the scratch copy, which the next
    :meth:`load` overwrites.)
    ``probe(xs, ys, seed)`` runs ``len(xs)`` SGD steps (training mode, the
    recipe's optimizer) on the copy and returns the Fisher log-determinants
    ``sum_i log(1 + F_ii / gamma)`` of the first ``half`` steps and of the
    rest, ``F_ii`` estimated as ``B g_i^2`` from the batch gradient with
    labels sampled from the model (unbiased: that gradient has mean 0 and
    covariance ``F / B``).
    """

    def __init__(self, model, recipe, gamma, half):
        self.model = copy_model(model)
        self.optimizer = recipe.optimizer()
        self.optimizer.build(self.model.trainable_variables)
        self.initial_state = [v.numpy() for v in self.optimizer.variables]
        from_logits = recipe.from_logits
        net, optimizer = self.model, self.optimizer
        tvars = list(net.trainable_variables)

        def nll(out, y):
            logp = _data.log_probs(out, from_logits)
            return logp, -tf.gather(logp, y, axis=-1, batch_dims=1)

        batch_stats = _has_batchnorm(net)

        @tf.function(reduce_retracing=True)
        def evaluate(x, y):
            return nll(net(x, training=batch_stats), y)[1]

        @tf.function(reduce_retracing=True)
        def probe(xs, ys, seed):
            sums = [[tf.zeros(v.shape, tf.float64) for v in tvars] for _ in range(2)]
            for i in range(xs.shape[0]):  # unrolled: the probe is short and static
                x, y = xs[i], ys[i]
                batch = tf.cast(tf.shape(x)[0], tf.float64)
                with tf.GradientTape(persistent=True) as tape:
                    logp, losses = nll(net(x, training=True), y)
                    loss = tf.reduce_mean(losses)
                    sampled = tf.random.stateless_categorical(
                        tf.stop_gradient(logp), 1, dtype=tf.int32,
                        seed=seed + tf.constant([0, 1], tf.int64) * i)[:, 0]
                    model_loss = -tf.reduce_mean(
                        tf.gather(logp, sampled, axis=-1, batch_dims=1))
                grads = tape.gradient(loss, tvars)
                fisher_grads = tape.gradient(model_loss, tvars)
                del tape
                part = 0 if i < half else 1
                sums[part] = [s + batch * tf.square(tf.cast(g, tf.float64))
                              for s, g in zip(sums[part], fisher_grads)]
                optimizer.apply_gradients(zip(grads, tvars))
            counts = (float(half), float(xs.shape[0] - half))
            return [tf.add_n([tf.reduce_sum(tf.math.log1p(s / c / gamma)) for s in sums[p]])
                    for p, c in enumerate(counts)]

        self.evaluate, self.probe = evaluate, probe

    def load(self, weights):
        """Start from ``weights`` (``model.get_weights()``) with a fresh optimizer state."""
        self.model.set_weights(weights)
        for variable, value in zip(self.optimizer.variables, self.initial_state):
            variable.assign(value)


def _prober(model, recipe, gamma, shapes, half):
    """The cached :class:`_Prober` for ``model``'s architecture, and whether
    it is new (its functions will be traced on first use)."""
    key = _architecture_key(model, recipe.optimizer(), recipe.from_logits, shapes) + (gamma, half)
    prober = _PROBES.get(key)
    new = prober is None
    if new:
        prober = _PROBES[key] = _Prober(model, recipe, gamma, half)
        while len(_PROBES) > _MAX_PROBES:
            _PROBES.popitem(last=False)
    _PROBES.move_to_end(key)
    return prober, new


def _resolve_start(model_or_init, num_classes, seed):
    if isinstance(model_or_init, keras.Model):
        model = model_or_init
    elif callable(model_or_init):
        keras.utils.set_random_seed(int(seed))
        model = model_or_init()
    else:
        raise TypeError(
            f"model_or_init must be a keras.Model or a zero-argument model factory, got "
            f"{type(model_or_init).__name__}")
    if not model.built:
        raise ValueError("the start model must be built (call it once or build it)")
    if num_classes is not None:
        model = replace_head(model, num_classes, seed=seed)
    return model


def _optimizer_gamma(recipe, weight_decay):
    if weight_decay is not None:
        gamma = float(weight_decay)
    else:
        gamma = float(getattr(recipe.optimizer(), "weight_decay", None) or 0.0)
        if gamma <= 0:
            gamma = 1e-4  # no weight decay: a small floor keeps log(1 + F/gamma) finite
    if not gamma > 0:
        raise ValueError(f"weight_decay (the curvature floor gamma) must be > 0, got {gamma}")
    return gamma


def predict_steps(
    model_or_init: Union[keras.Model, Callable[[], keras.Model]],
    target_data,
    recipe: TrainingRecipe,
    *,
    probe_steps: int = 8,
    repeats: int = 3,
    eval_examples: int = 256,
    num_classes: Optional[int] = None,
    weight_decay: Optional[float] = None,
    constants: PredictorConstants = DEFAULT_CONSTANTS,
    max_cost_fraction: Optional[float] = 0.05,
    seed: Optional[int] = None,
) -> StepsPrediction:
    """Predict the SGD steps fine-tuning from ``model_or_init`` on
    ``target_data`` with ``recipe`` needs to reach ``recipe.loss_threshold``.

    Args:
      model_or_init: the start point, a built Keras model (left unmodified)
        or a zero-argument factory (called under
        ``keras.utils.set_random_seed(seed)``: a random initialization).
      target_data: ``(x, y)`` arrays or a batched dataset of the target's
        training set.
      recipe: the fine-tuning recipe: its optimizer (learning rate, weight
        decay, momentum), ``batch_size``, ``loss_threshold``, ``seed`` and
        ``from_logits`` are the probe's.
      probe_steps: SGD steps of each probe (>= 2).
      repeats: at most this many probes, each on another batch order.
      eval_examples: examples of the (seeded-shuffled) target on which ``U``
        is evaluated.
      num_classes: replace the start model's head by a fresh one with this
        many classes first (seeded by ``seed``), as fine-tuning does.
      weight_decay: ``gamma`` of ``log|gamma I + F|``; default: the
        optimizer's ``weight_decay`` (1e-4 when it has none).
      constants: :class:`PredictorConstants` (default: the fitted ones).
      max_cost_fraction: repeats after the first run only while the total
        time stays under this fraction of the predicted fine-tuning time
        (estimated as predicted steps x the probe's time per step, a lower
        bound: a fine-tuning step also pays the threshold checks); None runs
        all ``repeats``.
      seed: seeds the head, the batch orders and the label sampling
        (default: ``recipe.seed``).

    Returns:
      :class:`StepsPrediction`.

    Example::

        p = predict_steps(model, (x, y), recipe, num_classes=10)
        print(f"{p.steps:.0f} steps ({p.low:.0f}-{p.high:.0f}), predicted in {p.seconds:.2f} s")
    """
    began = time.perf_counter()
    if recipe.loss_threshold is None:
        raise ValueError("predict_steps needs a recipe with a loss_threshold")
    if int(probe_steps) < 2:
        raise ValueError(f"probe_steps must be >= 2, got {probe_steps}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    seed = int(recipe.seed if seed is None else seed)
    model = _resolve_start(model_or_init, num_classes, seed)
    x, y = _data.to_numpy(target_data)
    _data.check_supervised(model, x, y, "target_data")
    n, batch, k = len(x), int(recipe.batch_size), int(probe_steps)
    if batch > n:
        raise ValueError(f"batch_size {batch} is larger than the {n} target examples")
    rng = np.random.default_rng([seed, 0x5EED])
    eval_index = rng.permutation(n)[:min(n, int(eval_examples))]
    eval_x, eval_y = tf.convert_to_tensor(x[eval_index]), tf.convert_to_tensor(y[eval_index])
    gamma = _optimizer_gamma(recipe, weight_decay)
    half = k // 2
    shapes = (tuple(x.shape[1:]), str(x.dtype), batch, k)
    prober, traced = _prober(model, recipe, gamma, shapes, half)
    weights = model.get_weights()
    prober.load(weights)
    halves = np.arange(len(eval_index)) % 2 == 0
    start_losses = prober.evaluate(eval_x, eval_y).numpy().astype(np.float64)
    prober.load(weights)  # evaluate may have moved BatchNorm statistics
    start = (float(start_losses[halves].mean()), float(start_losses[~halves].mean()),
             float(start_losses.mean()))
    lr = float(keras.ops.convert_to_numpy(prober.optimizer.learning_rate))
    noise_scale = lr / (2.0 * batch)
    threshold = float(recipe.loss_threshold)
    probes = []
    step_seconds = None
    for r in range(int(repeats)):
        t0 = time.perf_counter()
        order = np.random.default_rng([seed, r, 0xB47C]).permutation(n)
        take = np.resize(order, k * batch).reshape(k, batch)
        if r:
            prober.load(weights)
        ld0, ld1 = prober.probe(tf.convert_to_tensor(x[take]), tf.convert_to_tensor(y[take]),
                                tf.constant([seed, 1000 + r], tf.int64))
        end_losses = prober.evaluate(eval_x, eval_y).numpy().astype(np.float64)
        probes.append(dict(loss_end=(float(end_losses[halves].mean()),
                                     float(end_losses[~halves].mean()), float(end_losses.mean())),
                           log_det=(float(ld0), float(ld1))))
        if step_seconds is None:
            step_seconds = (time.perf_counter() - t0) / k
        if max_cost_fraction is not None and r + 1 < int(repeats):
            predicted = combine_probes(start, probes, k, threshold, noise_scale, constants)["steps"]
            spent = time.perf_counter() - began
            if spent * (r + 2) / (r + 1) > max_cost_fraction * predicted * step_seconds:
                break
    out = combine_probes(start, probes, k, threshold, noise_scale, constants)
    return StepsPrediction(**out, probe_steps=k, seconds=time.perf_counter() - began,
                           constants=constants, threshold=threshold, noise_scale=noise_scale,
                           loss_start_parts=start, probes=probes, traced=traced)


def combine_probes(start, probes, probe_steps, threshold, noise_scale, constants):
    """The prediction from the probes' raw measurements (what
    :func:`predict_steps` records in :attr:`StepsPrediction.probes`), for
    any :class:`PredictorConstants`: refitting the constants needs no new
    probe (:func:`repredict`).

    ``start`` and each probe's ``loss_end`` are ``(first half, second half,
    all)`` of the evaluation examples' mean loss; ``log_det`` the two
    halves' log-determinants; ``noise_scale = lr / (2 B)``.
    """
    k = int(probe_steps)
    diffusion = constants.kappa * noise_scale
    inv = -1.0 / constants.alpha

    def predicted(u_start, u_end, delta):
        return steps_from_probe(u_start, u_end, u_start, u_end + delta, k, threshold,
                                constants.alpha)

    # U_eff at the probe's end relative to its start: the two halves'
    # log-dets are k/2 steps apart, so over the probe log|H| changes by
    # 2 (ld1 - ld0).
    deltas = [2.0 * diffusion * (p["log_det"][1] - p["log_det"][0]) for p in probes]
    ends = np.array([p["loss_end"] for p in probes], np.float64)  # repeats x (half, half, all)
    per_repeat = [predicted(start[2], end[2], d) for end, d in zip(ends, deltas)]
    # The prediction extrapolates the mean descent over the repeats (batch
    # orders), an estimate of the expected U(k): a repeat whose batches
    # happened to raise the loss then lowers the speed instead of making
    # the whole prediction inf, as a mean of per-repeat extrapolations
    # would (``per_repeat`` keeps those).
    delta, end = float(np.mean(deltas)), ends.mean(axis=0)
    steps = predicted(start[2], end[2], delta)
    effective = float(end[2] + delta)
    logs = np.log(np.maximum(np.asarray(per_repeat, np.float64), 1e-9))
    halves_log = np.log(np.maximum([predicted(start[h], end[h], delta) for h in (0, 1)], 1e-9))
    if math.isfinite(steps) and np.all(np.isfinite(logs)) and np.all(np.isfinite(halves_log)):
        var = logs.var(ddof=1) / len(logs) if len(logs) > 1 else 0.0
        # The two halves of the evaluation examples: the SE of their mean is
        # |diff| / 2. Every repeat is evaluated on the same examples, so
        # more repeats do not shrink this part.
        var += float((halves_log[0] - halves_log[1]) ** 2 / 4.0)
        se = float(np.sqrt(var))
    else:  # no descent on the mean, in a repeat or on a half: no finite bound
        se = math.inf
    return dict(
        steps=steps, stderr_log=se,
        low=steps * math.exp(-se) if math.isfinite(se) else 0.0,
        high=steps * math.exp(se) if math.isfinite(se) else math.inf,
        per_repeat=[float(v) for v in per_repeat],
        loss_start=float(start[2]),
        loss_end=float(np.mean([p["loss_end"][2] for p in probes])),
        log_det_start=float(np.mean([p["log_det"][0] for p in probes])),
        log_det_end=float(np.mean([p["log_det"][1] for p in probes])),
        diffusion=diffusion, effective_start=float(start[2]),
        effective_end=effective,
        speed=float((max(effective, 1e-12) ** inv - start[2] ** inv) / k),
        repeats=len(probes),
    )


def repredict(prediction: "StepsPrediction", constants: "PredictorConstants",
              threshold: Optional[float] = None) -> "StepsPrediction":
    """``prediction`` recomputed with other constants (or another loss
    threshold) from its recorded probes, without probing again.

    Example::

        again = repredict(p, PredictorConstants(alpha=1.5, kappa=0.0))
    """
    threshold = prediction.threshold if threshold is None else float(threshold)
    out = combine_probes(prediction.loss_start_parts, prediction.probes, prediction.probe_steps,
                         threshold, prediction.noise_scale, constants)
    return dataclasses.replace(prediction, **out, constants=constants, threshold=threshold)
