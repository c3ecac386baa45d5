"""Meta-gradients of every learner against independent NumPy references.

Each test runs `MetaModel.fit` for exactly one (or a few) meta-updates on a
tiny model whose gradients have closed forms (linear regression with MSE,
multinomial logistic regression with softmax cross-entropy) and compares phi
with the same formula computed in float64 NumPy from REFERENCE.md
("First-order meta-gradients", "Continual Trajectory Shifting"). No
TensorFlow is used in the references.

Conventions: outer optimizer SGD(beta), so phi_new = phi - beta * mean_t g_t;
Keras SGD momentum is v = mu v - lr g, w = w + v.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from tfmeta import ContinualTrajectoryShifting, FOMAML, Leap, MetaModel, Reptile



def rate(value):
    """A rate as Keras applies it: through float32 whatever the weights' dtype.

    Keras keeps learning rates in float32 variables and casts Python floats
    (SGD's momentum) from float32 tensors, so float64 weights see 0.1 as
    0.10000000149011612: float64 references use the same values.
    """
    return float(np.float32(value))


ALPHA = rate(0.1)  # inner learning rate
BETA = 0.5  # outer (meta) learning rate
RTOL = 1e-5
ATOL = 1e-6
# float64 models against the same float64 references: only summation order differs.
RTOL64 = 1e-10
ATOL64 = 1e-12
#: dtype -> (rtol, atol) of phi against the NumPy reference
TOLERANCES = {"float32": (RTOL, ATOL), "float64": (RTOL64, ATOL64)}
DTYPES = pytest.mark.parametrize("dtype", ["float32", "float64"])

# --------------------------------------------------------------------------
# NumPy references (float64, hand-derived gradients)


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def mse_loss_grad(params, x, y):
    """f = mean_{b,o} (x W + b - y)^2; df/dW = 2/(B O) x^T r, df/db = 2/(B O) sum_b r."""
    w, b = params
    r = x @ w + b - y
    n = r.size
    return np.mean(r**2), [2.0 / n * x.T @ r, 2.0 / n * r.sum(0)]


def sce_loss_grad(params, x, y):
    """f = mean_b -log softmax(x W + b)[y]; df/dlogits = (softmax - onehot) / B."""
    w, b = params
    p = _softmax(x @ w + b)
    batch = len(x)
    loss = -np.mean(np.log(p[np.arange(batch), y]))
    dz = (p - np.eye(p.shape[1])[y]) / batch
    return loss, [x.T @ dz, dz.sum(0)]


def sgd_step(params, grads, velocity, lr, momentum):
    """Keras SGD: w -= lr g, or v = mu v - lr g; w += v (nesterov=False)."""
    if momentum == 0.0:
        return [p - lr * g for p, g in zip(params, grads)], velocity
    velocity = [momentum * v - lr * g for v, g in zip(velocity, grads)]
    return [p + v for p, v in zip(params, velocity)], velocity


def trajectory(phi, x_t, y_t, loss_grad, lr=ALPHA, momentum=0.0):
    """K inner steps of one task from phi on the mini-batches x_t[k], y_t[k].

    Returns thetas (K+1: theta_0 = phi .. theta_K), losses f_k and gradients
    g_k at theta_k (k = 0..K-1).
    """
    thetas, losses, grads = [list(phi)], [], []
    velocity = [np.zeros_like(p) for p in phi]
    for k in range(len(x_t)):
        loss, grad = loss_grad(thetas[-1], x_t[k], y_t[k])
        losses.append(loss)
        grads.append(grad)
        new, velocity = sgd_step(thetas[-1], grad, velocity, lr, momentum)
        thetas.append(new)
    return thetas, losses, grads


def reptile_grad(phi, thetas, losses, grads):
    return [p - q for p, q in zip(phi, thetas[-1])]


def fomaml_last_grad(phi, thetas, losses, grads):
    return grads[-1]


def fomaml_all_grad(phi, thetas, losses, grads):
    return [np.mean(gs, axis=0) for gs in zip(*grads)]


def leap_grad(thetas, losses, grads, norm=True, loss=True, stabilizer=True):
    """Leap's pull-forward meta-gradient: K steps give K-1 increments.

    For i = 1..K-1: df = f_i - f_{i-1} (0 without the loss dimension), df = -|df|
    with the stabilizer, inc = (theta_{i-1} - theta_i) - df g_{i-1}, divided by
    d = sqrt(df^2 + ||theta_i - theta_{i-1}||^2) (global norm) when norm=True.
    """
    meta = [np.zeros_like(p) for p in thetas[0]]
    for i in range(1, len(losses)):
        df = losses[i] - losses[i - 1] if loss else 0.0
        if stabilizer and df > 0:
            df = -df
        moved = [a - b for a, b in zip(thetas[i - 1], thetas[i])]
        inc = [m - df * g for m, g in zip(moved, grads[i - 1])]
        if norm:
            d = np.sqrt(df**2 + sum(np.sum(m**2) for m in moved))
            inc = [v / d for v in inc]
        meta = [a + v for a, v in zip(meta, inc)]
    return meta


def leap_rule(**options):
    def rule(phi, thetas, losses, grads):
        return leap_grad(thetas, losses, grads, **options)

    return rule


def meta_step(phi, x, y, loss_grad, rule, lr=ALPHA, momentum=0.0, beta=BETA):
    """One meta-update over T tasks: phi - beta * mean_t rule(task t)."""
    per_task = []
    for t in range(len(x)):
        thetas, losses, grads = trajectory(phi, x[t], y[t], loss_grad, lr, momentum)
        per_task.append(rule(phi, thetas, losses, grads))
    mean = [np.mean(g, axis=0) for g in zip(*per_task)]
    return [p - beta * g for p, g in zip(phi, mean)], mean


def momentum_restarted_at(phi, x, y, rule, restart, K=None, lr=0.05, mu=0.9):
    """Wrong variants for the test above: with restart=S the momentum restarts
    every S steps inside one trajectory (one meta-update); with restart=None
    and K it survives across trajectories of length K (meta-update every K)."""
    num_tasks, num_steps = x.shape[:2]
    K = K or num_steps
    velocity = [[np.zeros_like(p) for p in phi] for _ in range(num_tasks)]
    for start in range(0, num_steps, K):
        per_task = []
        for t in range(num_tasks):
            theta, losses, grads, thetas = list(phi), [], [], [list(phi)]
            for k in range(start, start + K):
                if restart and (k - start) % restart == 0:
                    velocity[t] = [np.zeros_like(p) for p in phi]
                loss, g = mse_loss_grad(theta, x[t, k], y[t, k])
                losses.append(loss)
                grads.append(g)
                theta, velocity[t] = sgd_step(theta, g, velocity[t], lr, mu)
                thetas.append(theta)
            per_task.append(rule(phi, thetas, losses, grads))
        phi = [p - BETA * np.mean(g, axis=0) for p, g in zip(phi, zip(*per_task))]
    return phi


def cts_reference(phi, x, y, loss_grad, *, K, lr, momentum, beta, every=1,
                  shift="gradient", hard_reset=False, rule="reptile"):
    """Algorithm 2 of the CTS paper; returns phi after every inner step.

    All T tasks step together; after every `every` steps
    Delta = -beta mean_t MetaGrad, phi += Delta, theta_t += Delta (shift =
    "gradient"; no shift for "none"); tasks restart from phi every K steps,
    the inner momentum restarts only with hard_reset (it is never shifted).
    """
    num_tasks, num_steps = x.shape[:2]
    phi = [p.copy() for p in phi]
    thetas = velocity = None
    last_grads = [None] * num_tasks
    history = []
    for n in range(num_steps):
        if n % K == 0:
            thetas = [[p.copy() for p in phi] for _ in range(num_tasks)]
            if velocity is None or hard_reset:
                velocity = [[np.zeros_like(p) for p in phi] for _ in range(num_tasks)]
        for t in range(num_tasks):
            _, g = loss_grad(thetas[t], x[t, n], y[t, n])
            last_grads[t] = g
            thetas[t], velocity[t] = sgd_step(thetas[t], g, velocity[t], lr, momentum)
        if (n + 1) % every == 0:
            if rule == "reptile":
                per_task = [[p - q for p, q in zip(phi, th)] for th in thetas]
            else:  # FOMAML: the gradient of the step just taken
                per_task = last_grads
            delta = [-beta * np.mean(g, axis=0) for g in zip(*per_task)]
            phi = [p + d for p, d in zip(phi, delta)]
            if shift == "gradient":
                thetas = [[p + d for p, d in zip(th, delta)] for th in thetas]
        history.append(phi)
    return history


def cts_accurate_reference(phi, x, y, loss_grad, *, K, lr, beta):
    """"Ours Accurate": trajectories of length 1, 2, .., K, 1, 2, .. consuming
    consecutive steps of data, each restarted from the current phi (Reptile)."""
    num_tasks, num_steps = x.shape[:2]
    history, n, length = [], 0, 1
    while n < num_steps:
        per_task = []
        for t in range(num_tasks):
            thetas, _, _ = trajectory(phi, x[t, n:n + length], y[t, n:n + length], loss_grad, lr)
            per_task.append([p - q for p, q in zip(phi, thetas[-1])])
        history += [phi] * (length - 1)
        phi = [p - beta * np.mean(g, axis=0) for p, g in zip(phi, zip(*per_task))]
        history.append(phi)
        n += length
        length = length % K + 1
    return history


def bn_moving_stats(mean0, var0, x_t, momentum):
    """Keras BatchNormalization in training: m = mu m + (1 - mu) batch_mean
    (the same for the biased batch variance), over the task's K mini-batches."""
    mean, var = mean0.copy(), var0.copy()
    for xb in x_t:
        mean = momentum * mean + (1 - momentum) * xb.mean(0)
        var = momentum * var + (1 - momentum) * xb.var(0)
    return mean, var


def global_norm(arrays):
    return np.sqrt(sum(np.sum(np.square(a)) for a in arrays))


# --------------------------------------------------------------------------
# models, data and running


def linear_model(d_in, d_out, seed, dtype="float32"):
    """x W + b in `dtype`, weights from a seeded RNG (the same values in every dtype)."""
    model = keras.Sequential([keras.Input((d_in,), dtype=dtype), keras.layers.Dense(d_out, dtype=dtype)])
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.normal(0, 0.5, (d_in, d_out)).astype("float32").astype(dtype),
         rng.normal(0, 0.2, (d_out,)).astype("float32").astype(dtype)]
    )
    return model


def dense_model(seed=1, d_in=3, d_out=2, dtype="float32"):
    """Linear regression W x + b (loss "mse")."""
    return linear_model(d_in, d_out, seed, dtype)


def logreg_model(seed=2, d_in=4, classes=3, dtype="float32"):
    """Multinomial logistic regression (softmax cross-entropy from logits)."""
    return linear_model(d_in, classes, seed, dtype)


def dense_data(tasks, steps, batch=4, seed=0, d_in=3, d_out=2):
    """x [T, K, B, d_in], y [T, K, B, d_out]: a different mini-batch per step."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tasks, steps, batch, d_in)).astype("float32")
    w = rng.normal(size=(tasks, 1, d_in, d_out)).astype("float32")
    y = (x @ w + 0.3 * rng.normal(size=(tasks, steps, batch, d_out))).astype("float32")
    return x, y


def logreg_data(tasks, steps, batch=5, seed=0, d_in=4, classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tasks, steps, batch, d_in)).astype("float32")
    y = rng.integers(0, classes, size=(tasks, steps, batch)).astype("int32")
    return x, y


PROBLEMS = {
    "dense": (dense_model, dense_data, keras.losses.MeanSquaredError(), mse_loss_grad),
    "logreg": (
        logreg_model,
        logreg_data,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sce_loss_grad,
    ),
}


def problem_in(name, dtype):
    """`PROBLEMS[name]` with model, data and loss in `dtype` (the same values)."""
    make_model, make_data, loss, loss_grad = PROBLEMS[name]

    def data(*args, **kwargs):
        x, y = make_data(*args, **kwargs)
        return x.astype(dtype), (y.astype(dtype) if y.dtype.kind == "f" else y)

    loss = type(loss).from_config({**loss.get_config(), "dtype": dtype})
    return (lambda: make_model(dtype=dtype)), data, loss, loss_grad


def make_meta(model, learner, inner_steps, loss=None, inner=None, beta=BETA, **kwargs):
    # A loss object (reduction "sum_over_batch_size"): see
    # test_string_loss_is_the_mean_over_the_batch for loss="mse". It computes
    # in the weights' dtype.
    dtype = model.trainable_variables[0].dtype
    loss = keras.losses.MeanSquaredError(dtype=dtype) if loss is None else loss
    meta = MetaModel(model)
    meta.compile(
        optimizer=keras.optimizers.SGD(learning_rate=beta),
        inner_optimizer=inner or keras.optimizers.SGD(learning_rate=ALPHA),
        loss=loss,
        learner=learner,
        inner_steps=inner_steps,
        **kwargs,
    )
    return meta


def chunked(x, y, steps_per_chunk):
    """Split [T, N, ...] into N / S chunks [T, S, ...] as a tf.data stream."""
    num_steps = x.shape[1]
    assert num_steps % steps_per_chunk == 0
    n = num_steps // steps_per_chunk
    xs = np.stack([x[:, c * steps_per_chunk:(c + 1) * steps_per_chunk] for c in range(n)])
    ys = np.stack([y[:, c * steps_per_chunk:(c + 1) * steps_per_chunk] for c in range(n)])
    return tf.data.Dataset.from_tensor_slices((xs, ys))


class Recorder(keras.callbacks.Callback):
    """phi, meta-update count, running loss and task state after every chunk."""

    def __init__(self, meta):
        super().__init__()
        self._meta = meta
        self.phis, self.updates, self.losses = [], [], []
        self.task_params, self.task_non_trainable = [], []

    def on_train_batch_end(self, batch, logs=None):
        meta = self._meta
        self.phis.append([v.numpy().astype(np.float64) for v in meta.model.trainable_variables])
        self.updates.append(int(meta.meta_updates.numpy()))
        self.losses.append(float(logs["loss"]))
        self.task_params.append([v.numpy().astype(np.float64) for v in meta.task_params])
        self.task_non_trainable.append([v.numpy() for v in meta.task_non_trainable])


def run(meta, x, y, steps_per_chunk):
    recorder = Recorder(meta)
    meta.fit(chunked(x, y, steps_per_chunk), epochs=1, verbose=0, shuffle=False,
             callbacks=[recorder])
    return recorder


def phi_of(model):
    return [v.numpy().astype(np.float64) for v in model.trainable_variables]


def as64(*arrays):
    return [np.asarray(a, np.float64) if np.asarray(a).dtype.kind == "f" else np.asarray(a)
            for a in arrays]


def assert_params_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def assert_meta_grad_close(phi0, phi1, expected_grad, beta=BETA, rtol=1e-4):
    """The meta-gradient the outer SGD applied, (phi0 - phi1) / beta, against
    the reference (tolerance relative to the gradient's scale)."""
    scale = max(global_norm(expected_grad), 1e-3)
    for p0, p1, g in zip(phi0, phi1, expected_grad):
        np.testing.assert_allclose((p0 - p1) / beta, g, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------
# Reptile, FOMAML, Leap: one meta-update after K steps


@pytest.mark.parametrize("problem", ["dense", "logreg"])
@pytest.mark.parametrize(
    "learner, rule",
    [
        (Reptile, reptile_grad),
        (lambda: FOMAML("last"), fomaml_last_grad),
        (lambda: FOMAML("all"), fomaml_all_grad),
        (Leap, leap_rule()),
    ],
    ids=["reptile", "fomaml_last", "fomaml_all", "leap"],
)
@DTYPES
def test_one_meta_update_matches_numpy(problem, learner, rule, dtype):
    make_model, make_data, loss, loss_grad = problem_in(problem, dtype)
    rtol, atol = TOLERANCES[dtype]
    K, T = 3, 2
    model = make_model()
    phi0 = phi_of(model)
    x, y = make_data(T, K, seed=3)
    meta = make_meta(model, learner(), K, loss=loss)
    rec = run(meta, x, y, steps_per_chunk=1)

    assert rec.updates == [0, 0, 1]
    assert int(meta.meta_updates.numpy()) == 1
    expected, grad = meta_step(phi0, *as64(x, y), loss_grad, rule)
    # phi is untouched until the K-th step
    assert_params_close(rec.phis[0], phi0, rtol=0, atol=0)
    assert_params_close(rec.phis[1], phi0, rtol=0, atol=0)
    assert_params_close(phi_of(model), expected, rtol, atol)
    assert_meta_grad_close(phi0, phi_of(model), grad, rtol=1e3 * rtol if dtype == "float64" else 1e-4)
    # the reference gradient is not degenerate
    assert global_norm(grad) > 1e-2


@pytest.mark.parametrize(
    "problem, loss, learner",
    [("dense", "mse", Reptile), ("logreg", "sparse_categorical_crossentropy", Reptile),
     ("dense", "mse", Leap)],
    ids=["mse_reptile", "scce_reptile", "mse_leap"],
)
def test_string_loss_is_the_mean_over_the_batch(problem, loss, learner):
    """loss="mse" (as in the docstrings) must mean what Keras' compile means:
    the mean over the batch, like keras.losses.MeanSquaredError()."""
    make_model, make_data, _, loss_grad = PROBLEMS[problem]
    K, T = 2, 2
    model = make_model()
    phi0 = phi_of(model)
    x, y = make_data(T, K, seed=3)
    if problem == "logreg":  # probabilities, so that from_logits=False applies
        model = keras.Sequential([model, keras.layers.Softmax()])
    meta = make_meta(model, learner(), K, loss=loss)
    run(meta, x, y, steps_per_chunk=1)
    rule = reptile_grad if learner is Reptile else leap_rule()
    expected, _ = meta_step(phi0, *as64(x, y), loss_grad, rule)
    assert_params_close(phi_of(model), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [dict(norm=False), dict(loss=False), dict(stabilizer=False),
     dict(norm=False, loss=False)],
    ids=["energy", "no_loss", "no_stabilizer", "energy_no_loss"],
)
@DTYPES
def test_leap_options_match_numpy(options, dtype):
    make_model, make_data, loss, _ = problem_in("dense", dtype)
    rtol, atol = TOLERANCES[dtype]
    K, T = 4, 3
    model = make_model()
    phi0 = phi_of(model)
    x, y = make_data(T, K, seed=4)
    x64, y64 = as64(x, y)
    # consecutive losses come from different mini-batches and some increase,
    # so the stabilizer and the loss dimension both matter on this data
    losses = [trajectory(phi0, x64[t], y64[t], mse_loss_grad)[1] for t in range(T)]
    assert any(np.any(np.diff(l) > 0) for l in losses)

    meta = make_meta(model, Leap(**options), K, loss=loss)
    rec = run(meta, x, y, steps_per_chunk=2)
    assert rec.updates == [0, 1]
    expected, grad = meta_step(phi0, x64, y64, mse_loss_grad, leap_rule(**options))
    assert_params_close(phi_of(model), expected, rtol, atol)
    assert_meta_grad_close(phi0, phi_of(model), grad, rtol=1e3 * rtol if dtype == "float64" else 1e-4)
    # the option changes the result (it is not silently ignored)
    _, default_grad = meta_step(phi0, x64, y64, mse_loss_grad, leap_rule())
    assert global_norm([a - b for a, b in zip(grad, default_grad)]) > 1e-3


def test_leap_k_steps_give_k_minus_1_increments():
    """With K = 1 there is no increment: the meta-gradient is exactly zero (the authors'
    rule: the first step only records theta_0, g_0, f_0). So compile refuses K = 1."""
    from tfmeta.learners.base import InnerStep

    leap = Leap()
    phi = [tf.constant([1.0, -2.0]), tf.constant(0.5)]
    theta_1 = [tf.constant([0.7, -1.5]), tf.constant(0.2)]
    state = leap.init_state(phi)
    state = leap.observe(state, InnerStep(phi, [tf.ones(2), tf.ones(())], tf.constant(3.0), 0))
    assert all(np.all(g.numpy() == 0) for g in leap.meta_gradient(state, phi, theta_1))
    # The second step adds the first increment.
    state = leap.observe(state, InnerStep(theta_1, [tf.ones(2), tf.ones(())], tf.constant(2.0), 1))
    assert any(np.any(g.numpy() != 0) for g in leap.meta_gradient(state, phi, theta_1))
    with pytest.raises(tfmeta.validation.ConfigError, match="Leap needs inner_steps >= 2, got 1"):
        make_meta(dense_model(), Leap(), 1)


@pytest.mark.parametrize(
    "learner, rule",
    [(Leap, leap_rule()), (Reptile, reptile_grad), (lambda: FOMAML("all"), fomaml_all_grad)],
    ids=["leap", "reptile", "fomaml_all"],
)
@DTYPES
def test_momentum_state_carried_across_chunks_and_reset_per_trajectory(learner, rule, dtype):
    """K = 4 in chunks of S = 2: the SGD momentum of each task survives the
    chunk boundary, and restarts (with the task) at the next trajectory."""
    K, S, T, mu, lr = 4, 2, 2, rate(0.9), rate(0.05)
    make_model, make_data, _, _ = problem_in("dense", dtype)
    tolerance = TOLERANCES[dtype]
    model = make_model()
    phi0 = phi_of(model)
    x, y = make_data(T, 2 * K, seed=6)  # two trajectories
    inner = keras.optimizers.SGD(learning_rate=lr, momentum=mu)
    meta = make_meta(model, learner(), K, inner=inner)
    rec = run(meta, x, y, steps_per_chunk=S)
    assert rec.updates == [0, 1, 1, 2]

    x64, y64 = as64(x, y)
    phi1, _ = meta_step(phi0, x64[:, :K], y64[:, :K], mse_loss_grad, rule, lr=lr, momentum=mu)
    phi2, _ = meta_step(phi1, x64[:, K:], y64[:, K:], mse_loss_grad, rule, lr=lr, momentum=mu)
    assert_params_close(rec.phis[1], phi1, *tolerance)
    assert_params_close(rec.phis[3], phi2, *tolerance)
    # the data tells the alternatives apart: no momentum, momentum restarted at
    # the chunk boundary, momentum kept across the trajectory boundary
    plain, _ = meta_step(phi0, x64[:, :K], y64[:, :K], mse_loss_grad, rule, lr=lr)
    assert global_norm([a - b for a, b in zip(plain, phi1)]) > 1e-3
    per_chunk = momentum_restarted_at(phi0, x64[:, :K], y64[:, :K], rule, restart=S)
    assert global_norm([a - b for a, b in zip(per_chunk, phi1)]) > 1e-3
    kept = momentum_restarted_at(phi0, x64, y64, rule, restart=None, K=K)
    assert global_norm([a - b for a, b in zip(kept, phi2)]) > 1e-3



def test_task_params_hold_each_tasks_trajectory_and_tasks_are_independent():
    K, T = 3, 3
    model = dense_model()
    phi0 = phi_of(model)
    x, y = dense_data(T, K, seed=7)
    meta = make_meta(model, Reptile(), K)
    run(meta, x, y, steps_per_chunk=K)
    x64, y64 = as64(x, y)
    finals = [np.stack(p) for p in zip(*[
        trajectory(phi0, x64[t], y64[t], mse_loss_grad)[0][-1] for t in range(T)])]
    stored = [v.numpy() for v in meta.task_params]
    assert_params_close(stored, finals)

    # change only task 1's data: task 0 and 2 are unaffected
    x2, y2 = x.copy(), y.copy()
    x2[1] = np.random.default_rng(99).normal(size=x2[1].shape).astype("float32")
    y2[1] = -y2[1]
    model2 = dense_model()
    meta2 = make_meta(model2, Reptile(), K)
    run(meta2, x2, y2, steps_per_chunk=K)
    stored2 = [v.numpy() for v in meta2.task_params]
    for a, b in zip(stored, stored2):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[2], b[2])
        assert np.max(np.abs(a[1] - b[1])) > 1e-3


@pytest.mark.parametrize(
    "compile_kwargs, steps_per_chunk",
    [(dict(steps_per_execution=2), 1), (dict(inner_unroll=2), 4), (dict(inner_unroll=2), 2)],
    ids=["steps_per_execution", "inner_unroll_loop", "inner_unroll_no_loop"],
)
def test_execution_options_do_not_change_the_result(compile_kwargs, steps_per_chunk):
    K, T = 4, 2
    model = dense_model()
    phi0 = phi_of(model)
    x, y = dense_data(T, 2 * K, seed=19)
    meta = make_meta(model, Leap(), K, **compile_kwargs)
    run(meta, x, y, steps_per_chunk=steps_per_chunk)
    assert int(meta.meta_updates.numpy()) == 2
    x64, y64 = as64(x, y)
    phi1, _ = meta_step(phi0, x64[:, :K], y64[:, :K], mse_loss_grad, leap_rule())
    phi2, _ = meta_step(phi1, x64[:, K:], y64[:, K:], mse_loss_grad, leap_rule())
    assert_params_close(phi_of(model), phi2)


@pytest.mark.parametrize(
    "learner", [Reptile, Leap, lambda: Leap(norm=False, stabilizer=False)],
    ids=["reptile", "leap", "leap_energy"],
)
def test_vectorize_tasks_gives_the_same_phi(learner):
    K, T = 4, 3
    x, y = dense_data(T, 2 * K, seed=8)
    results = []
    for vectorize in (False, True):
        model = dense_model()
        meta = make_meta(model, learner(), K, vectorize_tasks=vectorize)
        rec = run(meta, x, y, steps_per_chunk=2)
        assert rec.updates == [0, 1, 1, 2]
        results.append(phi_of(model))
    assert_params_close(results[1], results[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Continual Trajectory Shifting


@pytest.mark.parametrize(
    "shift, momentum, hard_reset, rule",
    [
        ("gradient", 0.0, False, "reptile"),
        ("gradient", 0.9, False, "reptile"),
        ("gradient", 0.9, True, "reptile"),
        ("none", 0.0, False, "reptile"),
        ("gradient", 0.0, False, "fomaml"),
    ],
    ids=["gradient", "gradient_momentum_soft_reset", "gradient_momentum_hard_reset",
         "none", "gradient_fomaml"],
)
@DTYPES
def test_cts_matches_algorithm_2(shift, momentum, hard_reset, rule, dtype):
    """K = 3, every = 1, two inner processes (6 steps): phi after every step."""
    K, T, lr, momentum = 3, 3, rate(0.05), rate(momentum)
    make_model, make_data, _, _ = problem_in("dense", dtype)
    tolerance = TOLERANCES[dtype]
    model = make_model()
    phi0 = phi_of(model)
    x, y = make_data(T, 2 * K, seed=9)
    inner = keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    inner_learner = Reptile() if rule == "reptile" else FOMAML()
    learner = ContinualTrajectoryShifting(inner_learner, every=1, shift=shift,
                                          hard_reset=hard_reset)
    meta = make_meta(model, learner, K, inner=inner)
    rec = run(meta, x, y, steps_per_chunk=1)
    assert rec.updates == [1, 2, 3, 4, 5, 6]

    expected = cts_reference(phi0, *as64(x, y), mse_loss_grad, K=K, lr=lr,
                             momentum=momentum, beta=BETA, shift=shift,
                             hard_reset=hard_reset, rule=rule)
    for step, (actual, want) in enumerate(zip(rec.phis, expected)):
        try:
            assert_params_close(actual, want, *tolerance)
        except AssertionError as error:
            raise AssertionError(f"phi differs after inner step {step + 1}") from error


def test_cts_hard_reset_and_shift_change_the_result():
    """The reference itself distinguishes the variants on this data (so the
    CTS tests above can tell them apart)."""
    K, T = 3, 3
    phi0 = phi_of(dense_model())
    x, y = as64(*dense_data(T, 2 * K, seed=9))
    common = dict(K=K, lr=0.05, beta=BETA)
    soft = cts_reference(phi0, x, y, mse_loss_grad, momentum=0.9, **common)[-1]
    hard = cts_reference(phi0, x, y, mse_loss_grad, momentum=0.9, hard_reset=True, **common)[-1]
    none = cts_reference(phi0, x, y, mse_loss_grad, momentum=0.0, shift="none", **common)[-1]
    grad = cts_reference(phi0, x, y, mse_loss_grad, momentum=0.0, **common)[-1]
    assert global_norm([a - b for a, b in zip(soft, hard)]) > 1e-4
    assert global_norm([a - b for a, b in zip(none, grad)]) > 1e-4


@DTYPES
def test_cts_every_two_steps(dtype):
    K, S, T, lr = 4, 2, 2, rate(0.05)
    make_model, make_data, _, _ = problem_in("dense", dtype)
    model = make_model()
    phi0 = phi_of(model)
    x, y = make_data(T, 2 * K, seed=10)
    learner = ContinualTrajectoryShifting(Reptile(), every=2)
    meta = make_meta(model, learner, K, inner=keras.optimizers.SGD(lr))
    rec = run(meta, x, y, steps_per_chunk=S)
    assert rec.updates == [1, 2, 3, 4]
    expected = cts_reference(phi0, *as64(x, y), mse_loss_grad, K=K, lr=lr, momentum=0.0,
                             beta=BETA, every=2)
    for actual, want in zip(rec.phis, expected[S - 1::S]):
        assert_params_close(actual, want, *TOLERANCES[dtype])


@DTYPES
def test_cts_accurate_restarts_growing_trajectories_from_phi(dtype):
    K, T, lr = 3, 2, rate(0.05)
    steps = 1 + 2 + 3 + 1 + 2
    make_model, make_data, _, _ = problem_in("dense", dtype)
    model = make_model()
    phi0 = phi_of(model)
    x, y = make_data(T, steps, seed=11)
    learner = ContinualTrajectoryShifting(Reptile(), shift="accurate")
    meta = make_meta(model, learner, K, inner=keras.optimizers.SGD(lr))
    rec = run(meta, x, y, steps_per_chunk=1)
    assert rec.updates == [1, 1, 2, 2, 2, 3, 4, 4, 5]  # lengths 1, 2, 3, 1, 2
    expected = cts_accurate_reference(phi0, *as64(x, y), mse_loss_grad, K=K, lr=lr, beta=BETA)
    assert len(expected) == steps
    for step, (actual, want) in enumerate(zip(rec.phis, expected)):
        try:
            assert_params_close(actual, want, *TOLERANCES[dtype])
        except AssertionError as error:
            raise AssertionError(f"phi differs after inner step {step + 1}") from error


def test_cts_random_shift_has_the_norm_of_delta_and_another_direction():
    K, T, lr = 3, 3, 0.05
    model = dense_model()
    phi0 = phi_of(model)
    x, y = dense_data(T, K, seed=12)
    learner = ContinualTrajectoryShifting(Reptile(), shift="random")
    meta = make_meta(model, learner, K, inner=keras.optimizers.SGD(lr))
    rec = run(meta, x[:, :2], y[:, :2], steps_per_chunk=1)  # two steps
    assert rec.updates == [1, 2]

    x64, y64 = as64(x, y)
    # step 1: every task from phi0, then Delta_1; tasks get a random shift
    before = [trajectory(phi0, x64[t, :1], y64[t, :1], mse_loss_grad, lr)[0][-1]
              for t in range(T)]
    delta = [-BETA * np.mean([p0 - b[i] for b in before], axis=0)
             for i, p0 in enumerate(phi0)]
    phi1 = [p + d for p, d in zip(phi0, delta)]
    assert_params_close(rec.phis[0], phi1)
    shifted = rec.task_params[0]
    shifts = []
    for t in range(T):
        r = [s[t] - b for s, b in zip(shifted, before[t])]
        shifts.append(np.concatenate([v.ravel() for v in r]))
        np.testing.assert_allclose(global_norm(r), global_norm(delta), rtol=1e-4)
    flat_delta = np.concatenate([d.ravel() for d in delta])
    for s in shifts:
        cosine = s @ flat_delta / (np.linalg.norm(s) * np.linalg.norm(flat_delta))
        assert cosine < 0.99
    # every task draws its own direction
    assert np.linalg.norm(shifts[0] - shifts[1]) > 1e-3 * np.linalg.norm(flat_delta)

    # step 2: the Reptile meta-gradient uses the randomly shifted tasks
    after = [trajectory([s[t] for s in shifted], x64[t, 1:2], y64[t, 1:2], mse_loss_grad,
                        lr)[0][-1] for t in range(T)]
    phi2 = [p - BETA * np.mean([p - a[i] for a in after], axis=0)
            for i, p in enumerate(phi1)]
    assert_params_close(rec.phis[1], phi2)


def test_cts_random_shifts_are_fresh_at_every_meta_update():
    """The random shift of the kernel at meta-update 2 must not be a rescaled
    copy of the bias's random shift at meta-update 1."""
    T, lr = 2, 0.05
    model = dense_model()
    phi0 = phi_of(model)
    x, y = dense_data(T, 2, seed=12)
    learner = ContinualTrajectoryShifting(Reptile(), shift="random")
    meta = make_meta(model, learner, 3, inner=keras.optimizers.SGD(lr))
    rec = run(meta, x, y, steps_per_chunk=1)
    x64, y64 = as64(x, y)
    for t in range(T):
        before1 = trajectory(phi0, x64[t, :1], y64[t, :1], mse_loss_grad, lr)[0][-1]
        after1 = [p[t] for p in rec.task_params[0]]
        before2 = trajectory(after1, x64[t, 1:2], y64[t, 1:2], mse_loss_grad, lr)[0][-1]
        after2 = [p[t] for p in rec.task_params[1]]
        bias_noise_1 = after1[1] - before1[1]  # shape (2,)
        kernel_noise_2 = (after2[0] - before2[0]).ravel()[:2]
        ratio = kernel_noise_2 / bias_noise_1
        assert not np.allclose(ratio, ratio[0], rtol=1e-3), (t, ratio)


# --------------------------------------------------------------------------
# long trajectories: the graph does not grow with K


def _graph_size(concrete):
    graph_def = concrete.graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def test_graph_size_does_not_depend_on_k():
    T, S, B = 2, 10, 2
    sizes = []
    for K in (10, 1000):
        meta = make_meta(dense_model(), Reptile(), K)
        x, y = dense_data(T, S, batch=B, seed=13)
        run(meta, x, y, steps_per_chunk=S)  # builds model, task state and optimizer
        concrete = tf.function(meta.train_step).get_concrete_function(
            (tf.TensorSpec((T, S, B, 3), tf.float32), tf.TensorSpec((T, S, B, 2), tf.float32))
        )
        sizes.append(_graph_size(concrete))
    assert sizes[0] == sizes[1], sizes


def test_k_1000_trajectory_runs_with_one_meta_update():
    K, S, T = 1000, 50, 2
    model = dense_model()
    phi0 = phi_of(model)
    x, y = dense_data(T, K, batch=2, seed=14)
    meta = make_meta(model, Reptile(), K, inner=keras.optimizers.SGD(0.01))
    rec = run(meta, x, y, steps_per_chunk=S)
    assert rec.updates == [0] * 19 + [1]
    assert int(meta.position.numpy()) == 0
    assert_params_close(rec.phis[18], phi0, rtol=0, atol=0)
    assert global_norm([a - b for a, b in zip(phi_of(model), phi0)]) > 1e-2
    expected, _ = meta_step(phi0, *as64(x, y), mse_loss_grad, reptile_grad, lr=0.01)
    assert_params_close(phi_of(model), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# non-trainable state: BatchNorm statistics and seeds


def test_batchnorm_moving_stats_are_the_task_average():
    K, T, mu = 3, 3, 0.9
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.BatchNormalization(momentum=mu),
        keras.layers.Dense(2),
    ])
    rng = np.random.default_rng(15)
    gamma, beta_, mean0, var0 = model.layers[0].get_weights()
    mean0 = rng.normal(size=mean0.shape).astype("float32")
    var0 = rng.uniform(0.5, 2.0, size=var0.shape).astype("float32")
    model.layers[0].set_weights([gamma, beta_, mean0, var0])
    x, y = dense_data(T, K, seed=16)
    x = x * np.array([1.0, 2.0, 0.5], "float32") + np.array([3.0, -1.0, 0.0], "float32")
    meta = make_meta(model, Reptile(), K)
    run(meta, x, y, steps_per_chunk=1)
    assert int(meta.meta_updates.numpy()) == 1

    stats = [bn_moving_stats(*as64(mean0, var0), x[t].astype(np.float64), mu) for t in range(T)]
    bn = model.layers[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([s[0] for s in stats], 0),
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean([s[1] for s in stats], 0),
                               rtol=RTOL, atol=ATOL)
    # each task's own final statistics are kept in the task state
    np.testing.assert_allclose(meta.task_non_trainable[0].numpy(), [s[0] for s in stats],
                               rtol=RTOL, atol=ATOL)
    # the statistics are not meta-learned
    assert all(v.trainable for v in model.trainable_variables)
    assert len(model.trainable_variables) == 4


def test_dropout_seed_advances_between_inner_steps():
    """Identical inputs at two consecutive steps and a frozen inner loop
    (lr = 0): only the dropout masks can change the loss."""
    K, T = 2, 2
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)
    ])
    model.set_weights([w for w in dense_model().get_weights()])
    x, y = dense_data(T, 1, batch=8, seed=17)
    x, y = np.repeat(x, K, axis=1), np.repeat(y, K, axis=1)
    meta = make_meta(model, Reptile(), K, inner=keras.optimizers.SGD(0.0))
    rec = run(meta, x, y, steps_per_chunk=1)
    assert rec.updates == [0, 1]
    first, second = rec.losses[0], 2 * rec.losses[1] - rec.losses[0]
    assert abs(first - second) > 1e-4, (first, second)
    # the stored seed state differs after each step, and the wrapped model's
    # (integer) seed state follows task 0 after the meta-update
    seeds = [s[0] for s in rec.task_non_trainable]
    assert not np.array_equal(seeds[0], seeds[1])
    np.testing.assert_array_equal(model.non_trainable_variables[0].numpy(), seeds[1][0])


def test_tasks_draw_different_dropout_masks():
    """Two tasks with identical data: with per-task random streams their
    (frozen, lr = 0) inner losses differ through the dropout masks alone."""
    T = 2
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)
    ])
    model.set_weights([w for w in dense_model().get_weights()])
    x, y = dense_data(1, 1, batch=8, seed=19)
    x, y = np.repeat(x, T, axis=0), np.repeat(y, T, axis=0)
    meta = make_meta(model, FOMAML(), 1, inner=keras.optimizers.SGD(0.0))
    run(meta, x, y, steps_per_chunk=1)
    grads = meta.task_learner[1].numpy()  # FOMAML state flattens to (count, grads...)
    assert not np.allclose(grads[0], grads[1])


# --------------------------------------------------------------------------
# validation errors name the fix


@pytest.mark.parametrize(
    "missing, phrase",
    [("loss", "needs the task `loss`"), ("learner", "needs `learner`"),
     ("inner_steps", r"inner_steps \(K\) must be an integer >= 1")],
)
def test_compile_requires_loss_learner_and_inner_steps(missing, phrase):
    kwargs = dict(optimizer=keras.optimizers.SGD(0.1), inner_optimizer=keras.optimizers.SGD(0.1),
                  loss="mse", learner=Reptile(), inner_steps=3)
    kwargs[missing] = None
    meta = MetaModel(dense_model())
    with pytest.raises(ValueError, match=phrase):
        meta.compile(**kwargs)


def test_chunk_steps_must_divide_k():
    meta = make_meta(dense_model(), Reptile(), 4)
    x, y = dense_data(2, 3, seed=18)
    with pytest.raises(ValueError, match=r"does not divide the meta-update period.*steps_per_chunk=1"):
        run(meta, x, y, steps_per_chunk=3)


def test_cts_chunks_must_divide_every():
    meta = make_meta(dense_model(), ContinualTrajectoryShifting(Reptile(), every=1), 4)
    with pytest.raises(ValueError, match=r"does not divide the meta-update period of 1"):
        meta.build((2, 2, 4, 3))


def test_k_must_be_a_multiple_of_the_cts_period():
    with pytest.raises(ValueError, match="choose K as a multiple"):
        make_meta(dense_model(), ContinualTrajectoryShifting(every=2), 3)


def test_unbuilt_model_is_rejected():
    with pytest.raises(ValueError, match=r"needs a built model.*model\.build\(input_shape\)"):
        MetaModel(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(TypeError, match="wraps a keras.Model"):
        MetaModel(keras.layers.Dense(2))


def test_cts_cannot_wrap_leap():
    with pytest.raises(ValueError, match=r"cannot wrap Leap.*Wrap Reptile\(\) or FOMAML\(\)"):
        ContinualTrajectoryShifting(Leap())
    with pytest.raises(ValueError, match="choose one of"):
        ContinualTrajectoryShifting(shift="sideways")


def test_learners_are_exported():
    assert tfmeta.Leap is Leap and tfmeta.ContinualTrajectoryShifting is ContinualTrajectoryShifting
