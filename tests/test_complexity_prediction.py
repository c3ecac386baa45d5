"""Tests of tfmeta.complexity.prediction (predict_steps) and of
rank_initializations' default predictor.

* The extrapolation ``steps_from_probe`` against closed forms: the
  hyperbolic and power-law descents it assumes, and (alpha -> infinity) the
  exponential descent of gradient descent on a quadratic loss, whose steps
  to a threshold are known exactly.
* The probe against an independent NumPy re-derivation: full-batch gradient
  descent on softmax regression (the batch order does not matter), so the
  probe's end loss and hence its prediction are known in closed form.
* Refitting the constants from recorded probes, the cost rule, bad input.
* On real MNIST (``tfds_dir``): the ranking of candidate initializations by
  predicted steps, with margins measured over 6 seeds.
"""

import json
import math

import keras
import numpy as np
import pytest

from tfmeta import complexity as cx
from tfmeta.complexity.prediction import (
    PredictorConstants,
    combine_probes,
    steps_from_probe,
)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------
# the extrapolation against closed forms


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.5])
def test_power_law_descent_is_extrapolated_exactly(alpha):
    # U(t) = U0 (1 + c t)^(-alpha) is the descent law the predictor assumes
    # (|dU/dt| ∝ U^(1 + 1/alpha)): from U(0) and U(k) it must find the exact
    # step where U reaches the threshold, t* = ((U0/thr)^(1/alpha) - 1) / c.
    u0, c, k, thr = 2.3, 0.013, 8, 0.1
    u = lambda t: u0 * (1 + c * t) ** (-alpha)  # noqa: E731
    exact = ((u0 / thr) ** (1 / alpha) - 1) / c
    got = steps_from_probe(u0, u(k), u0, u(k), k, thr, alpha)
    assert got == pytest.approx(exact, rel=1e-10)
    # a threshold crossed inside the probe is interpolated on the same law
    assert steps_from_probe(u0, u(k), u0, u(k), k, u(5.0), alpha) == pytest.approx(5.0)


def test_quadratic_loss_under_gradient_descent_is_the_exponential_limit():
    # U(w) = lam/2 w^2, gradient descent w <- w - lr lam w: U_t = U_0 (1 - lr lam)^(2t),
    # so the first step with U_t <= thr is ceil(log(U0/thr) / (-2 log(1 - lr lam))).
    # The power law tends to this exponential as alpha -> infinity.
    lam, lr, w0, thr, k = 3.0, 0.01, 2.0, 1e-3, 8
    u = lambda t: 0.5 * lam * (w0 * (1 - lr * lam) ** t) ** 2  # noqa: E731
    exact = math.log(u(0) / thr) / (-2.0 * math.log(1 - lr * lam))
    got = steps_from_probe(u(0), u(k), u(0), u(k), k, thr, alpha=1e7)
    assert got == pytest.approx(exact, rel=1e-5)
    assert math.ceil(got - 1e-6) == math.ceil(exact)
    # a finite alpha (here the cross-entropy's 1) over-predicts the decaying rate
    assert steps_from_probe(u(0), u(k), u(0), u(k), k, thr, alpha=1.0) > 2 * exact


def test_no_descent_predicts_never_and_a_start_under_the_threshold_zero():
    assert steps_from_probe(0.05, 0.04, 0.05, 0.04, 8, 0.1) == 0.0
    assert steps_from_probe(1.0, 1.2, 1.0, 1.2, 8, 0.1) == math.inf
    # the effective potential sets the speed: a rising D log|H| slows it down
    plain = steps_from_probe(1.0, 0.5, 1.0, 0.5, 8, 0.1)
    dragged = steps_from_probe(1.0, 0.5, 1.0, 0.6, 8, 0.1)
    assert dragged > plain


def test_repeats_are_combined_by_their_mean_descent_so_one_rise_is_not_never():
    # Three batch orders from U = 2: one raised the loss to 2.1, two lowered
    # it to 1.0. The mean end loss is 4.1 / 3; with alpha = 1 and kappa = 0
    # the speed is (3 / 4.1 - 1 / 2) / k and T = k + (1 / 0.1 - 3 / 4.1) / speed.
    k, thr = 10, 0.1
    probes = [dict(loss_end=(u, u, u), log_det=(5.0, 5.0)) for u in (2.1, 1.0, 1.0)]
    out = combine_probes((2.0, 2.0, 2.0), probes, k, thr, 0.01, PredictorConstants(1.0, 0.0))
    speed = (3 / 4.1 - 0.5) / k
    assert out["steps"] == pytest.approx(k + (1 / thr - 3 / 4.1) / speed)
    assert out["per_repeat"][0] == math.inf          # that order alone: no descent
    assert out["stderr_log"] == math.inf and (out["low"], out["high"]) == (0.0, math.inf)
    # every order descending: a finite spread; all rising: never
    probes[0]["loss_end"] = (1.2, 1.2, 1.2)
    out = combine_probes((2.0, 2.0, 2.0), probes, k, thr, 0.01, PredictorConstants(1.0, 0.0))
    assert 0 < out["stderr_log"] < math.inf and out["low"] < out["steps"] < out["high"]
    rising = [dict(loss_end=(2.1, 2.1, 2.1), log_det=(5.0, 5.0))] * 2
    assert combine_probes((2.0,) * 3, rising, k, thr, 0.01, PredictorConstants())["steps"] == math.inf


# --------------------------------------------------------------------------
# the probe against a NumPy re-derivation


def _softmax_regression(d, k, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(k)])


def _numpy_gd_losses(model, x, y, lr, steps):
    """Mean cross-entropy of softmax regression after each full-batch GD step."""
    w, b = [np.asarray(v, np.float64) for v in model.get_weights()]
    onehot = np.eye(w.shape[1])[y]
    losses = []
    for _ in range(steps + 1):
        p = _softmax(x @ w + b)
        losses.append(float(-np.mean(np.log(p[np.arange(len(y)), y]))))
        g = (p - onehot) / len(y)
        w, b = w - lr * x.T @ g, b - lr * g.sum(0)
    return losses


def test_probe_follows_full_batch_gradient_descent_and_predicts_from_it():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32) + 2 * (x[:, 2] > 0.5)
    model = _softmax_regression(5, 4, seed=1)
    lr, k = 0.5, 6
    recipe = cx.TrainingRecipe(optimizer=lambda: keras.optimizers.SGD(lr), batch_size=64,
                               loss_threshold=0.3, seed=0)
    before = [w.copy() for w in model.get_weights()]
    p = cx.predict_steps(model, (x, y), recipe, probe_steps=k, repeats=2, eval_examples=64,
                         max_cost_fraction=None, constants=PredictorConstants(alpha=1.0))
    losses = _numpy_gd_losses(model, x.astype(np.float64), y, lr, k)
    assert p.loss_start == pytest.approx(losses[0], rel=1e-5)
    assert p.loss_end == pytest.approx(losses[k], rel=1e-4)
    # full batch: both repeats are the same descent; the prediction is the
    # closed-form extrapolation of the NumPy losses
    expected = steps_from_probe(losses[0], losses[k], losses[0], losses[k], k, 0.3, 1.0)
    assert p.repeats == 2
    assert p.per_repeat == pytest.approx([expected, expected], rel=1e-3)
    assert p.steps == pytest.approx(expected, rel=1e-3)
    assert p.low <= p.steps <= p.high
    for a, b in zip(before, model.get_weights()):  # the start point is not modified
        np.testing.assert_array_equal(a, b)
    # kappa = 0: the effective potential is the loss; D = kappa lr / (2B)
    assert p.diffusion == 0.0 and p.effective_end == pytest.approx(p.loss_end)
    assert p.noise_scale == pytest.approx(lr / (2 * 64))


def test_repredict_with_other_constants_needs_no_new_probe():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    recipe = cx.TrainingRecipe(optimizer=lambda: keras.optimizers.SGD(0.3, weight_decay=1e-3),
                               batch_size=16, loss_threshold=0.2, seed=3)
    p = cx.predict_steps(lambda: _softmax_regression(5, 2, seed=2), (x, y), recipe,
                         max_cost_fraction=None)
    assert p.repeats == 3 and len(p.probes) == 3
    assert p.stderr_log > 0 and p.low < p.steps < p.high      # batch orders differ
    other = PredictorConstants(alpha=2.0, kappa=0.5)
    again = cx.repredict(p, other)
    direct = combine_probes(p.loss_start_parts, p.probes, p.probe_steps, p.threshold,
                            p.noise_scale, other)
    assert again.steps == pytest.approx(direct["steps"])
    assert again.constants == other and again.diffusion == pytest.approx(0.5 * p.noise_scale)
    # the log-det term moves the prediction once kappa > 0
    assert again.effective_end != pytest.approx(again.loss_end)
    # the same call again: deterministic, and the probe is not traced again
    q = cx.predict_steps(lambda: _softmax_regression(5, 2, seed=2), (x, y), recipe,
                         max_cost_fraction=None)
    assert q.steps == p.steps and not q.traced


def test_cost_rule_stops_repeats_and_bad_input_is_refused():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = _softmax_regression(5, 2, seed=4)
    recipe = cx.TrainingRecipe(optimizer=lambda: keras.optimizers.SGD(0.3), batch_size=16,
                               loss_threshold=0.2)
    # a budget of 0: only the first probe runs
    assert cx.predict_steps(model, (x, y), recipe, max_cost_fraction=0.0).repeats == 1
    with pytest.raises(ValueError, match="loss_threshold"):
        cx.predict_steps(model, (x, y), cx.TrainingRecipe(loss_threshold=None))
    with pytest.raises(ValueError, match="probe_steps must be >= 2"):
        cx.predict_steps(model, (x, y), recipe, probe_steps=1)
    with pytest.raises(ValueError, match="batch_size 16 is larger than the 8"):
        cx.predict_steps(model, (x[:8], y[:8]), recipe)
    with pytest.raises(TypeError, match="keras.Model or a zero-argument model factory"):
        cx.predict_steps("model.keras", (x, y), recipe)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        PredictorConstants(alpha=0.0)
    with pytest.raises(ValueError, match="predictor must be one of"):
        cx.rank_initializations((x, y), {"a": model}, recipe, predictor="loss")


# --------------------------------------------------------------------------
# Kramers' fits and resumable experiments


def test_data_the_model_cannot_take_is_refused_naming_the_fix():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    recipe = cx.TrainingRecipe(optimizer=lambda: keras.optimizers.SGD(0.1), batch_size=8,
                               loss_threshold=0.1, steps=20)
    x = np.random.default_rng(0).random((64, 4)).astype("float32")
    y = np.arange(64) % 3
    with_nan = x.copy()
    with_nan[5, 1] = np.nan
    cases = [
        ((x, np.full(64, 5)), r"labels range over 5\.\.5 but the model has 3 outputs .*num_classes=6"),
        ((x, y[:60]), "has 64 inputs but 60 labels"),
        ((with_nan, y), "non-finite inputs .* in 1 examples, the first at index 5"),
        ((x[:, :3], y), r"examples have shape \(3,\) but the model takes \(4,\)"),
        ((x, y + 0.5), "labels must be integer class ids .* such as 0.5"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            cx.predict_steps(model, data, recipe)
        with pytest.raises(ValueError, match=message):
            cx.train(data, recipe, init=model)
    # whole-number float labels are class ids
    assert cx.train((x, y.astype("float32")), recipe, init=model).steps > 0
    # the Fisher with the data's labels and C_beta check every batch, datasets too
    import tensorflow as tf

    out_of_range = tf.data.Dataset.from_tensor_slices((x, np.full(64, 4))).batch(16)
    for data in (out_of_range, (x, np.full(64, 5))):
        with pytest.raises(ValueError, match="labels range over .* but the model has 3 outputs"):
            cx.diagonal_fisher(model, data, labels="empirical")
        with pytest.raises(ValueError, match="labels range over .* but the model has 3 outputs"):
            cx.complexity(model, data, lam=1.0, weight_decay=5e-4)
    with pytest.raises(ValueError, match="a batch of 64 inputs but 60 labels"):
        cx.complexity(model, (x, y[:60]), lam=1.0, weight_decay=5e-4)
    fractional = tf.data.Dataset.from_tensor_slices((x, y + 0.5)).batch(16)
    with pytest.raises(ValueError, match="labels must be integer class ids .* such as 0.5"):
        cx.diagonal_fisher(model, fractional, labels="empirical")


def test_kramers_fits_recover_their_constants():
    from tfmeta.experiments.complexity_kramers import (
        FLOOR_RATIOS,
        fit_kramers,
        fit_kramers_floor,
        floor_x,
    )

    # eq. 16: log tau = a + b C B / lr, exactly
    x = np.array([0.5, 1.0, 2.0, 4.0])
    a, b = fit_kramers(x, np.exp(1.5 + 0.25 * x))
    assert (a, b) == (pytest.approx(1.5), pytest.approx(0.25))
    # D = D0 + k lr / B: runs generated from it give back a, 1/D0 and k/D0
    ratio = float(FLOOR_RATIOS[40])
    rows = [dict(complexity=c, batch_size=bsz, learning_rate=0.1)
            for c in (0.4, 0.6, 0.9) for bsz in (8, 32, 128, 512)]
    for r in rows:
        r["steps"] = float(np.exp(2.0 + 5.0 * floor_x(r, ratio)))
    a, b, got = fit_kramers_floor(rows)
    assert (a, b, got) == (pytest.approx(2.0), pytest.approx(5.0), pytest.approx(ratio))
    with pytest.raises(ValueError, match="at least two runs"):
        fit_kramers([1.0, 1.0], [3.0, 4.0])


def test_loss_curve_bound_reads_each_fine_tuning_at_a_fraction_of_the_median():
    from tfmeta.experiments.complexity_prediction import loss_curve_bound

    # Three candidates, measured 100, 200, 400 steps (median 200), checks
    # every 10 steps. At 5 % (k = 10) the slowest has the lowest loss (rho
    # -0.5 by hand: ranks (1, 2, 3) against (2, 3, 1)); at 50 % (k = 100)
    # the fastest has converged at step 100 and "a" is read at its last check.
    def cell(name, losses):
        return dict(candidate=name, curve=[[10 * i, v] for i, v in enumerate(losses)])

    cells = [cell("a", [2.0, 1.5, 1.0, 0.5, 0.3, 0.2]),  # stops at step 50
             cell("b", [2.0, 1.9, 1.5, 1.2, 1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]),
             cell("c", [2.0, 1.2, 1.1, 1.05, 1.0, 0.95, 0.9, 0.9, 0.85, 0.8, 0.75])]
    bound = loss_curve_bound(["a", "b", "c"], cells, [100.0, 200.0, 400.0],
                             fractions=(0.05, 0.5))
    assert bound["0.05"] == dict(step=10, spearman=pytest.approx(-0.5))
    # k = 100: a 0.2 (its last check, step 50), b 0.3, c 0.75: the measured order
    assert bound["0.5"] == dict(step=100, spearman=pytest.approx(1.0))
    # a cell without a curve (measured before curves were kept): no bound
    assert loss_curve_bound(["a"], [dict(candidate="a")], [100.0]) == {}


def test_cell_store_checkpoints_and_resumes(tmp_path):
    from tfmeta.experiments.complexity_run import CellStore, run

    import tensorflow  # noqa: F401  (so the cell records the machine, as an experiment's do)

    from tfmeta.experiments import machine

    store = CellStore(tmp_path, "kramers")
    cell = dict(steps=3, machine=machine.describe())
    assert store.put("a", dict(steps=3)) == cell
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == dict(experiment="kramers", cells=dict(a=cell))
    assert CellStore(tmp_path, "kramers", resume=True).get("a") == cell
    assert CellStore(tmp_path, "kramers", resume=False).get("a") is None
    said = []
    CellStore(tmp_path, "kramers", resume=True, log=said.append)
    CellStore(tmp_path, "kramers", resume=False, log=said.append)
    assert said == ["resuming: 1 cells already done"]
    with pytest.raises(ValueError, match="holds a 'kramers' experiment"):
        CellStore(tmp_path, "relabel", resume=True)
    # A file of an older tfmeta, which also said "partial": true, resumes as well.
    (tmp_path / "results.json").write_text('{"experiment": "kramers", "partial": true, "cells": {"b": {"steps": 4}}}')
    assert CellStore(tmp_path, "kramers", resume=True).cells == dict(b=dict(steps=4))

    def no_checkpoints(output_dir):
        return output_dir

    with pytest.raises(ValueError, match="does not checkpoint its cells"):
        run(tmp_path, experiment=no_checkpoints, resume=True)
    assert run(tmp_path, experiment=lambda output_dir, resume=False: resume, resume=True)


# --------------------------------------------------------------------------
# real data


@pytest.mark.data
def test_predicted_ranking_of_initializations_on_real_mnist(tfds_dir):
    # Target: 300 MNIST images; the convnet of the experiments; candidates: a
    # random initialization and models trained (to loss 0.1) on 300 other
    # MNIST images and on 300 Fashion-MNIST images. Measured over seeds 0-5
    # of these settings: fine-tuning steps scratch 100-130 > fashion 60-90 >
    # mnist@3 40-60 in every seed; predicted (DEFAULT_CONSTANTS, repeats
    # combined by their mean descent) scratch 530-1389 > fashion 34-50 >
    # mnist@3 20-27, with fashion / mnist@3 >= 1.26 and scratch / fashion
    # >= 10.8; Spearman rho 1.0 in all six.
    import dataclasses

    from tfmeta.experiments.complexity_tasks import conv_classifier, default_recipe, task_arrays

    recipe = dataclasses.replace(default_recipe(5e-4, steps=3000), seed=0)
    target = task_arrays("mnist", 300, data_dir=tfds_dir)
    candidates = {}
    keras.utils.set_random_seed(0)
    candidates["scratch"] = conv_classifier(num_classes=10)
    for source in ("mnist@3", "fashion_mnist"):
        candidates[source] = cx.train(task_arrays(source, 300, data_dir=tfds_dir), recipe,
                                      model_fn=lambda: conv_classifier(num_classes=10)).model
    ranking = cx.rank_initializations(target, candidates, recipe, num_classes=10)
    assert ranking.predictor == "steps" and all(ranking.converged)
    steps = dict(zip(ranking.names, ranking.steps))
    predicted = dict(zip(ranking.names, ranking.predicted))
    assert steps["scratch"] > steps["fashion_mnist"] > steps["mnist@3"], steps
    assert ranking.order() == ["mnist@3", "fashion_mnist", "scratch"], predicted
    assert predicted["fashion_mnist"] > 1.15 * predicted["mnist@3"], predicted
    assert predicted["scratch"] > 5.0 * predicted["fashion_mnist"], predicted
    assert ranking.spearman == pytest.approx(1.0)
    for name in ranking.names:  # each prediction comes with its interval
        detail = ranking.details[name]
        assert detail.low <= detail.steps <= detail.high
    assert len(ranking.predict_seconds) == len(ranking.finetune_seconds) == 3
