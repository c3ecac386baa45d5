"""The CTS paper's synthetic experiment (section 4.1, figures 4-5).

From each start point of the grid {-5, 5, 15}^2, meta-train the initialization
of the rotated-Himmelblau family with Reptile, CTS (and its ablations) and
CTS's exact reference, all with the same number of meta-updates (M * K), and
score each learned phi by the task-average loss after K inner steps from it.

Run it with `python tools/cts_synthetic.py` (see `--help`).
"""

import dataclasses
import json
import time

import keras
import numpy as np

from tfmeta import atomic
from tfmeta.learners import ContinualTrajectoryShifting, Reptile
from tfmeta.meta_model import MetaModel
from tfmeta.tasks.himmelblau import RotatedHimmelblau

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


@dataclasses.dataclass
class Config:
    """The paper's setting: alpha 0.05, beta 0.1, K 100, M 3, SGD momentum 0.9."""

    inner_lr: float = 0.05
    meta_lr: float = 0.1
    inner_steps: int = 100
    processes: int = 3
    momentum: float = 0.9
    eval_steps: int = 100
    task_seed: int = 0


class _Trajectory(keras.callbacks.Callback):
    """Records phi after every execution of the train function."""

    def __init__(self):
        super().__init__()
        self.points = []

    def on_train_batch_end(self, batch, logs=None):
        self.points.append(np.array(self.model.model.trainable_variables[0].numpy()))


def meta_train(method, start, config=Config(), tasks=None):
    """Meta-train from `start` with `method`; returns (phi, trajectory, inner steps)."""
    tasks = tasks or RotatedHimmelblau(seed=config.task_seed)
    learner = METHODS[method]()
    K = config.inner_steps
    updates = config.processes * K
    # Chunks as long as the schedule allows (K for Reptile, 1 for CTS); the
    # exact reference's trajectories of length 1..K take K(K+1)/2 steps each.
    chunk = learner.schedule.period(K)
    train_steps = learner.schedule.steps_for(updates, K, chunk)
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
        # One callback per meta-update is plenty for the plot; the exact
        # reference takes K(K+1)/2 steps per process, so record it coarser.
        steps_per_execution=50 if chunk == 1 and train_steps > updates else 1,
    )
    trajectory = _Trajectory()
    meta.fit(
        tasks.as_dataset(inner_steps=K, steps_per_chunk=chunk),
        steps_per_epoch=train_steps,
        epochs=1,
        verbose=0,
        callbacks=[trajectory],
    )
    assert int(meta.meta_updates.numpy()) == updates, "every method gets M*K meta-updates"
    phi = np.array(model.trainable_variables[0].numpy())
    path = np.array([np.asarray(start, "float32")] + trajectory.points)
    return phi, path, train_steps * chunk


def run(methods=("reptile", "cts", "cts_accurate"), starts=GRID, config=Config(), verbose=True):
    """Run the experiment; returns a dict of per-method results."""
    tasks = RotatedHimmelblau(seed=config.task_seed)
    results = {}
    for method in methods:
        phis, paths, seconds = [], [], []
        for start in starts:
            began = time.perf_counter()
            phi, path, inner = meta_train(method, start, config, tasks)
            seconds.append(time.perf_counter() - began)
            phis.append(phi)
            paths.append(path)
        losses = tasks.adapted_loss(np.array(phis), steps=config.eval_steps)
        results[method] = {
            "phi": np.array(phis),
            "paths": paths,
            "loss": losses,
            "inner_steps": inner,
            "seconds": float(np.sum(seconds)),
        }
        if verbose:
            print(
                f"{method:>17}: mean task-average loss after {config.eval_steps} steps "
                f"{losses.mean():.3f} ({np.sum(seconds):.1f} s)",
                flush=True,
            )
    results["initial"] = {"loss": tasks.adapted_loss(np.array(starts), steps=config.eval_steps)}
    return results


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


def plot(results, path, config=Config(), grid=80):
    """PNG: the landscape of initialization quality with the meta-trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = RotatedHimmelblau(seed=config.task_seed)
    axis = np.linspace(-5.0, 15.0, grid)
    xx, yy = np.meshgrid(axis, axis)
    quality = tasks.adapted_loss(
        np.stack([xx.ravel(), yy.ravel()], 1), steps=config.eval_steps
    ).reshape(grid, grid)
    methods = [m for m in results if m != "initial"]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 5.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        contour = ax.contourf(xx, yy, quality, levels=30, cmap="viridis_r")
        ax.plot(tasks.targets[:, 0], tasks.targets[:, 1], "r^", markersize=5, label="task centres")
        for points in results[method]["paths"]:
            ax.plot(points[:, 0], points[:, 1], "w-", linewidth=1.0, alpha=0.9)
            ax.plot(points[0, 0], points[0, 1], "wo", markersize=4)
            ax.plot(points[-1, 0], points[-1, 1], "m*", markersize=11)
        ax.set_title(f"{method}: mean loss {results[method]['loss'].mean():.2f}")
        ax.set_xlim(-5.5, 15.5)
        ax.set_ylim(-5.5, 15.5)
        ax.set_aspect("equal")
    fig.colorbar(contour, ax=axes[0].tolist(), label=f"task-average loss after {config.eval_steps} steps")
    with atomic.open_atomic(path) as handle:  # a crash keeps the old PNG
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def to_json(results):
    return json.dumps(
        {
            m: {"loss": r["loss"].tolist(), **({"phi": r["phi"].tolist()} if "phi" in r else {})}
            for m, r in results.items()
        },
        indent=2,
    )
