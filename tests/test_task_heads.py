"""Per-task heads (`tfmeta.TaskHeads`): the body is meta-learned, the heads never are.

Checked against independent references:
- a NumPy re-derivation (float64, hand-derived gradients of a tanh MLP with a
  softmax head) of Reptile, Leap, FOMAML and CTS where each task's head
  starts from its source's bank row, the learner sees only the body's
  parameters of each trajectory, and the bank row follows the head after
  every chunk. Real data: scikit-learn's digits (no download), sources with
  3, 4 and 5 classes sharing one 5-unit head;
- phi's head variables bit-identical after meta-updates, with inner and
  outer SGD with momentum and weight decay (also in the NumPy reference);
- bank rows of the sources trained change, the others stay bit-identical;
  restarts read the bank (the same reference with restarts from phi's head
  does not match); unused classes keep the bias -1e4 and probability 0;
- duplicates in one meta-batch give the mean of their heads, a diverged task
  writes nothing, under MirroredStrategy (2 logical CPUs, in a subprocess)
  as with one replica;
- checkpoints capture the bank; exports say the head is not meta-learned and
  load with a fresh head.

The module-level tests drive `TaskState`/`OuterStep` directly; the others go
through `MetaModel(model, heads=...)`.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from tfmeta import ContinualTrajectoryShifting, ExcludeHeads, FOMAML, Leap, MetaModel, Reptile, TaskHeads
from tfmeta.export import export_initialization, load_initialization, read_export_info
from tfmeta.inner_optimizer import make_stateless
from tfmeta.learners.base import InnerStep, MetaLearner
from tfmeta.outer_step import OuterStep
from tfmeta.schedule import Schedule
from tfmeta.task_heads import UNUSED_CLASS_BIAS, unpack_task_batch
from tfmeta.task_state import TaskState
from tfmeta.tasks.digits import digits_arrays
from tfmeta.validation import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6
ALPHA, BETA = 0.1, 0.5  # inner, outer learning rates
T, K, B, HIDDEN, UNITS = 2, 3, 8, 6, 5
# Source s: the digits of SOURCES[s], label = position. Head 4 is never sampled.
SOURCES = [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (0, 3, 6), (1, 4, 7, 9)]
NUM_CLASSES = [5, 5, 3, 4, 5]
# Meta-batch m's sources per task slot: 2 and 3 come back, in other slots.
IDS = np.array([[0, 2], [2, 3], [1, 3]], np.int32)
M = len(IDS)


# --------------------------------------------------------------------------
# data, model, and the NumPy reference


def task_stream(ids=IDS, seed=0):
    """x float32 [M, T, K, B, 8, 8, 1] in [0, 1], y int32 [M, T, K, B]: digits of each source."""
    images, labels = digits_arrays()
    rng = np.random.default_rng(seed)
    x = np.zeros((len(ids), T, K, B, 8, 8, 1), np.float32)
    y = np.zeros((len(ids), T, K, B), np.int32)
    for m, row in enumerate(ids):
        for t, source in enumerate(row):
            digits = SOURCES[source]
            picked = rng.choice(np.flatnonzero(np.isin(labels, digits)), K * B, replace=False)
            x[m, t] = (images[picked] / 255.0).reshape(K, B, 8, 8, 1)
            y[m, t] = np.searchsorted(digits, labels[picked]).reshape(K, B)
    return x, y


def chunks(x, y, ids):
    """The stream's chunks (one inner step each): element m*K+k is step k of meta-batch m."""
    xs = x.transpose(0, 2, 1, 3, 4, 5, 6).reshape(-1, T, 1, B, 8, 8, 1)
    ys = y.transpose(0, 2, 1, 3).reshape(-1, T, 1, B)
    return xs, ys, np.repeat(ids, K, axis=0)


def make_net():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(),
        keras.layers.Dense(HIDDEN, activation="tanh"), keras.layers.Dense(UNITS),
    ])


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def mlp_loss_grad(params, x, y):
    """f = mean_b -log softmax(tanh(x W1 + b1) W2 + b2)[y], with its gradient by hand."""
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    p = softmax(h @ w2 + b2)
    n = len(x)
    dz = (p - np.eye(p.shape[1])[y]) / n
    da = dz @ w2.T * (1.0 - h**2)
    return -np.mean(np.log(p[np.arange(n), y])), [x.T @ da, da.sum(0), h.T @ dz, dz.sum(0)]


def sgd(params, grads, velocity, lr, momentum=0.0, decay=0.0):
    """Keras SGD: decoupled weight decay w -= lr wd w first, then v = mu v - lr g; w += v."""
    params = [p - lr * decay * p for p in params]
    velocity = [momentum * v - lr * g for v, g in zip(velocity, grads)]
    return [p + v for p, v in zip(params, velocity)], velocity


def leap_body(phi, thetas, losses, grads):
    """Leap's increments (stabilizer, norm) on the body's path; f from the whole network."""
    meta = [np.zeros_like(p) for p in phi]
    for i in range(1, len(losses)):
        df = -abs(losses[i] - losses[i - 1])
        moved = [a - b for a, b in zip(thetas[i - 1], thetas[i])]
        d = np.sqrt(df**2 + sum(np.sum(v**2) for v in moved))
        meta = [a + (v - df * g) / d for a, v, g in zip(meta, moved, grads[i - 1])]
    return meta


RULES = {
    "reptile": lambda phi, thetas, losses, grads: [p - q for p, q in zip(phi, thetas[-1])],
    "fomaml": lambda phi, thetas, losses, grads: grads[-1],
    "leap": leap_body,
}


def reference(phi, bank, x, y, ids, rule, inner=(ALPHA, 0.0, 0.0), outer=(BETA, 0.0, 0.0),
              heads_from_bank=True):
    """phi [W1, b1, W2, b2] and bank [W [H, ...], b [H, UNITS]] after the meta-batches (float64).

    Every task starts with phi's body and its source's bank row (phi's own
    head with heads_from_bank=False: the wrong variant); the bank row
    follows its head after every step, unused classes keeping -1e4. The
    learner's rule sees the body only: theta[:2]. "cts": Algorithm 2 with
    Reptile, a meta-update after every step that shifts every task's body;
    body momentum survives restarts, the heads' restarts. Others: one
    meta-update per trajectory, all momentum restarts.
    """
    phi = [np.array(p, np.float64) for p in phi]
    bank = [np.array(b, np.float64) for b in bank]
    unused = np.arange(UNITS)[None] >= np.array(NUM_CLASSES)[:, None]
    outer_velocity = [np.zeros_like(p) for p in phi[:2]]
    body_velocity = [[np.zeros_like(p) for p in phi[:2]] for _ in range(T)]

    def meta_update(grads):
        nonlocal outer_velocity
        new, outer_velocity = sgd(phi[:2], grads, outer_velocity, *outer)
        delta = [a - b for a, b in zip(new, phi[:2])]
        phi[:2] = new
        return delta

    for m, row in enumerate(ids):
        heads = [[bank[0][i].copy(), bank[1][i].copy()] if heads_from_bank else phi[2:] for i in row]
        tasks = [phi[:2] + list(h) for h in heads]
        if rule != "cts":
            body_velocity = [[np.zeros_like(p) for p in phi[:2]] for _ in range(T)]
        head_velocity = [[np.zeros_like(p) for p in phi[2:]] for _ in range(T)]
        paths = [([phi[:2]], [], []) for _ in range(T)]
        for k in range(K):
            for t, source in enumerate(row):
                loss, g = mlp_loss_grad(tasks[t], x[m, t, k].reshape(B, -1).astype(np.float64),
                                        y[m, t, k])
                body, body_velocity[t] = sgd(tasks[t][:2], g[:2], body_velocity[t], *inner)
                head, head_velocity[t] = sgd(tasks[t][2:], g[2:], head_velocity[t], *inner)
                tasks[t] = body + head
                for part, value in zip(paths[t], (body, loss, g[:2])):
                    part.append(value)
                bank[0][source] = head[0]
                bank[1][source] = np.where(unused[source], UNUSED_CLASS_BIAS, head[1])
            if rule == "cts":
                delta = meta_update([np.mean([p - th[j] for th in tasks], axis=0)
                                     for j, p in enumerate(phi[:2])])
                tasks = [[th[0] + delta[0], th[1] + delta[1], *th[2:]] for th in tasks]
        if rule != "cts":
            per_task = [RULES[rule](phi[:2], *path) for path in paths]
            meta_update([np.mean(g, axis=0) for g in zip(*per_task)])
    return phi, bank


# --------------------------------------------------------------------------
# through MetaModel


def meta_model(net, heads):
    return MetaModel(net, heads=heads)


LEARNERS = {
    "reptile": Reptile,
    "leap": Leap,
    "fomaml": FOMAML,
    "cts": lambda: ContinualTrajectoryShifting(Reptile()),
}


def meta_train(rule, inner=(ALPHA, 0.0, 0.0), outer=(BETA, 0.0, 0.0), steps=None, net=None,
               heads=None, restore=None):
    """Meta-train on the digits stream; returns the net, the TaskHeads, the MetaModel, phi0, bank0."""
    net = net or make_net()
    heads = heads or TaskHeads(len(NUM_CLASSES), num_classes=NUM_CLASSES)
    meta = meta_model(net, heads)
    meta.compile(
        optimizer=keras.optimizers.SGD(outer[0], momentum=outer[1], weight_decay=outer[2] or None),
        inner_optimizer=keras.optimizers.SGD(inner[0], momentum=inner[1],
                                             weight_decay=inner[2] or None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        learner=LEARNERS[rule](), inner_steps=K,
    )
    meta.build((T, 1, B, 8, 8, 1))
    phi0 = [v.numpy().copy() for v in net.trainable_variables]
    bank0 = [v.numpy().copy() for v in heads.bank]
    start = 0 if restore is None else restore(meta)
    xs, ys, ids = chunks(*task_stream(), IDS)
    stop = steps or len(xs)
    stream = tf.data.Dataset.from_tensor_slices((xs[start:stop], ys[start:stop], ids[start:stop]))
    meta.fit(stream, epochs=1, verbose=0)
    return net, heads, meta, phi0, bank0


def assert_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{what} {i}")


@pytest.mark.parametrize("rule", ["reptile", "leap", "fomaml", "cts"])
def test_body_meta_gradient_matches_numpy_and_heads_never_move_phi(rule):
    net, heads, meta, phi0, bank0 = meta_train(rule)
    x, y = task_stream()
    phi, bank = reference(phi0, bank0, x, y, IDS, rule)
    after = [v.numpy() for v in net.trainable_variables]
    assert_close(after, phi, "phi")
    assert_close([v.numpy() for v in heads.bank], bank, "bank")
    for a, b in zip(after[2:], phi0[2:]):  # phi's head, bit for bit
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(after[0], phi0[0])
    trained, untouched = sorted(set(IDS.ravel())), 4
    for now, start in zip(heads.bank, bank0):
        now = now.numpy()
        np.testing.assert_array_equal(now[untouched], start[untouched])
        assert all(not np.allclose(now[s], start[s]) for s in trained)
    if rule == "reptile":  # restarts read the bank: from phi's head the result differs
        wrong, wrong_bank = reference(phi0, bank0, x, y, IDS, rule, heads_from_bank=False)
        assert not np.allclose(after[0], wrong[0], rtol=RTOL, atol=ATOL)
        assert not np.allclose(heads.bank[0].numpy()[3], wrong_bank[0][3], rtol=RTOL, atol=ATOL)


def test_momentum_and_weight_decay_never_move_phis_head_and_unused_classes_stay_off():
    """Inner and outer SGD with momentum 0.9 and weight decay."""
    inner, outer = (ALPHA, 0.9, 0.05), (BETA, 0.9, 0.1)
    net, heads, meta, phi0, bank0 = meta_train("reptile", inner=inner, outer=outer)
    x, y = task_stream()
    phi, bank = reference(phi0, bank0, x, y, IDS, "reptile", inner=inner, outer=outer)
    after = [v.numpy() for v in net.trainable_variables]
    assert_close(after, phi, "phi")
    assert_close([v.numpy() for v in heads.bank], bank, "bank")
    for a, b in zip(after[2:], phi0[2:]):
        np.testing.assert_array_equal(a, b)
    # Weight decay pulled the tasks' unused biases towards 0; the bank keeps -1e4.
    _, bias = heads.head_weights(2)
    np.testing.assert_array_equal(bias[3:], [UNUSED_CLASS_BIAS] * 2)
    assert np.all(meta.task_params[3].numpy()[:, 4] > UNUSED_CLASS_BIAS)
    # Source 2's net (body + its head): classes 3 and 4 have probability 0.
    own = keras.models.clone_model(net)
    own.set_weights(after[:2] + heads.head_weights(2))
    p = keras.ops.softmax(own(x[1, 0, 0])).numpy()
    assert np.all(p[:, 3:] < 1e-30) and np.allclose(p[:, :3].sum(1), 1.0)


def test_checkpoint_and_resume_capture_the_bank(tmp_path):
    """Killed after 4 of 9 chunks, resumed: the uninterrupted result."""
    from tfmeta.checkpoint import restore_checkpoint, save_checkpoint

    _, heads, meta, phi0, bank0 = meta_train("leap", steps=4)
    path = save_checkpoint(meta, tmp_path, step=4)
    assert any(v.path.endswith("task_heads_kernel") for v in meta.variables)
    net, resumed, _, _, _ = meta_train(
        "leap", restore=lambda m: int(restore_checkpoint(m, path)["step"])
    )
    x, y = task_stream()
    phi, bank = reference(phi0, bank0, x, y, IDS, "leap")
    assert_close([v.numpy() for v in net.trainable_variables], phi, "phi")
    assert_close([v.numpy() for v in resumed.bank], bank, "bank")


def test_metamodel_refuses_batches_without_ids_and_ids_out_of_range():
    meta = meta_model(make_net(), TaskHeads(3))
    xs, ys, ids = chunks(*task_stream(), IDS)
    meta.compile(optimizer="sgd", inner_optimizer="sgd", learner=Reptile(), inner_steps=K,
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ConfigError, match="must carry each task's source index"):
        meta.fit(tf.data.Dataset.from_tensor_slices((xs, ys)), epochs=1, verbose=0)
    meta = meta_model(make_net(), TaskHeads(3))
    meta.compile(optimizer="sgd", inner_optimizer="sgd", learner=Reptile(), inner_steps=K,
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ConfigError, match="task ids out of range: task_ids must be in 0..2"):
        meta.fit(tf.data.Dataset.from_tensor_slices((xs, ys, ids)), epochs=1, verbose=0)


# --------------------------------------------------------------------------
# 2 replicas (subprocess: logical CPUs must be set before TensorFlow starts)

# Global task slots 0, 1 on replica 0, slots 2, 3 on replica 1. Source 0 is
# in slots 0 and 2 at once (its row becomes the mean of both heads); source
# 2 is trained on replica 1, then on replica 0.
MIRRORED_IDS = np.array([[0, 1, 0, 2], [2, 3, 1, 0]], np.int32)


def _mirrored_run(strategy):
    x, y = task_stream(MIRRORED_IDS.reshape(-1, T))
    x = x.reshape(len(MIRRORED_IDS), 4, K, B, 8, 8, 1).transpose(0, 2, 1, 3, 4, 5, 6)
    y = y.reshape(len(MIRRORED_IDS), 4, K, B).transpose(0, 2, 1, 3)
    xs = x.reshape(-1, 4, 1, B, 8, 8, 1)
    ys = y.reshape(-1, 4, 1, B)
    ids = np.repeat(MIRRORED_IDS, K, axis=0)
    with strategy.scope():
        net = make_net()
        heads = TaskHeads(4, num_classes=[5, 5, 3, 4])
        meta = meta_model(net, heads)
        meta.compile(optimizer=keras.optimizers.SGD(BETA, momentum=0.9, weight_decay=0.1),
                     inner_optimizer=keras.optimizers.SGD(ALPHA, momentum=0.9),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     learner=Leap(), inner_steps=K)
    # (x, y, task_ids): the ids ride where Keras puts sample weights.
    meta.fit(tf.data.Dataset.from_tensor_slices((xs, ys, ids)), epochs=1, verbose=0)
    copies = [[c.numpy().tolist() for c in strategy.experimental_local_results(v.value)]
              for v in heads.bank]
    return {"phi": [v.numpy().tolist() for v in net.trainable_variables], "bank": copies}


def _mirrored_main():
    from tfmeta import distribute

    devices = distribute.use_logical_cpus(2)
    two = distribute.get_strategy("mirrored", devices)
    out = {"two": _mirrored_run(two), "one": _mirrored_run(tf.distribute.get_strategy())}
    print("RESULT " + json.dumps(out))


def test_two_replicas_keep_one_bank_and_give_the_result_of_one():
    meta_model(make_net(), TaskHeads(4))  # fails here, clearly, without the hook
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__, "mirrored"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    one, two = out["one"], out["two"]
    for copies in two["bank"]:
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1])  # identical on every replica
    for a, b in zip(two["phi"], one["phi"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for copies, single in zip(two["bank"], one["bank"]):
        np.testing.assert_allclose(copies[0], single[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# the parts, driven directly (no MetaModel)


class Recorder(MetaLearner):
    """Reptile that records the shapes of every list it is handed."""

    def __init__(self):
        self.seen = []

    def init_state(self, params):
        self.seen.append([tuple(p.shape) for p in params])
        return {}

    def observe(self, state, step):
        self.seen += [[tuple(p.shape) for p in part] for part in (step.params, step.grads)]
        return state

    def meta_gradient(self, state, phi, params):
        self.seen += [[tuple(p.shape) for p in part] for part in (phi, params)]
        return [a - b for a, b in zip(phi, params)]

    def shift(self, params, delta, seed):
        self.seen += [[tuple(p.shape) for p in part] for part in (params, delta)]
        return [p + d for p, d in zip(params, delta)]


def test_exclude_heads_hands_the_learner_the_body_only():
    shapes = [(3, 4), (4,), (4, 2), (2,)]
    phi = [tf.fill(s, 1.0) for s in shapes]
    params = [tf.fill(s, 3.0) for s in shapes]
    inner = Recorder()
    learner = ExcludeHeads(inner, head_indices=(2, 3))
    state = learner.init_state(phi)
    learner.observe(state, InnerStep(params, params, tf.constant(0.0), tf.constant(0)))
    grads = learner.meta_gradient(state, phi, params)
    shifted = learner.shift(params, phi, tf.zeros((2,), tf.int64))
    assert all(seen == shapes[:2] for seen in inner.seen) and len(inner.seen) == 7
    np.testing.assert_array_equal(grads[0].numpy(), np.full((3, 4), -2.0))
    for i in (2, 3):
        np.testing.assert_array_equal(grads[i].numpy(), np.zeros(shapes[i]))
        assert shifted[i] is params[i]
    np.testing.assert_array_equal(shifted[1].numpy(), np.full((4,), 4.0))
    assert learner.schedule is inner.schedule
    with pytest.raises(ValueError, match="cannot wrap another ExcludeHeads"):
        ExcludeHeads(learner, (2, 3))


def _owner():
    return keras.layers.Layer(name="owner")


def test_bank_rows_are_the_heads_initializers_reseeded_per_head_with_unused_classes_off():
    net = make_net()
    heads = TaskHeads(3, num_classes=[5, 2, 4], seed=7).bind(net)
    kernel, bias = heads.build(_owner())
    assert heads.indices == (2, 3) and kernel.shape == (3, HIDDEN, UNITS)
    for h in range(3):  # Keras' default GlorotUniform and Zeros, head h seeded 7 + h
        expected = keras.initializers.GlorotUniform(seed=7 + h)((HIDDEN, UNITS)).numpy()
        np.testing.assert_array_equal(kernel.numpy()[h], expected)
    np.testing.assert_array_equal(bias.numpy(), [[0] * 5, [0, 0] + [-1e4] * 3, [0] * 4 + [-1e4]])
    assert not kernel.trainable and all(v is not kernel for v in net.trainable_variables)
    assert tfmeta.heads.head_meta_learned(net) is False
    assert tfmeta.heads.head_meta_learned(make_net()) is True


@pytest.mark.parametrize("make, message", [
    (lambda: TaskHeads(0), "num_heads"),
    (lambda: TaskHeads(2, num_classes=[3]), "one integer >= 1 per head"),
    (lambda: TaskHeads(2, num_classes=2.5), r"num_classes=\[2\.5\]\) needs one integer >= 1"),
    (lambda: TaskHeads(2, num_classes=[3, 9]).bind(make_net()), "has 5 units"),
    (lambda: TaskHeads(2).bind(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])),
     "no trainable weights besides its head"),
    (lambda: TaskHeads(2).bind(keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])),
     "last layer is its Dense head"),
    (lambda: TaskHeads(2, num_classes=[2, 2]).bind(keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2, activation="relu")])),
     "logits"),
])
def test_bad_configurations_name_the_fix(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_task_batches_carry_ids_third():
    x, y, ids = tf.zeros((2, 1, 3, 4)), tf.zeros((2, 1, 3)), tf.constant([1, 0])
    got = unpack_task_batch((x, y, ids), object())
    assert got[0] is x and got[1] is ids and got[2] is y
    assert unpack_task_batch((x, y, ids), None)[1] is None  # one shared head: ids unused


def _parts(learner, num_tasks=3, outer=None, inner=None):
    """A model, its TaskHeads, a TaskState and an OuterStep as MetaModel wires them."""
    net = make_net()
    heads = TaskHeads(4).bind(net)
    learner = heads.exclude(learner)
    owner = _owner()
    inner = make_stateless(inner or keras.optimizers.SGD(ALPHA))
    inner.build(net.trainable_variables)
    outer = make_stateless(outer or keras.optimizers.SGD(BETA))
    state = TaskState(owner, net, inner, learner, num_tasks, heads)
    counters = {n: owner.add_weight(name=n, shape=(), dtype="int64", initializer="zeros",
                                    trainable=False)
                for n in ("meta_updates", "skipped_tasks", "diverged_updates")}
    counters["shift_seed"] = keras.random.SeedGenerator(0)
    return net, heads, state, OuterStep(net, learner, outer, state, num_tasks, counters, heads)


def _update(outer, tasks, phi, ids, due=True):
    share = outer.contribution(tasks, phi, 0, ids)
    return tf.distribute.get_replica_context().merge_call(outer.update, args=(tf.constant(due), *share))


def test_restart_reads_the_bank_and_writes_mean_of_duplicates_not_diverged_tasks():
    net, heads, state, outer = _parts(Reptile())
    bank0 = [v.numpy().copy() for v in heads.bank]
    with pytest.raises(ConfigError, match="must carry each task's source index"):
        state.read(restart=tf.constant(True), first=0)
    ids = tf.constant([1, 3, 1])
    params, *rest = state.read(restart=tf.constant(True), first=0, task_ids=ids)
    for j, i in enumerate(heads.indices):  # heads from their rows, body from phi
        np.testing.assert_array_equal(params[i].numpy(), bank0[j][[1, 3, 1]])
    np.testing.assert_array_equal(params[0].numpy(), np.stack([net.weights[0].numpy()] * 3))
    moved = [p + tf.reshape(tf.constant([1.0, 2.0, 4.0]), [-1] + [1] * (p.shape.rank - 1))
             for p in params]
    moved[3] = tf.tensor_scatter_nd_update(moved[3], [[1, 0]], [np.nan])  # task 1 diverged
    phi = [tf.convert_to_tensor(v) for v in net.trainable_variables]
    _update(outer, (moved, *rest), phi, ids)
    kernel, bias = (v.numpy() for v in heads.bank)
    np.testing.assert_allclose(kernel[1], bank0[0][1] + 2.5, rtol=1e-6)  # mean of +1 and +4
    np.testing.assert_allclose(bias[1], bank0[1][1] + 2.5, rtol=1e-6)
    for h in (0, 2, 3):  # never trained, or diverged (source 3): unchanged
        np.testing.assert_array_equal(kernel[h], bank0[0][h])
        np.testing.assert_array_equal(bias[h], bank0[1][h])
    assert int(outer.counters["skipped_tasks"].numpy()) == 1


def test_outer_momentum_and_weight_decay_step_the_body_only():
    sgd_outer = keras.optimizers.SGD(BETA, momentum=0.9, weight_decay=0.1)
    net, heads, state, outer = _parts(Reptile(), outer=sgd_outer)
    start = [v.numpy().copy() for v in net.trainable_variables]
    ids = tf.constant([0, 1, 2])
    for _ in range(2):
        phi = [tf.convert_to_tensor(v) for v in net.trainable_variables]
        params, *rest = state.read(restart=tf.constant(True), first=0, task_ids=ids)
        _update(outer, ([p - 1.0 for p in params], *rest), phi, ids)
    after = [v.numpy() for v in net.trainable_variables]
    for i in (2, 3):
        np.testing.assert_array_equal(after[i], start[i])
    # Reptile's gradient is phi - theta = +1 everywhere: v1 = -beta, then
    # v2 = -0.9 beta - beta, each after decay w -= beta 0.1 w.
    w = start[1].astype(np.float64)
    w = w - BETA * 0.1 * w - BETA
    w = w - BETA * 0.1 * w - 1.9 * BETA
    np.testing.assert_allclose(after[1], w, rtol=1e-6, atol=1e-6)


def test_head_optimizer_slots_restart_when_the_schedule_keeps_the_others():
    learner = Reptile()
    learner.schedule = Schedule(1, "shift", reset_optimizer=False)  # CTS without hard_reset
    inner = keras.optimizers.SGD(ALPHA, momentum=0.9)
    net, heads, state, _ = _parts(learner, inner=inner)
    slots = heads.optimizer_slots(inner)
    head_paths = [net.trainable_variables[i].path.replace("/", "_") for i in heads.indices]
    assert sorted(inner.variables[j].name for j in slots) == sorted(
        f"{p}_momentum" for p in head_paths)
    tasks = state.read(restart=tf.constant(True), first=0, task_ids=tf.constant([0, 1, 2]))
    state.write((tasks[0], tasks[1], [v + tf.cast(1, v.dtype) for v in tasks[2]], tasks[3]))
    restarted = state.read(restart=tf.constant(True), first=0, task_ids=tf.constant([2, 1, 0]))[2]
    for j, (value, stored) in enumerate(zip(restarted, state.optimizer)):
        # the heads' momentum restarts; the body's (and iterations) carries over
        expected = np.zeros(stored.shape) if j in slots else stored.numpy()
        np.testing.assert_array_equal(value.numpy(), expected)
    assert len(slots) == 2 and len(state.optimizer) > 4


def test_export_records_an_untrained_head_and_loads_a_fresh_one(tmp_path):
    net = make_net()
    TaskHeads(2).bind(net)
    path = export_initialization(net, tmp_path / "init")
    assert read_export_info(path)["head_meta_learned"] is False
    with pytest.raises(ValueError, match="head='keep' would fine-tune from an untrained head"):
        load_initialization(path, head="keep")
    loaded = load_initialization(path, num_classes=UNITS)  # 'replace', same units: still fresh
    for a, b in zip(loaded.get_weights()[:2], net.get_weights()[:2]):
        np.testing.assert_array_equal(a, b)  # the body is the export's
    assert not np.array_equal(loaded.get_weights()[2], net.get_weights()[2])
    assert loaded.layers[-1] is not net.layers[-1]
    plain = export_initialization(make_net(), tmp_path / "plain")
    assert read_export_info(plain)["head_meta_learned"] is True
    kept = load_initialization(plain, head="keep")
    np.testing.assert_array_equal(kept.get_weights()[2], make_net().get_weights()[2])


if __name__ == "__main__":
    {"mirrored": _mirrored_main}[sys.argv[1]]()


class NamedVelocitySGD(keras.optimizers.Optimizer):
    """SGD with momentum 0.9 keeping its velocities under names of its own
    (`velocity_<i>`), as a custom optimizer may: nothing in a slot's name
    says whose it is, only the list aligned with the variables does."""

    def build(self, variables):
        super().build(variables)
        self.velocities = [self.add_variable(v.shape, dtype=v.dtype, name=f"velocity_{i}")
                           for i, v in enumerate(variables)]

    def update_step(self, gradient, variable, learning_rate):
        velocity = self.velocities[self._get_variable_index(variable)]
        self.assign(velocity, 0.9 * velocity - learning_rate * gradient)
        self.assign_add(variable, velocity)


@pytest.mark.parametrize("make", [
    lambda: NamedVelocitySGD(ALPHA),
    lambda: keras.optimizers.Adam(ALPHA),
    lambda: keras.optimizers.SGD(ALPHA, momentum=0.9, use_ema=True),
], ids=["named_velocity_sgd", "adam", "sgd_ema"])
def test_head_optimizer_slots_are_found_by_identity(make):
    learner = Reptile()
    learner.schedule = Schedule(1, "shift", reset_optimizer=False)
    inner = make()
    net, heads, state, _ = _parts(learner, inner=inner)
    head_vars = [net.trainable_variables[i] for i in heads.indices]
    # The reference: every per-variable slot the optimizer made for a head weight.
    kinds = {"velocities", "_momentums", "_velocities", "momentums",
             "_model_variables_moving_average"}
    expected = sorted(
        j for j, slot in enumerate(inner.variables)
        for kind in kinds if hasattr(inner, kind)
        for v in head_vars if getattr(inner, kind)[inner._get_variable_index(v)] is slot
    )
    assert heads.optimizer_slots(inner) == expected and len(expected) >= 2
    tasks = state.read(restart=tf.constant(True), first=0, task_ids=tf.constant([0, 1, 2]))
    state.write((tasks[0], tasks[1], [v + tf.cast(1, v.dtype) for v in tasks[2]], tasks[3]))
    restarted = state.read(restart=tf.constant(True), first=0, task_ids=tf.constant([2, 1, 0]))[2]
    for j, (value, stored) in enumerate(zip(restarted, state.optimizer)):
        initial = np.stack([inner.variables[j].numpy()] * 3)
        np.testing.assert_array_equal(value.numpy(), initial if j in expected else stored.numpy())


def test_meta_model_hands_its_heads_to_the_inner_loop_explicitly():
    # No registry from the model's head to its TaskHeads: an InnerLoop knows
    # the heads it is given (MetaModel's own), and no others.
    from tfmeta.inner_loop import InnerLoop, mean_loss

    net = make_net()
    heads = TaskHeads(4)
    meta = MetaModel(net, heads=heads)
    meta.compile(optimizer=keras.optimizers.SGD(BETA), inner_optimizer=keras.optimizers.SGD(ALPHA),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 learner=Reptile(), inner_steps=K)
    assert meta.heads is heads and meta.inner_loop.heads is heads
    # An InnerLoop built on that model without heads= would step the heads at
    # the body's step count: refused, not looked up.
    with pytest.raises(ConfigError, match="this model's heads are TaskHeads, so pass heads="):
        InnerLoop(net, mean_loss("mse"), Reptile(), keras.optimizers.SGD(ALPHA))
    assert InnerLoop(net, mean_loss("mse"), Reptile(), keras.optimizers.SGD(ALPHA),
                     heads=heads).heads is heads
    plain = InnerLoop(make_net(), mean_loss("mse"), Reptile(), keras.optimizers.SGD(ALPHA))
    assert plain.heads is None
    assert not hasattr(tfmeta.heads, "head_trainer")


def adam(params, grads, m, v, t, lr, epsilon, beta_1=0.9, beta_2=0.999):
    """Adam (Kingma & Ba, Algorithm 1, in the efficient form of their section 2 that
    Keras uses): m, v moving averages, theta -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)."""
    m = [a + (g - a) * (1 - beta_1) for a, g in zip(m, grads)]
    v = [a + (g * g - a) * (1 - beta_2) for a, g in zip(v, grads)]
    alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    return [p - alpha * a / (np.sqrt(b) + epsilon) for p, a, b in zip(params, m, v)], m, v


@pytest.mark.parametrize("vectorize", [False, True], ids=["copies", "batched"])
def test_a_restarted_head_takes_adams_first_step_while_the_body_goes_on(vectorize):
    # CTS without hard_reset keeps the inner optimizer's state over restarts,
    # but a task's head restarts (its slots too): its next Adam step is Adam's
    # step 1 (bias correction 1 - b^1), the body's step 3. Epsilon 1e-3 keeps
    # round-off-sized gradients from being scaled up to +-lr steps.
    from tfmeta.inner_loop import InnerLoop, mean_loss

    learner = Reptile()
    learner.schedule = Schedule(1, "shift", reset_optimizer=False)
    inner = keras.optimizers.Adam(ALPHA, epsilon=1e-3)
    net, heads, state, _ = _parts(learner, num_tasks=T, inner=inner)
    loop = InnerLoop(net, mean_loss(keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
                     state.learner, inner, vectorize=vectorize, heads=heads)
    phi = [v.numpy().astype(np.float64) for v in net.trainable_variables]
    bank = [v.numpy().astype(np.float64) for v in heads.bank]
    trajectories = [(0, 2), (2, 3)]
    x, y = task_stream(np.array(trajectories))
    step = tf.function(loop.step)
    tasks = state.read(restart=tf.constant(True), first=0, task_ids=tf.constant(trajectories[0]))
    for k in range(2):
        tasks, _ = step(tasks, tf.constant(x[0, :, k]), tf.constant(y[0, :, k]), tf.constant(k))
    state.write(tasks)
    tasks = state.read(restart=tf.constant(True), first=0, task_ids=tf.constant(trajectories[1]))
    tasks, _ = step(tasks, tf.constant(x[1, :, 0]), tf.constant(y[1, :, 0]), tf.constant(0))

    def batch(m, t, k):
        return x[m, t, k].reshape(B, -1).astype(np.float64), y[m, t, k]

    for t in range(T):
        theta = phi[:2] + [bank[0][trajectories[0][t]], bank[1][trajectories[0][t]]]
        m = v = [np.zeros_like(p) for p in theta]
        for k in range(2):
            theta, m, v = adam(theta, mlp_loss_grad(theta, *batch(0, t, k))[1], m, v, k + 1,
                               ALPHA, 1e-3)
        start = phi[:2] + [bank[0][trajectories[1][t]], bank[1][trajectories[1][t]]]
        grads = mlp_loss_grad(start, *batch(1, t, 0))[1]
        body = adam(start[:2], grads[:2], m[:2], v[:2], 3, ALPHA, 1e-3)[0]
        head = adam(start[2:], grads[2:], [0.0, 0.0], [0.0, 0.0], 1, ALPHA, 1e-3)[0]
        assert_close([p[t] for p in tasks[0]], body + head, f"task {t} parameter")
    iterations = [j for j, w in enumerate(inner.variables) if w is inner.iterations]
    np.testing.assert_array_equal(tasks[2][iterations[0]].numpy(), [3] * T)


def test_one_class_count_is_every_heads():
    assert TaskHeads(3, num_classes=5).num_classes == TaskHeads(3, num_classes=[5, 5, 5]).num_classes
    assert repr(TaskHeads(3, 5)) == repr(TaskHeads(3, [5, 5, 5]))
