"""The CTS paper's synthetic experiment (section 4.1, figures 4-5).

From each start point of the grid {-5, 5, 15}^2, meta-train the initialization
of the rotated-Himmelblau family with Reptile, CTS (and its ablations) and
CTS's exact reference, and score each learned phi by the task-average loss
after 100 inner steps from it.

- `run` measures one (K, task seed) setting; `sweep` measures every
  (method, K, task seed) cell into `results.json`, one cell at a time, so
  that `resume=True` continues an interrupted sweep.
- `reptile_landscape` iterates Reptile's meta-update map with a fixed
  trajectory length k from a grid of phi until it stops (NumPy, every grid
  point at once): the meta-level local optima of the paper's figure 5(a,b).
- `plot` draws one setting's meta-trajectories; `plot_k` draws figure 5 and
  the effect of K over task seeds.

Run it with `python tools/cts_synthetic.py` (see `--help`).

Example::

    cells = sweep(("reptile", "cts"), inner_steps=(80, 120), task_seeds=(0, 1),
                  output_dir="runs/cts_synthetic", resume=True)
    print(sweep_table(cells, ("reptile", "cts"), (80, 120), (0, 1)))
"""

import dataclasses
import json
import time

import keras
import numpy as np

from tfmeta import atomic
from tfmeta.experiments.complexity_run import CellStore, print_line, say
from tfmeta.learners import ContinualTrajectoryShifting, Reptile
from tfmeta.meta_model import MetaModel
from tfmeta.replicas import execution_size
from tfmeta.schedule import AfterUpdate
from tfmeta.tasks.himmelblau import RotatedHimmelblau
from tfmeta.validation import ConfigError

GRID = [(x, y) for x in (-5.0, 5.0, 15.0) for y in (-5.0, 5.0, 15.0)]

#: name -> learner factory
METHODS = {
    "reptile": lambda: Reptile(),
    "cts": lambda: ContinualTrajectoryShifting(Reptile(), hard_reset=True),
    "cts_no_shift": lambda: ContinualTrajectoryShifting(Reptile(), shift="none", hard_reset=True),
    "cts_random_shift": lambda: ContinualTrajectoryShifting(
        Reptile(), shift="random", hard_reset=True
    ),
    "cts_accurate": lambda: ContinualTrajectoryShifting(Reptile(), shift="accurate"),
}

#: "meta_updates": every method makes M * K meta-updates (the paper: "the
#: same number of total meta-updates"); "processes": every method runs M
#: inner processes of K steps, as the authors' script `meta_training.py`
#: does, so Reptile makes only M meta-updates (the same inner-step cost).
BUDGETS = ("meta_updates", "processes")

#: "mean": a = c = 0.5 for every task seed; "drawn": (a, c) uniform in
#: [0, 1) from the task seed, as the authors' `set_env.py` draws them once.
TEMPLATES = ("mean", "drawn")

#: Two losses are "equal" below this difference: the same basin reached
#: from two initializations scores the same to about 1e-3.
TIE = 0.01


def processes_for(inner_steps):
    """M for trajectory length K: the paper's M = 3 at its K = 100, else the
    authors' script's M = 240 // K (their K = 80, 120: M = 3, 2).

    Example:
        >>> [processes_for(k) for k in (80, 100, 120)]
        [3, 3, 2]
    """
    return 3 if inner_steps == 100 else max(1, 240 // inner_steps)


@dataclasses.dataclass(frozen=True)
class Config:
    """The paper's setting: alpha 0.05, beta 0.1, K 100, M 3, SGD momentum 0.9.

    `eval_steps` Adam steps at `inner_lr` score an initialization (the
    authors' `test()`); `budget` and `template` are one of `BUDGETS` and
    `TEMPLATES`.
    """

    inner_lr: float = 0.05
    meta_lr: float = 0.1
    inner_steps: int = 100
    processes: int = 3
    momentum: float = 0.9
    eval_steps: int = 100
    task_seed: int = 0
    budget: str = "meta_updates"
    template: str = "mean"

    def __post_init__(self):
        for name, value, choices in (("budget", self.budget, BUDGETS),
                                     ("template", self.template, TEMPLATES)):
            if value not in choices:
                raise ConfigError(f"Config({name}={value!r}) is not one of {choices}.")

    def tasks(self):
        """The task family of `task_seed` (rotations, and (a, c) if drawn)."""
        if self.template == "drawn":
            # A stream of its own, so that both templates share the rotations.
            a, c = np.random.default_rng([self.task_seed, 1]).uniform(size=2)
            return RotatedHimmelblau(seed=self.task_seed, a=a, c=c)
        return RotatedHimmelblau(seed=self.task_seed)

    def meta_updates(self, learner):
        """The meta-updates `learner` makes under the budget."""
        if self.budget == "processes" and learner.schedule.after_update is AfterUpdate.RESET:
            return self.processes  # one meta-update per inner process
        return self.processes * self.inner_steps


class _Trajectory(keras.callbacks.Callback):
    """Records phi after every execution of the train function."""

    def __init__(self):
        super().__init__()
        self.points = []

    def on_train_batch_end(self, batch, logs=None):
        self.points.append(np.array(self.model.model.trainable_variables[0].numpy()))


def meta_train(method, start, config=Config(), tasks=None):
    """Meta-train from `start` with `method`; returns (phi, trajectory, inner steps)."""
    tasks = tasks or config.tasks()
    learner = METHODS[method]()
    K = config.inner_steps
    updates = config.meta_updates(learner)
    # Chunks as long as the schedule allows (K for Reptile, 1 for CTS); the
    # exact reference's trajectories of length 1..K take K(K+1)/2 steps each.
    chunk = learner.schedule.period(K)
    train_steps = learner.schedule.steps_for(updates, K, chunk)
    # One callback per meta-update is plenty for the plot; the exact
    # reference takes K(K+1)/2 steps per process, so record it coarser, every
    # execution of a divisor of its train steps (Keras would otherwise run a
    # partial last execution past the budget).
    per_call = 1
    if chunk == 1 and train_steps > updates:
        per_call = execution_size(train_steps, 50)
    keras.utils.set_random_seed(config.task_seed)
    model = tasks.model(start)
    meta = MetaModel(model)
    meta.compile(
        optimizer=keras.optimizers.SGD(config.meta_lr),
        inner_optimizer=keras.optimizers.SGD(config.inner_lr, momentum=config.momentum),
        loss=tasks.loss(),
        learner=learner,
        inner_steps=K,
        vectorize_tasks=True,
        steps_per_execution=per_call,
    )
    trajectory = _Trajectory()
    meta.fit(
        tasks.as_dataset(inner_steps=K, steps_per_chunk=chunk),
        steps_per_epoch=train_steps,
        epochs=1,
        verbose=0,
        callbacks=[trajectory],
    )
    assert int(meta.meta_updates.numpy()) == updates, "the budget's meta-updates"
    phi = np.array(model.trainable_variables[0].numpy())
    path = np.array([np.asarray(start, "float32")] + trajectory.points)
    return phi, path, train_steps * chunk


def measure(method, config=Config(), starts=GRID, tasks=None):
    """Meta-train `method` from every start; a JSON-friendly dict of the outcome.

    Keys: `phi` (learned points), `paths` (phi after every train-function
    call, 4 decimals), `loss` (task-average loss after `eval_steps` Adam
    steps, this experiment's score), `loss_authors_test` (the authors'
    `test(phi, lr, K)`: Adam for K steps, the loss read before the last
    one), `loss_inner_optimizer` (`eval_steps` steps of the inner optimizer,
    SGD with momentum), `inner_steps` and `meta_updates` per run, `seconds`.
    """
    tasks = tasks or config.tasks()
    phis, paths, began = [], [], time.perf_counter()
    for start in starts:
        phi, path, inner = meta_train(method, start, config, tasks)
        phis.append(phi)
        paths.append(np.round(path.astype(float), 4).tolist())
    seconds = time.perf_counter() - began
    phis = np.array(phis)
    momentum = keras.optimizers.SGD(config.inner_lr, momentum=config.momentum)
    return {
        "phi": phis.tolist(),
        "paths": paths,
        "loss": tasks.adapted_loss(phis, steps=config.eval_steps).tolist(),
        "loss_authors_test": tasks.adapted_loss(phis, steps=config.inner_steps - 1).tolist(),
        "loss_inner_optimizer": tasks.adapted_loss(
            phis, steps=config.eval_steps, optimizer=momentum).tolist(),
        "inner_steps": inner,
        "meta_updates": config.meta_updates(METHODS[method]()),
        "seconds": seconds,
    }


def run(methods=("reptile", "cts", "cts_accurate"), starts=GRID, config=Config(), verbose=True):
    """Measure one (K, task seed) setting; returns a dict of per-method results.

    `results[method]` holds `measure`'s entries, `phi` and the losses as
    arrays; `results["initial"]["loss"]` scores the start points themselves.
    """
    tasks = config.tasks()
    results = {}
    for method in methods:
        cell = measure(method, config, starts, tasks)
        results[method] = _arrays(cell)
        if verbose:
            print_line(f"{method:>17}: mean task-average loss after {config.eval_steps} steps "
                       f"{np.mean(cell['loss']):.3f} ({cell['seconds']:.1f} s)")
    results["initial"] = {"loss": tasks.adapted_loss(np.array(starts), steps=config.eval_steps)}
    return results


def _arrays(cell):
    """A cell with its points and losses as arrays and its paths as a list of arrays."""
    out = {k: np.array(v) if k == "phi" or k.startswith("loss") else v for k, v in cell.items()}
    out["paths"] = [np.array(p) for p in cell["paths"]]
    return out


# ------------------------------------------------------------ the sweep
def cell_key(method, inner_steps, task_seed):
    """The key of one cell in `results.json`, e.g. `"cts/K80/seed3"`."""
    return f"{method}/K{inner_steps}/seed{task_seed}"


def cell_settings(method, config, starts=GRID):
    """Everything a cell's numbers depend on, JSON-normalised."""
    settings = {"method": method, **dataclasses.asdict(config), "starts": starts}
    return json.loads(json.dumps(settings))


def _check_same_settings(path, key, stored, wanted):
    if stored != wanted:
        diff = ", ".join(
            f"{name}={stored.get(name)!r} there, {wanted.get(name)!r} now"
            for name in sorted(set(stored) | set(wanted)) if stored.get(name) != wanted.get(name)
        )
        raise ConfigError(
            f"--resume: cell {key} of {path} was measured with other settings ({diff}); "
            "resume with the same flags, or choose another --output_dir."
        )


def sweep(methods, inner_steps=(80, 100, 120), task_seeds=(0, 1, 2, 3, 4), config=Config(),
          processes=None, starts=GRID, output_dir=None, resume=False, log=print_line):
    """Measure every (method, K, task seed) cell; returns `{key: cell}`.

    Each cell (`measure`'s dict plus its `settings` and the `machine` it was
    computed on) is written atomically to `output_dir/results.json` as soon
    as it is done, K by K and seed by seed. With `resume=True` the cells
    already there are kept; a kept cell measured with other settings is a
    `ConfigError`, kept cells of other kernels get one logged note
    (`CellStore`). M is `processes`, or
    `processes_for(K)`.
    """
    store = CellStore(output_dir, "cts_synthetic", resume=resume, log=log)  # records each cell's machine
    cells = {}
    for K in inner_steps:
        for seed in task_seeds:
            setting = dataclasses.replace(
                config, inner_steps=K, task_seed=seed, processes=processes or processes_for(K))
            for method in methods:
                key = cell_key(method, K, seed)
                settings = cell_settings(method, setting, starts)
                cell = store.get(key)
                if cell is None:
                    cell = store.put(key, {"settings": settings, **measure(method, setting, starts)})
                    say(log, f"{key}: mean loss {np.mean(cell['loss']):.3f} "
                             f"({cell['seconds']:.1f} s)")
                else:
                    _check_same_settings(store.path, key, cell["settings"], settings)
                cells[key] = cell
    return cells


def seed_means(cells, method, inner_steps, task_seeds, metric="loss"):
    """Per task seed, the mean over start points of `metric`."""
    return np.array([np.mean(cells[cell_key(method, inner_steps, s)][metric]) for s in task_seeds])


def versus(cells, method, other, inner_steps, task_seeds, metric="loss"):
    """(lower, equal, higher): start points x seeds where `method` scores below,
    within `TIE` of, or above `other`."""
    a, b = (np.concatenate([cells[cell_key(m, inner_steps, s)][metric] for s in task_seeds])
            for m in (method, other))
    return int(np.sum(a < b - TIE)), int(np.sum(np.abs(a - b) <= TIE)), int(np.sum(a > b + TIE))


def sweep_table(cells, methods, inner_steps, task_seeds, metric="loss"):
    """Markdown: per method and K, mean +- std (over seeds, ddof 1) of the
    start-point mean of `metric`; how often each method is below Reptile, and
    its paired difference to Reptile (mean +- std over seeds)."""
    def head(first):
        cols = []
        for K in inner_steps:
            c = cells[cell_key(methods[0], K, task_seeds[0])]["settings"]
            cols.append(f"K={K}, M={c['processes']}")
        return [f"| {first} | " + " | ".join(cols) + " |", "|---" * (len(inner_steps) + 1) + "|"]

    def spread(values):
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        return f"{values.mean():.2f} ± {std:.2f}"

    rows = head(f"method (mean ± std over {len(task_seeds)} task seeds)")
    for m in methods:
        rows.append(f"| {m} | " + " | ".join(
            spread(seed_means(cells, m, K, task_seeds, metric)) for K in inner_steps) + " |")
    others = [m for m in methods if m != "reptile"]
    if "reptile" in methods and others:
        total = len(task_seeds) * len(cells[cell_key("reptile", inner_steps[0], task_seeds[0])]["loss"])
        rows += [""] + head(f"vs reptile: lower / equal / higher of {total} start points "
                            "(difference of the means)")
        for m in others:
            row = []
            for K in inner_steps:
                gap = (seed_means(cells, m, K, task_seeds, metric)
                       - seed_means(cells, "reptile", K, task_seeds, metric))
                counts = versus(cells, m, "reptile", K, task_seeds, metric)
                row.append("{} / {} / {}".format(*counts) + f" ({spread(gap)})")
            rows.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(rows)


def table(results, starts=GRID):
    """A Markdown table: one row per start point, one column per method."""
    methods = [m for m in results if m != "initial"]
    head = "| start | no meta-training | " + " | ".join(methods) + " |"
    rule = "|---" * (len(methods) + 2) + "|"
    rows = [head, rule]
    for i, start in enumerate(starts):
        cells = [f"{results['initial']['loss'][i]:.2f}"] + [
            f"{results[m]['loss'][i]:.2f}" for m in methods
        ]
        rows.append(f"| ({start[0]:g}, {start[1]:g}) | " + " | ".join(cells) + " |")
    means = [f"**{results['initial']['loss'].mean():.2f}**"] + [
        f"**{results[m]['loss'].mean():.2f}**" for m in methods
    ]
    rows.append("| mean | " + " | ".join(means) + " |")
    steps = ["-"] + [str(results[m]["inner_steps"]) for m in methods]
    rows.append("| inner steps per run | " + " | ".join(steps) + " |")
    return "\n".join(rows)


def results_of(cells, methods, inner_steps, task_seed, starts=GRID, config=Config()):
    """`run`'s results for one (K, seed) of a sweep (for `table` and `plot`)."""
    results = {m: _arrays(cells[cell_key(m, inner_steps, task_seed)]) for m in methods}
    tasks = dataclasses.replace(config, task_seed=task_seed).tasks()
    results["initial"] = {"loss": tasks.adapted_loss(np.array(starts), steps=config.eval_steps)}
    return results


# ------------------------------------------- Reptile's meta-level landscape
def task_gradients(tasks, points):
    """Each task's loss gradient at its own point, in closed form (NumPy, float64).

    `points` is `[..., num_tasks, 2]`. With (u, v) = R (p - t) / s,
    A = u^2 + v - 11 and B = u + v^2 - 7, the loss a A^2 + c B^2 has
    dL/du = 4 a A u + 2 c B, dL/dv = 2 a A + 4 c B v, and dL/dp = R^T (dL/du, dL/dv) / s.
    """
    d = tasks.descriptors.astype(np.float64)
    cos, sin = d[:, 0], d[:, 1]
    dx, dy = points[..., 0] - d[:, 2], points[..., 1] - d[:, 3]
    u = (cos * dx - sin * dy) / tasks.scale
    v = (sin * dx + cos * dy) / tasks.scale
    A, B = u * u + v - 11.0, u + v * v - 7.0
    du, dv = 4.0 * tasks.a * A * u + 2.0 * tasks.c * B, 2.0 * tasks.a * A + 4.0 * tasks.c * B * v
    return np.stack([cos * du + sin * dv, cos * dv - sin * du], axis=-1) / tasks.scale


def reptile_map(tasks, phis, inner_steps, config=Config()):
    """One Reptile meta-update of every phi in `phis` `[N, 2]` (NumPy).

    Every task runs `inner_steps` steps of SGD with momentum from phi (fresh
    momentum, as the authors' `meta_update`), then
    phi <- phi + beta * mean_t(theta_K - phi).
    """
    theta = np.repeat(np.asarray(phis, np.float64)[:, None, :], tasks.num_tasks, axis=1)
    velocity = np.zeros_like(theta)
    for _ in range(inner_steps):
        velocity = config.momentum * velocity + task_gradients(tasks, theta)
        theta = theta - config.inner_lr * velocity
    return phis + config.meta_lr * (theta.mean(axis=1) - phis)


def reptile_landscape(tasks, inner_steps, config=Config(), grid=21, max_updates=1000, tol=1e-4,
                      radius=0.05):
    """Reptile with a fixed trajectory length, from every point of a grid, to its rest.

    Iterates `reptile_map` from a `grid` x `grid` lattice of [-5, 15]^2 until
    no point moves more than `tol` (or `max_updates`). Returns a dict:
    `paths` `[updates + 1, N, 2]`, `converged` `[N]` (moved less than `tol`
    in the last update), and `optima` `[P, 2]`: the distinct rest points
    (closer than `radius` = one), the meta-level local optima of figure 5(a,b).
    """
    axis = np.linspace(-5.0, 15.0, grid)
    phis = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    paths, moved = [phis], np.full(len(phis), np.inf)
    for _ in range(max_updates):
        new = reptile_map(tasks, paths[-1], inner_steps, config)
        moved = np.linalg.norm(new - paths[-1], axis=1)
        paths.append(new)
        if moved.max() < tol:
            break
    converged = moved < tol
    optima = []
    for point in paths[-1][converged]:
        if all(np.linalg.norm(point - o) >= radius for o in optima):
            optima.append(point)
    return {"paths": np.array(paths), "converged": converged, "optima": np.array(optima).reshape(-1, 2)}


# ----------------------------------------------------------------- figures
def _quality_map(tasks, config, grid):
    """`(xx, yy, loss)`: task-average loss after `eval_steps` from a grid of phi."""
    axis = np.linspace(-5.0, 15.0, grid)
    xx, yy = np.meshgrid(axis, axis)
    points = np.stack([xx.ravel(), yy.ravel()], 1)
    return xx, yy, tasks.adapted_loss(points, steps=config.eval_steps).reshape(grid, grid)


def _landscape_axes(ax, tasks, quality=None):
    """Contours of `quality` (if any), the task centres and the domain."""
    contour = None
    if quality is not None:
        contour = ax.contourf(*quality, levels=30, cmap="viridis_r")
    ax.plot(tasks.targets[:, 0], tasks.targets[:, 1], "^", color="orange", markeredgecolor="k",
            markersize=6)
    ax.set_xlim(-5.5, 15.5)
    ax.set_ylim(-5.5, 15.5)
    ax.set_aspect("equal")
    return contour


def _draw_paths(ax, paths, color, end="m*"):
    for points in paths:
        ax.plot(points[:, 0], points[:, 1], "-", color=color, linewidth=1.0, alpha=0.9)
        ax.plot(points[0, 0], points[0, 1], "o", color=color, markersize=4)
        ax.plot(points[-1, 0], points[-1, 1], end, markersize=11)


def _save(fig, path):
    import matplotlib.pyplot as plt

    with atomic.open_atomic(path) as handle:  # a crash keeps the old PNG
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results, path, config=Config(), grid=80):
    """PNG: the landscape of initialization quality with the meta-trajectories."""
    plt = _pyplot()
    tasks = config.tasks()
    quality = _quality_map(tasks, config, grid)
    methods = [m for m in results if m != "initial"]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 5.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        contour = _landscape_axes(ax, tasks, quality)
        _draw_paths(ax, results[method]["paths"], "w")
        ax.set_title(f"{method}: mean loss {results[method]['loss'].mean():.2f}")
    fig.colorbar(contour, ax=axes[0].tolist(), label=f"task-average loss after {config.eval_steps} steps")
    _save(fig, path)


def plot_k(cells, path, methods, inner_steps, task_seeds, config=Config(), landscape_ks=(25, 100),
           count_ks=(5, 10, 25, 50, 80, 100, 120), grid=21, quality_grid=60, log=None):
    """PNG of the paper's figure 5 and the effect of K; returns the landscape counts.

    (a, b) Reptile's meta-trajectories with fixed k from a grid of phi, rest
    points red (the meta-level local optima), task centres orange; (c) the
    number of optima against k, with the task-average loss after
    `eval_steps` steps from where the grid comes to rest; (d, e) Reptile's
    and CTS's meta-trajectories from the 9 start points on the map of
    initialization quality (task seed `task_seeds[0]`, the K of
    `inner_steps` closest to 100); (f) each method's mean loss minus
    Reptile's against K, paired per task seed, mean +- std over `task_seeds`.
    Returns `{k: {"optima", "unconverged", "rest_loss"}}` for `count_ks`.
    """
    plt = _pyplot()
    tasks = dataclasses.replace(config, task_seed=task_seeds[0]).tasks()
    quality = _quality_map(tasks, config, quality_grid)
    fig, axes = plt.subplots(2, 3, figsize=(18, 11.5))
    counts, landscapes = {}, {}
    for k in sorted(set(count_ks) | set(landscape_ks)):
        land = landscapes[k] = reptile_landscape(tasks, k, config, grid)
        rest = tasks.adapted_loss(land["paths"][-1], steps=config.eval_steps)
        counts[k] = {"optima": len(land["optima"]), "unconverged": int(np.sum(~land["converged"])),
                     "rest_loss": float(rest.mean()), "updates": len(land["paths"]) - 1}
        say(log, f"Reptile with fixed k={k}: {counts[k]}")
    for ax, k in zip(axes[0, :2], landscape_ks):
        _landscape_axes(ax, tasks)
        lines = landscapes[k]["paths"]
        ax.plot(lines[:, :, 0], lines[:, :, 1], "k-", linewidth=1.0, alpha=0.15)
        ax.plot(*landscapes[k]["optima"].T, "ro", markersize=6)
        ax.set_title(f"({'ab'[landscape_ks.index(k)]}) Reptile, k = {k} fixed: "
                     f"{counts[k]['optima']} rest points")
    ks = sorted(counts)
    ax = axes[0, 2]
    lines = ax.plot(ks, [counts[k]["optima"] for k in ks], "ro-", label="rest points (left)")
    ax.set_xlabel("k (fixed trajectory length)")
    ax.set_ylabel(f"distinct rest points of {grid}x{grid} starts")
    twin = ax.twinx()
    lines += twin.plot(ks, [counts[k]["rest_loss"] for k in ks], "bs--",
                       label=f"grid-mean loss after {config.eval_steps} steps where it ends (right)")
    twin.set_ylabel("task-average loss", color="b")
    ax.set_title("(c) Reptile's meta-level optima vs k")
    ax.legend(handles=lines, loc="lower right")
    K = min(inner_steps, key=lambda k: abs(k - 100))
    for ax, method, name in zip(axes[1, :2], ("reptile", "cts"), "de"):
        cell = cells[cell_key(method, K, task_seeds[0])]
        contour = _landscape_axes(ax, tasks, quality)
        _draw_paths(ax, [np.array(p) for p in cell["paths"]], "w")
        if method == "reptile" and K in landscapes:
            ax.plot(*landscapes[K]["optima"].T, "ro", markersize=5)
        ax.set_title(f"({name}) {method}, K = {K}, seed {task_seeds[0]}: "
                     f"mean loss {np.mean(cell['loss']):.2f}")
    fig.colorbar(contour, ax=axes[1, :2].tolist(),
                 label=f"task-average loss after {config.eval_steps} steps")
    ax = axes[1, 2]
    ax.axhline(0.0, color="C0", label="reptile")
    others = [m for m in methods if m != "reptile"]
    for i, method in enumerate(others, 1):
        gaps = [seed_means(cells, method, k, task_seeds) - seed_means(cells, "reptile", k, task_seeds)
                for k in inner_steps]
        ax.errorbar(np.array(inner_steps) + (i - (len(others) + 1) / 2), [g.mean() for g in gaps],
                    yerr=[g.std(ddof=1) if len(g) > 1 else 0.0 for g in gaps],
                    capsize=4, marker="o", color=f"C{i}", label=method)
    ax.set_xlabel("K (inner trajectory length of meta-training)")
    ax.set_ylabel(f"loss after {config.eval_steps} steps minus Reptile's")
    ax.set_title(f"(f) vs Reptile, paired: mean ± std over {len(task_seeds)} task seeds")
    ax.legend()
    _save(fig, path)
    return counts
