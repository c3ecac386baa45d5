"""The CTS paper's approximation error (section 3.3, figure 3), measured on real data.

CTS replaces the exact task learner after k meta-updates by its shifted
trajectory (Eq. 1 of the paper)::

    U_k(phi + Delta_1 + ... + Delta_{k-1})  ~  U_1(... U_1(U_1(phi) + Delta_1) ... + Delta_{k-1})

and this module measures eps_k, the difference of the two sides, for one
SEQUENCE of meta-updates Delta_1, Delta_2, ..., on the same mini-batches,
with two `MetaModel` runs that share nothing but their data:

1. **Shifted side** (CTS, `shift="gradient"`, `every=1`, K = `max_k`): k
   train steps of one inner step each, from phi, on batches b_1..b_k. After
   step j the task parameters hold U_1(... + Delta_{j-1}) + Delta_j (CTS
   shifts them by the update it just made), and phi_j = phi_{j-1} + Delta_j;
   so the right-hand side is the task parameters minus Delta_j.
2. **Exact side** (CTS, `shift="accurate"`, the paper's "Ours Accurate"):
   its `grow` schedule restarts every task from phi and makes trajectory j
   j steps long, so after its j-th trajectory the task parameters hold
   U_j(phi). Before trajectory j starts, phi is set (`set_weights`) to the
   shifted run's phi_{j-1} = phi + Delta_1 + ... + Delta_{j-1}, and the
   trajectory is fed b_1..b_j: the accurate machinery then computes the
   left-hand side with the SAME Delta's and batches as the shifted side.

`||eps_k||` is the global L2 norm over all weights of the network, averaged
over the T tasks of the meta-batch; a draw is a fresh initialization phi
and fresh mini-batches (seeded by the draw's index). The inner optimizer is
plain SGD (the paper's U_k of section 3.1), the meta-gradient Reptile's.

The paper's setup is in its supplementary file, which we do not have; the
network (an MLP on MNIST and Fashion-MNIST, one task each) and the grid are
ours. Results and how they compare with figure 3: docs/results.md. Run it with `python tools/cts_approximation.py` (see `--help`).

Example::

    tasks = load_tasks()
    eps = errors(Setting(inner_lr=0.1, meta_lr=0.1, activation="relu", max_k=5),
                 tasks, draws=3)          # [3 draws, 5 values of k]
"""

from __future__ import annotations

import dataclasses
import json
import math

import keras
import numpy as np

from tfmeta import atomic
from tfmeta.learners import ContinualTrajectoryShifting, Reptile
from tfmeta.meta_model import MetaModel

ACTIVATIONS = ("relu", "softplus")

# Student t quantiles t_{0.975, n-1} for the 95% interval of a mean of n draws.
_T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365,
         9: 2.306, 10: 2.262, 11: 2.228, 12: 2.201, 15: 2.145, 20: 2.093, 30: 2.045}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the figure: alpha, beta, the activation, and the largest k."""

    inner_lr: float = 0.1
    meta_lr: float = 0.1
    activation: str = "relu"
    max_k: int = 10

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Setting(activation={self.activation!r}) is not supported: choose one "
                f"of {ACTIVATIONS}."
            )
        if int(self.max_k) < 1:
            raise ValueError(f"Setting(max_k={self.max_k}) must be >= 1 inner step.")
        if self.inner_lr <= 0 or self.meta_lr <= 0:
            raise ValueError(
                f"Setting(inner_lr={self.inner_lr}, meta_lr={self.meta_lr}): both learning "
                "rates must be > 0."
            )


@dataclasses.dataclass(frozen=True)
class Network:
    """The small network: image -> Flatten -> Dense(hidden, activation) -> Dense(classes)."""

    hidden: int = 32
    classes: int = 10
    batch_size: int = 20


def load_tasks(train_examples=2000, data_dir=None):
    """MNIST and Fashion-MNIST (prepared TFDS datasets), one 10-way task each, 28x28 grey."""
    from tfmeta.tasks import datasets_as_tasks

    return datasets_as_tasks(
        ("mnist", "fashion_mnist"), train_examples=train_examples, test_examples=500,
        data_dir=data_dir,
    )


def build_network(input_shape, activation, network=Network(), seed=0):
    """The MLP, initialized from `seed` (Glorot uniform, zero biases)."""
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(network.hidden, activation=activation, kernel_initializer=init),
        keras.layers.Dense(network.classes, kernel_initializer=keras.initializers.GlorotUniform(
            seed=seed + 1)),
    ])


def _meta_model(tasks, setting, network, shift):
    meta = MetaModel(build_network(tasks.input_shape, setting.activation, network))
    meta.compile(
        optimizer=keras.optimizers.SGD(setting.meta_lr),
        inner_optimizer=keras.optimizers.SGD(setting.inner_lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        learner=ContinualTrajectoryShifting(Reptile(), every=1, shift=shift),
        inner_steps=setting.max_k,
    )
    return meta


def _batches(tasks, setting, network, draw):
    """The k inner steps' mini-batches of every task: x [k, T, 1, B, ...], y [k, T, 1, B]."""
    stream = tasks.as_dataset(
        tasks_per_batch=tasks.num_tasks, inner_steps=setting.max_k,
        batch_size=network.batch_size, seed=1000 + draw, augment=False,
    )
    chunks = list(stream.take(setting.max_k).as_numpy_iterator())
    return np.stack([c[0] for c in chunks]), np.stack([c[1] for c in chunks])


def _weights(variables):
    return [np.asarray(v.numpy(), np.float64) for v in variables]


def _shifted_side(meta, phi, x, y):
    """CTS from `phi`: [U_1(... + Delta_{j-1}) per task for j = 1..k], and phi_0..phi_{k-1}."""
    meta.model.set_weights(phi)
    phis, shifted = [_weights(meta.model.trainable_variables)], []
    for j in range(len(x)):
        meta.train_on_batch(x[j], y[j])
        new_phi = _weights(meta.model.trainable_variables)
        delta = [n - o for n, o in zip(new_phi, phis[-1])]
        # The task parameters were shifted by Delta_j after the step: undo it.
        shifted.append([p - d[None] for p, d in zip(_weights(meta.task_params), delta)])
        phis.append(new_phi)
    _check_cycle_done(meta)
    return shifted, phis[:-1]


def _exact_side(meta, phis, x, y):
    """The accurate reference: [U_j(phi_{j-1}) per task for j = 1..k], on b_1..b_j."""
    exact = []
    for j, phi in enumerate(phis, start=1):
        meta.model.set_weights([w.astype(np.float32) for w in phi])
        for i in range(j):
            meta.train_on_batch(x[i], y[i])
        # The grow schedule leaves the finished trajectory's parameters in
        # place until the next one restarts from phi.
        exact.append(_weights(meta.task_params))
    _check_cycle_done(meta)
    return exact


def _check_cycle_done(meta):
    # Both runs end where they began (position 0, a fresh trajectory), so the
    # next draw reuses the compiled MetaModel.
    if int(meta.position.numpy()) != 0:
        raise RuntimeError("a CTS run ended inside a trajectory: the draw is misaligned")


def _norm(parts):
    """Per-task global L2 norm of stacked weights [T, ...]."""
    return np.sqrt(sum(np.sum(p.reshape(p.shape[0], -1) ** 2, axis=1) for p in parts))


def errors(setting, tasks, draws=10, network=Network()):
    """||eps_k|| and the distance travelled, for k = 1..max_k over `draws` draws.

    Returns `(eps, travel)`, two arrays [draws, max_k]: `eps[d, k-1]` is
    ||eps_k|| and `travel[d, k-1]` is ||U_k(phi_{k-1}) - phi_{k-1}||, the
    length of the exact trajectory it errs on (both averaged over tasks).
    eps_1 is 0 up to rounding (both sides are U_1(phi)): a built-in check.
    """
    shifted_meta = _meta_model(tasks, setting, network, "gradient")
    exact_meta = _meta_model(tasks, setting, network, "accurate")
    eps_norm = np.zeros((draws, setting.max_k))
    travel = np.zeros((draws, setting.max_k))
    for draw in range(draws):
        phi = build_network(tasks.input_shape, setting.activation, network, seed=2 * draw)
        x, y = _batches(tasks, setting, network, draw)
        shifted, phis = _shifted_side(shifted_meta, phi.get_weights(), x, y)
        exact = _exact_side(exact_meta, phis, x, y)
        for k in range(setting.max_k):
            eps = [e - s for e, s in zip(exact[k], shifted[k])]
            eps_norm[draw, k] = float(np.mean(_norm(eps)))
            moved = [e - p[None] for e, p in zip(exact[k], phis[k])]
            travel[draw, k] = float(np.mean(_norm(moved)))
    return eps_norm, travel


def summary(values):
    """Mean and 95% interval half-width (Student t) over draws, per column."""
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    mean = values.mean(axis=0)
    if n < 2:
        return mean, np.zeros_like(mean)
    t = _T975.get(n) or _T975[min(_T975, key=lambda m: abs(m - n))]
    return mean, t * values.std(axis=0, ddof=1) / math.sqrt(n)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The figure's sweeps: alpha (at beta0, k0), beta (at alpha0, k0), k (at alpha0, beta0)."""

    inner_lrs: tuple = (0.01, 0.03, 0.1, 0.3)
    meta_lrs: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    alpha0: float = 0.1
    beta0: float = 0.1
    max_k: int = 20
    table_ks: tuple = (1, 2, 5, 10, 15, 20)
    activations: tuple = ACTIVATIONS


def run(grid=Grid(), draws=10, tasks=None, network=Network(), verbose=True, done=None,
        on_result=None):
    """Every setting of `grid`: a list of result dicts (one per alpha, beta, activation).

    Each result holds the setting, `eps` and `travel` [draws, max_k] (see
    `errors`); the k sweep is the (alpha0, beta0) setting's columns. `done`
    maps a setting key (see `key`) to an earlier result with as many draws,
    which is reused (resuming); `on_result(result)` is called after each new one.
    """
    tasks = tasks or load_tasks()
    done = dict(done or {})
    pairs = sorted({(a, grid.beta0) for a in grid.inner_lrs}
                   | {(grid.alpha0, b) for b in grid.meta_lrs}
                   | {(grid.alpha0, grid.beta0)})
    results = []
    for activation in grid.activations:
        for alpha, beta in pairs:
            setting = Setting(alpha, beta, activation, grid.max_k)
            result = done.get(key(setting))
            if result is None or len(result["eps"]) != draws:
                eps, travel = errors(setting, tasks, draws, network)
                result = {"setting": dataclasses.asdict(setting), "eps": eps.tolist(),
                          "travel": travel.tolist()}
                if on_result:
                    on_result(result)
            results.append(result)
            if verbose:
                mean, half = summary(result["eps"])
                print(f"{activation:>8} alpha={alpha:<5g} beta={beta:<5g} "
                      f"||eps_k|| at k={grid.max_k}: {mean[-1]:.3g} +- {half[-1]:.2g}",
                      flush=True)
    return results


def key(setting):
    """The identity of a setting in results.json: 'relu/alpha=0.1/beta=0.1/k=10'."""
    if isinstance(setting, dict):
        setting = Setting(**setting)
    return (f"{setting.activation}/alpha={setting.inner_lr:g}/beta={setting.meta_lr:g}"
            f"/k={setting.max_k}")


def _find(results, activation, alpha, beta):
    for r in results:
        s = r["setting"]
        if (s["activation"], s["inner_lr"], s["meta_lr"]) == (activation, alpha, beta):
            return r
    raise KeyError(f"no result for {activation} alpha={alpha} beta={beta}")


def table(results, grid=Grid()):
    """Markdown: ||eps|| (mean +- 95% half-width) and ||eps|| / ||U_k(phi_{k-1}) - phi_{k-1}||.

    One row per alpha, per beta (at k = max_k) and per k of `grid.table_ks`.
    """
    acts = list(grid.activations)
    head = ("| sweep | value | " + " | ".join(f"{a} ‖ε‖" for a in acts) + " | "
            + " | ".join(f"{a} ‖ε‖ / travel" for a in acts) + " |\n|---|---|"
            + "---|" * (2 * len(acts)))
    rows = [head]

    def cells(setting_of, column):
        found = [_find(results, a, *setting_of) for a in acts]
        absolute = []
        for r in found:
            mean, half = summary(r["eps"])
            absolute.append(f"{mean[column]:.3g} ± {half[column]:.2g}")
        relative = [
            f"{np.mean(np.asarray(r['eps'])[:, column] / np.asarray(r['travel'])[:, column]):.3g}"
            for r in found
        ]
        return " | ".join(absolute + relative) + " |"

    k = grid.max_k
    for alpha in grid.inner_lrs:
        rows.append(f"| α (β={grid.beta0:g}, k={k}) | {alpha:g} | "
                    + cells((alpha, grid.beta0), -1))
    for beta in grid.meta_lrs:
        rows.append(f"| β (α={grid.alpha0:g}, k={k}) | {beta:g} | "
                    + cells((grid.alpha0, beta), -1))
    for kk in grid.table_ks:
        if kk <= k:
            rows.append(f"| k (α={grid.alpha0:g}, β={grid.beta0:g}) | {kk} | "
                        + cells((grid.alpha0, grid.beta0), kk - 1))
    return "\n".join(rows)


def plot(results, path, grid=Grid()):
    """Figure 3's three panels (vs alpha, beta, k; ReLU and softplus), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for activation in grid.activations:
        sweeps = [
            (grid.inner_lrs, [_find(results, activation, a, grid.beta0) for a in grid.inner_lrs]),
            (grid.meta_lrs, [_find(results, activation, grid.alpha0, b) for b in grid.meta_lrs]),
        ]
        for ax, (xs, rs) in zip(axes[:2], sweeps):
            stats = [summary(r["eps"]) for r in rs]
            mean = np.array([m[-1] for m, _ in stats])
            half = np.array([h[-1] for _, h in stats])
            ax.plot(xs, mean, marker="o", label=activation)
            ax.fill_between(xs, mean - half, mean + half, alpha=0.25)
        mean, half = summary(_find(results, activation, grid.alpha0, grid.beta0)["eps"])
        ks = np.arange(1, grid.max_k + 1)
        axes[2].plot(ks, mean, marker="o", label=activation)
        axes[2].fill_between(ks, mean - half, mean + half, alpha=0.25)
    # Log-log for the learning rates: alpha spans two decades of error.
    labels = [
        (f"inner learning rate alpha (beta={grid.beta0:g}, k={grid.max_k})", "log"),
        (f"meta learning rate beta (alpha={grid.alpha0:g}, k={grid.max_k})", "log"),
        (f"trajectory length k (alpha={grid.alpha0:g}, beta={grid.beta0:g})", "linear"),
    ]
    for ax, (label, scale) in zip(axes, labels):
        ax.set_xlabel(label)
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        ax.set_ylabel("||eps||  (mean, 95% interval)")
        ax.legend()
    fig.suptitle("CTS approximation error, MLP on MNIST + Fashion-MNIST tasks")
    fig.tight_layout()
    with atomic.open_atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def to_json(results, grid=Grid(), draws=10, network=Network()):
    """results.json's text: the grid, the network, and every setting's eps."""
    return json.dumps({
        "grid": dataclasses.asdict(grid), "draws": draws, "network": dataclasses.asdict(network),
        "results": {key(r["setting"]): r for r in results},
    }, indent=1)
