"""Tests of tfmeta.complexity (Fisher, complexity, static distance, reachability).

Synthetic data only (seeded NumPy Gaussians / blobs): these tests check the
estimators against closed forms and the qualitative properties of the
distance, fast and deterministically.
"""

import struct

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta.configurables  # noqa: F401  (registers tfmeta.complexity with gin)
from tfmeta import complexity as cx
from tfmeta.experiments.complexity_figures import plot_reachability

# --------------------------------------------------------------------------
# helpers


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _logreg(d, k, scale=1.0, seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((d,), dtype=dtype), keras.layers.Dense(k, dtype=dtype)])
    if scale != 1.0:
        w, b = model.get_weights()
        model.set_weights([w * scale, b])
    return model


def _closed_form_fisher(model, x):
    """Model Fisher of multinomial logistic regression: with p = softmax(Wx+b),
    d log p_y / dz_j = 1[y=j] - p_j, and E_{y~p}[(1[y=j] - p_j)^2]
    = p_j (1 - p_j)^2 + (1 - p_j) p_j^2 = p_j (1 - p_j); so
    F(W_ij) = E_x[x_i^2 p_j (1 - p_j)] and F(b_j) = E_x[p_j (1 - p_j)]."""
    w, b = [np.asarray(v, np.float64) for v in model.get_weights()]
    p = _softmax(x.astype(np.float64) @ w + b)
    q = p * (1 - p)
    return [np.einsum("ni,nj->ij", x.astype(np.float64) ** 2, q) / len(x), q.mean(0)]


def _closed_form_empirical(model, x, y):
    w, b = [np.asarray(v, np.float64) for v in model.get_weights()]
    p = _softmax(x.astype(np.float64) @ w + b)
    r2 = (np.eye(p.shape[1])[y] - p) ** 2
    return [np.einsum("ni,nj->ij", x.astype(np.float64) ** 2, r2) / len(x), r2.mean(0)]


def _flat(arrays):
    return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])


DIM = 6
CENTERS = 3.0 * np.eye(DIM, dtype=np.float32)


def _blobs(classes, n, seed, noise=1.0):
    """Gaussian blobs: class c around 3 e_c in R^6, equal class counts."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(classes), n // len(classes))
    x = CENTERS[y] + noise * rng.normal(size=(len(y), DIM))
    return x.astype(np.float32), y.astype(np.int32)


def _mlp():
    return keras.Sequential(
        [keras.Input((DIM,)), keras.layers.Dense(16, activation="relu"),
         keras.layers.Dense(DIM)]
    )


def _recipe(**kw):
    base = dict(optimizer=lambda: keras.optimizers.SGD(0.1), steps=600,
                batch_size=32, loss_threshold=0.1, eval_every=10, seed=0)
    base.update(kw)
    return cx.TrainingRecipe(**base)


# --------------------------------------------------------------------------
# Fisher


def test_exact_fisher_matches_logistic_regression_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=300)
    model = _logreg(5, 4)
    fisher = cx.diagonal_fisher(model, (x, y), exact=True, batch_size=64)
    expected = _closed_form_fisher(model, x)
    assert [tuple(d.shape) for d in fisher.diagonal] == [(5, 4), (4,)]
    assert fisher.num_examples == 300 and fisher.exact and fisher.labels == "model"
    for got, want in zip(fisher.diagonal, expected):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-5)
    assert fisher.trace == pytest.approx(_flat(expected).sum(), rel=1e-5)


def test_sampled_fisher_converges_within_reported_mc_error():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 5)).astype(np.float32)
    model = _logreg(5, 4)
    expected = _flat(_closed_form_fisher(model, x))
    fisher = cx.diagonal_fisher(model, x, label_samples=4, batch_size=250, seed=3)
    est, se = fisher.flat(), fisher.flat_stderr()
    assert np.all(se > 0)
    assert np.max(np.abs(est - expected) / se) < 4.0
    # the error bar itself is informative (not vacuous) ...
    assert fisher.trace_stderr < 0.05 * fisher.trace
    assert abs(fisher.trace - expected.sum()) < 3 * fisher.trace_stderr
    # ... and the estimate is deterministic given the seed, and seed-dependent
    again = cx.diagonal_fisher(model, x, label_samples=4, batch_size=250, seed=3)
    np.testing.assert_array_equal(again.flat(), est)
    other = cx.diagonal_fisher(model, x, label_samples=4, batch_size=250, seed=4)
    assert not np.array_equal(other.flat(), est)


def test_empirical_fisher_differs_from_model_fisher_when_model_is_wrong():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 5)).astype(np.float32)
    model = _logreg(5, 4, scale=6.0)  # confident predictions
    pred = np.argmax(model.predict(x, verbose=0), axis=1)
    wrong = (pred + 1) % 4  # data labels the model confidently disagrees with
    emp = cx.diagonal_fisher(model, (x, wrong), labels="empirical", batch_size=100)
    exact = cx.diagonal_fisher(model, (x, wrong), exact=True, batch_size=100)
    np.testing.assert_allclose(emp.flat(), _flat(_closed_form_empirical(model, x, wrong)),
                               rtol=1e-4, atol=1e-6)
    assert emp.trace > 5 * exact.trace
    assert np.all(emp.flat() >= exact.flat() - 1e-7)


def test_empirical_fisher_equals_fisher_in_expectation_with_model_labels():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 5)).astype(np.float32)
    model = _logreg(5, 4, scale=2.0)
    p = _softmax(np.asarray(model.predict(x, verbose=0), np.float64))
    y_model = np.array([rng.choice(4, p=pi / pi.sum()) for pi in p])
    emp = cx.diagonal_fisher(model, (x, y_model), labels="empirical", batch_size=500)
    exact = cx.diagonal_fisher(model, x, exact=True, batch_size=500)
    assert np.max(np.abs(emp.flat() - exact.flat()) / emp.flat_stderr()) < 4.0
    assert abs(emp.trace - exact.trace) < 3 * emp.trace_stderr


# Convolutional models: tests/test_complexity_conv.py.


def test_fisher_accepts_batched_dataset_probabilities_and_num_samples():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(130, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=130)
    model = _logreg(5, 4)
    probs = keras.Sequential([model, keras.layers.Softmax()])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(25)
    fisher = cx.diagonal_fisher(probs, ds, exact=True, from_logits=False, num_samples=60)
    assert fisher.num_examples == 60
    for got, want in zip(fisher.diagonal, _closed_form_fisher(model, x[:60])):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        cx.diagonal_fisher(model, x, labels="empirical")
    with pytest.raises(ValueError):
        cx.diagonal_fisher(model, (x, y), labels="data")


# --------------------------------------------------------------------------
# dtypes: float64 models keep float64 (NumPy references at 1e-10), mixed precision


def _numpy_tanh_mlp_fisher(model, x):
    """Exact Fisher of x -> tanh(x W1 + b1) W2 + b2 by hand: with
    r = p - e_c = d(-log p_c)/dz, dW2 = h r^T, db2 = r, and through the
    hidden layer d_a = (W2 r) (1 - h^2), dW1 = x d_a^T, db1 = d_a."""
    w1, b1, w2, b2 = [np.asarray(v, np.float64) for v in model.get_weights()]
    acc = [np.zeros_like(w) for w in (w1, b1, w2, b2)]
    for xi in x:
        h = np.tanh(xi @ w1 + b1)
        p = _softmax((h @ w2 + b2)[None])[0]
        for c in range(len(p)):
            r = p - np.eye(len(p))[c]
            d_a = (w2 @ r) * (1 - h**2)
            for a, g in zip(acc, (np.outer(xi, d_a), d_a, np.outer(h, r), r)):
                a += p[c] * g**2
    return [a / len(x) for a in acc]


def test_float64_fisher_matches_numpy_to_1e10():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(40, 5))
    y = rng.integers(0, 4, size=40)
    logreg = _logreg(5, 4, scale=2.0, dtype="float64")
    exact = cx.diagonal_fisher(logreg, x, exact=True, batch_size=16)
    for got, want in zip(exact.diagonal, _closed_form_fisher(logreg, x)):
        assert got.dtype == tf.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-15)
    emp = cx.diagonal_fisher(logreg, (x, y), labels="empirical")
    np.testing.assert_allclose(emp.flat(), _flat(_closed_form_empirical(logreg, x, y)),
                               rtol=1e-10, atol=1e-15)
    assert all(s.dtype == tf.float64 for s in emp.stderr)
    sampled = cx.diagonal_fisher(logreg, x, label_samples=3)
    assert all(d.dtype == tf.float64 for d in sampled.diagonal)

    keras.utils.set_random_seed(12)
    mlp = keras.Sequential([keras.Input((5,), dtype="float64"),
                            keras.layers.Dense(7, activation="tanh", dtype="float64"),
                            keras.layers.Dense(3, dtype="float64")])
    fisher = cx.diagonal_fisher(mlp, x, exact=True)
    for got, want in zip(fisher.diagonal, _numpy_tanh_mlp_fisher(mlp, x)):
        assert got.dtype == tf.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-15)


def test_float64_complexity_and_distance_stay_float64():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(60, 5))
    y = rng.integers(0, 4, size=60)
    model = _logreg(5, 4, scale=2.0, dtype="float64")
    beta, lam = 0.05, 0.7
    c = cx.complexity(model, (x, y), beta, lam, exact=True, fisher_samples=None)
    w, b = [np.asarray(v, np.float64) for v in model.get_weights()]
    p = _softmax(x @ w + b)
    loss = -np.mean(np.log(p[np.arange(60), y]))
    f = _flat(_closed_form_fisher(model, x))
    curvature = beta / 2 * np.sum(np.log1p(2 * lam**2 * f / beta))
    assert c.loss == pytest.approx(loss, rel=1e-12)
    assert c.curvature_term == pytest.approx(curvature, rel=1e-10)
    assert c.total == pytest.approx(
        loss + beta / 2 * (np.sum(w**2) + np.sum(b**2)) / lam**2 + curvature, rel=1e-10)

    def model_fn():
        return keras.Sequential([keras.Input((DIM,), dtype="float64"),
                                 keras.layers.Dense(DIM, dtype="float64")])

    a, b_ = _blobs([0, 1], 40, seed=14), _blobs([2, 3], 40, seed=15)
    a, b_ = (a[0].astype(np.float64), a[1]), (b_[0].astype(np.float64), b_[1])
    assert cx.union(a, b_)[0].dtype == np.float64
    d = cx.static_distance(a, b_, _recipe(steps=20, loss_threshold=None), model_fn=model_fn,
                           lam=1.0, weight_decay=1e-3)
    for part in (d.source, d.union):
        assert all(v.dtype == tf.float64 for v in part.fisher.diagonal)
    assert d.distance == pytest.approx(d.union.total - d.source.total, rel=1e-12)


def test_mixed_float16_fisher_is_float32_and_close_to_the_float32_model():
    def build():
        return keras.Sequential([keras.Input((8, 8, 1)),
                                 keras.layers.Conv2D(4, 3, activation="relu"),
                                 keras.layers.Flatten(), keras.layers.Dense(5)])

    keras.utils.set_random_seed(16)
    reference = build()
    x = np.random.default_rng(17).normal(size=(32, 8, 8, 1)).astype(np.float32)
    want = cx.diagonal_fisher(reference, x, exact=True)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = build()
    finally:
        keras.config.set_dtype_policy(previous)
    mixed.set_weights(reference.get_weights())
    assert mixed(x[:1]).dtype == tf.float16  # the forward pass runs in float16
    got = cx.diagonal_fisher(mixed, x, exact=True)
    assert got.path == "vectorized"
    assert all(d.dtype == tf.float32 for d in got.diagonal)
    # float16 rounding of the forward and backward pass, ~1e-2 of the largest entry
    assert np.max(np.abs(got.flat() - want.flat())) < 0.03 * np.max(want.flat())
    assert got.trace == pytest.approx(want.trace, rel=1e-2)


# --------------------------------------------------------------------------
# complexity


def test_complexity_terms_match_numpy():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = rng.integers(0, 4, size=200)
    model = _logreg(5, 4, scale=2.0)
    beta, lam = 0.05, 0.7
    c = cx.complexity(model, (x, y), beta, lam, exact=True, fisher_samples=None)

    w, b = [np.asarray(v, np.float64) for v in model.get_weights()]
    p = _softmax(x.astype(np.float64) @ w + b)
    loss = -np.mean(np.log(p[np.arange(200), y]))
    sq = np.sum(w**2) + np.sum(b**2)
    f = _flat(_closed_form_fisher(model, x))
    weight_term = beta / 2 * sq / lam**2
    curvature = beta / 2 * np.sum(np.log1p(2 * lam**2 * f / beta))
    assert c.loss == pytest.approx(loss, rel=1e-5)
    assert c.weight_sq_norm == pytest.approx(sq, rel=1e-6)
    assert c.weight_term == pytest.approx(weight_term, rel=1e-6)
    assert c.curvature_term == pytest.approx(curvature, rel=1e-5)
    assert c.total == pytest.approx(loss + weight_term + curvature, rel=1e-5)
    assert c.total == pytest.approx(c.loss + c.weight_term + c.curvature_term)
    assert c.num_params == 24 and c.num_examples == 200 and c.reduction == "mean"

    # weight decay instead of beta: beta = 2 lam^2 gamma
    assert cx.beta_from_weight_decay(0.01, 0.7) == pytest.approx(2 * 0.49 * 0.01)
    c_wd = cx.complexity(model, (x, y), lam=lam, weight_decay=beta / (2 * lam**2),
                         fisher=c.fisher)
    assert c_wd.total == pytest.approx(c.total, rel=1e-9)
    assert c_wd.weight_term == pytest.approx(beta / (2 * lam**2) * sq, rel=1e-9)

    # the dataset-total convention: L -> N L, F -> N F
    c_sum = cx.complexity(model, (x, y), beta, lam, fisher=c.fisher, reduction="sum")
    assert c_sum.loss == pytest.approx(200 * loss, rel=1e-5)
    assert c_sum.curvature_term == pytest.approx(
        beta / 2 * np.sum(np.log1p(2 * lam**2 * 200 * f / beta)), rel=1e-5)
    with pytest.raises(ValueError):
        cx.complexity(model, (x, y), beta, lam, weight_decay=0.1)


# --------------------------------------------------------------------------
# distances


def test_static_distance_is_asymmetric_for_a_task_and_its_simpler_part():
    full = _blobs(list(range(DIM)), 600, seed=10)  # D1: all six classes
    part = _blobs([0, 1], 100, seed=20)  # D2: two of them (fresh samples)
    kw = dict(model_fn=_mlp, lam=1.0, weight_decay=1e-3,
              complexity_kwargs=dict(fisher_samples=512))
    recipe = _recipe()
    d12 = cx.static_distance(full, part, recipe, **kw)
    d21 = cx.static_distance(part, full, recipe, **kw)
    # C(D1 u D2) is the same number in both directions
    assert d12.union.total == pytest.approx(d21.union.total, rel=1e-9)
    assert d12.distance == pytest.approx(d12.union.total - d12.source.total)
    # learning the simple part after the full task costs little; the reverse a lot
    assert d21.distance > 0
    assert d21.distance > 3 * abs(d12.distance)
    assert d21.source.total < d12.source.total  # the part is the simpler task


def test_reachability_matrix_and_plot(tmp_path):
    tasks = {
        "ab": _blobs([0, 1], 120, seed=30),
        "cd": _blobs([2, 3], 120, seed=31),
        "abcd": _blobs([0, 1, 2, 3], 240, seed=32),
    }
    recipe = _recipe(steps=300, loss_threshold=0.15)
    reach = cx.reachability_matrix(
        tasks, _mlp, recipe, lam=1.0, weight_decay=1e-3,
        complexity_kwargs=dict(fisher_samples=256),
    )
    assert reach.names == ["ab", "cd", "abcd"]
    assert reach.distance.shape == reach.steps.shape == reach.converged.shape == (3, 3)
    assert np.all(np.diag(reach.distance) == 0)
    assert reach.steps.dtype.kind == "i"
    assert np.all((reach.steps >= 0) == reach.converged)
    assert np.all(reach.steps[~reach.converged] == cx.NOT_CONVERGED)
    assert np.all(reach.steps[reach.converged] <= recipe.steps)
    for row in reach.steps_or_none():
        assert all(s is None or isinstance(s, int) for s in row)
    assert set(reach.union_complexity) == {("ab", "cd"), ("ab", "abcd"), ("cd", "abcd")}
    # distance[t, s] = C(s u t) - C(s)
    i, j = reach.names.index("abcd"), reach.names.index("ab")
    assert reach.distance[i, j] == pytest.approx(
        reach.union_complexity[("ab", "abcd")].total - reach.complexity["ab"].total)
    # the superset task reaches its part more easily than the reverse
    assert reach.distance[j, i] < reach.distance[i, j]
    path = plot_reachability(reach, tmp_path / "reach" / "matrix.png")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_rank_initializations_reports_steps_and_spearman():
    target = _blobs([0, 1, 2, 3], 240, seed=40)
    recipe = _recipe(steps=300, loss_threshold=0.15)
    same_task = cx.train(_blobs([0, 1, 2, 3], 240, seed=41), recipe, model_fn=_mlp).model
    other_task = cx.train(_blobs([4, 5], 120, seed=42), recipe, model_fn=_mlp).model
    keras.utils.set_random_seed(7)
    scratch = _mlp()
    before = [w.copy() for w in same_task.get_weights()]
    ranking = cx.rank_initializations(
        target, {"scratch": scratch, "other": other_task, "same": same_task},
        recipe, lam=1.0, weight_decay=1e-3,
        complexity_kwargs=dict(fisher_samples=256),
    )
    assert ranking.names == ["scratch", "other", "same"]
    assert ranking.predicted.shape == ranking.steps.shape == (3,)
    assert np.all((ranking.steps >= 0) == ranking.converged)
    assert -1.0 <= ranking.spearman <= 1.0
    assert ranking.order()[0] == "same"  # a model of the target task is predicted easiest
    assert ranking.steps[2] == min(ranking.steps[ranking.converged])
    assert ranking.spearman > 0
    # candidates are not modified by the measurement
    for w0, w1 in zip(before, same_task.get_weights()):
        np.testing.assert_array_equal(w0, w1)


def test_rank_initializations_distance_needs_a_source_for_every_candidate():
    target = _blobs([0, 1], 60, seed=43)
    keras.utils.set_random_seed(8)
    candidates = {"a": _mlp(), "b": _mlp()}
    # sources {a} is not a superset of candidates {a, b}: b has no source.
    sources = {"a": _blobs([0, 1], 60, seed=44)}
    with pytest.raises(ValueError, match=r"missing for \['b'\]"):
        cx.rank_initializations(target, candidates, _recipe(), lam=1.0, weight_decay=1e-3,
                                predictor="distance", sources=sources)
    # a source naming no candidate is a typo, not an extra (a strict-subset
    # test once let {a, c} through to a KeyError)
    sources["c"] = _blobs([2, 3], 60, seed=45)
    with pytest.raises(ValueError, match=r"sources names \['c'\] but the candidates are \['a', 'b'\]"):
        cx.rank_initializations(target, candidates, _recipe(), lam=1.0, weight_decay=1e-3,
                                predictor="distance", sources=sources)
    with pytest.raises(ValueError, match=r"missing for \['a', 'b'\]"):
        cx.rank_initializations(target, candidates, _recipe(), lam=1.0, weight_decay=1e-3,
                                predictor="distance")


def test_spearman_with_ties_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(8)
    a = rng.integers(0, 5, size=40).astype(float)
    b = a + rng.normal(size=40)
    b[:5] = 3.0
    assert cx.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    np.testing.assert_array_equal(cx.rankdata([3, 1, 3, 2]), [3.5, 1, 3.5, 2])
    assert np.isnan(cx.spearman([1, 1, 1], [1, 2, 3]))


def test_fit_to_threshold_counts_steps():
    data = _blobs([0, 1], 200, seed=50)
    res = cx.train(data, _recipe(steps=200, loss_threshold=0.2, eval_every=5), model_fn=_mlp)
    assert res.converged and res.final_loss <= 0.2
    assert res.steps % 5 == 0 and 0 < res.steps <= 200
    assert res.curve[0][0] == 0 and res.curve[-1] == (res.steps, res.final_loss)
    again = cx.train(data, _recipe(steps=200, loss_threshold=0.2, eval_every=5), model_fn=_mlp)
    assert again.steps == res.steps  # deterministic
    # from a converged init: zero steps, and the init is left untouched
    before = [w.copy() for w in res.model.get_weights()]
    ft = cx.train(data, _recipe(steps=200, loss_threshold=0.2), init=res.model)
    assert ft.steps == 0 and ft.converged
    for w0, w1 in zip(before, res.model.get_weights()):
        np.testing.assert_array_equal(w0, w1)
    budget = cx.train(data, _recipe(steps=20, loss_threshold=1e-6, eval_every=10),
                      model_fn=_mlp)
    assert not budget.converged and budget.steps == 20


def test_gin_configures_recipe_and_functions():
    # Registered centrally (tfmeta.configurables): bindings reach the
    # configurables gin hands out (`@name`, gin.get_configurable), not the
    # library functions themselves.
    gin.clear_config()
    try:
        gin.parse_config(
            """
            tfmeta.complexity.TrainingRecipe.steps = 7
            tfmeta.complexity.TrainingRecipe.optimizer = @tfmeta.complexity.sgd
            tfmeta.complexity.sgd.learning_rate = 0.5
            tfmeta.complexity.diagonal_fisher.exact = True
            """
        )
        recipe = gin.get_configurable("tfmeta.complexity.TrainingRecipe")(batch_size=4)
        assert isinstance(recipe, cx.TrainingRecipe)
        assert recipe.steps == 7 and recipe.batch_size == 4
        assert float(recipe.optimizer().learning_rate) == pytest.approx(0.5)
        rng = np.random.default_rng(9)
        x = rng.normal(size=(50, 5)).astype(np.float32)
        model = _logreg(5, 3)
        fisher = gin.get_configurable("tfmeta.complexity.diagonal_fisher")(model, x)
        assert fisher.exact
        assert not cx.diagonal_fisher(model, x).exact  # the library function is untouched
        np.testing.assert_allclose(fisher.flat(), _flat(_closed_form_fisher(model, x)),
                                   atol=1e-5)
        # Keras models are untouched by gin: still trainable and callable
        assert model(x[:2]).shape == (2, 3)
    finally:
        gin.clear_config()


def test_fine_check_stops_at_the_first_step_under_the_threshold():
    # Reference: checking after every step from the start (eval_every=1) finds
    # the first step whose loss is <= the threshold. With coarse checks
    # (every 10) and fine_check_factor the run must stop at that same step
    # with the same weights (the checks do not change the training); without
    # it, at the next multiple of 10.
    data = _blobs([0, 1], 200, seed=51)
    keras.utils.set_random_seed(3)
    init = _mlp()
    ref = cx.train(data, _recipe(steps=300, loss_threshold=0.2, eval_every=1), init=init)
    fine = cx.train(data, _recipe(steps=300, loss_threshold=0.2, eval_every=10,
                                  fine_check_factor=3.0), init=init)
    coarse = cx.train(data, _recipe(steps=300, loss_threshold=0.2, eval_every=10), init=init)
    assert ref.converged and fine.converged and coarse.converged
    first = next(step for step, loss in ref.curve if loss <= 0.2)
    assert ref.steps == first and fine.steps == first, (ref.steps, fine.steps)
    assert fine.resolution == 1 and coarse.resolution == 10
    assert coarse.steps == -(-first // 10) * 10
    for a, b in zip(ref.model.get_weights(), fine.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert fine.final_loss <= 0.2 < [loss for step, loss in fine.curve if step == first - 1][0]
    with pytest.raises(ValueError, match="fine_check_factor must be None or >= 1"):
        _recipe(fine_check_factor=0.5)
