"""PNG heatmap of a reachability matrix (matplotlib, Agg canvas)."""

from __future__ import annotations

import os

import gin
import numpy as np

__all__ = ["plot_reachability"]


@gin.configurable(module="tfmeta.complexity")
def plot_reachability(reach, path, title=None, cmap="viridis", dpi=120):
    """Save ``reach`` (a :class:`~tfmeta.complexity.Reachability`) as a PNG.

    Cell colour: static distance ``d(source -> target)`` (rows = target,
    columns = source, as in the paper's figure 2); annotation: fine-tuning
    steps to the loss threshold, "n.c." when it did not converge. Uses a
    ``FigureCanvasAgg`` directly, so the global matplotlib backend is left
    alone. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(reach.names)
    n = len(names)
    size = max(3.5, 1.0 + 0.9 * n)
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    dist = np.asarray(reach.distance, np.float64)
    image = ax.imshow(dist, cmap=cmap)
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label("d(source -> target) = C(S u T) - C(S)")
    ax.set_xticks(range(n), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=names)
    ax.set_xlabel("source (pre-training)")
    ax.set_ylabel("target (fine-tuning)")
    finite = dist[np.isfinite(dist)]
    mid = 0.5 * (finite.min() + finite.max()) if finite.size else 0.0
    for t in range(n):
        for s in range(n):
            text = str(int(reach.steps[t, s])) if reach.converged[t, s] else "n.c."
            color = "black" if dist[t, s] > mid else "white"
            ax.text(s, t, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_title(title or f"fine-tuning steps (budget {reach.max_steps})")
    fig.tight_layout()
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
