"""Running a complexity experiment into a folder, and what it writes there.

Every complexity experiment (``complexity_relabel``, ``complexity_kramers``,
``complexity_reachability``, ``complexity_ranking``, ``complexity_prediction``)
returns its results as a dict and, given an output folder, writes them
through :func:`write_outputs`: ``results.json``,
``summary.md`` (Markdown tables) and a PNG figure, each atomically
(``tfmeta.atomic``). :func:`run` is the gin entry point of
``tools/complexity.py`` (``run.experiment = @relabel_experiment``).

Example::

    from tfmeta.experiments.complexity_relabel import relabel_experiment
    run("runs/relabel", experiment=relabel_experiment)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import pathlib
import signal
import sys
from typing import Callable, Optional

import numpy as np

from tfmeta import atomic
from tfmeta.experiments import machine

__all__ = ["CellStore", "checkpoints_cells", "describe_callable", "describe_recipe", "print_line", "run",
           "say", "write_outputs"]


def print_line(message):
    """The experiments' default log: print and flush."""
    print(message, flush=True)


def say(log: Optional[Callable[[str], None]], message: str):
    """``log(message)`` unless ``log`` is None (a silent run)."""
    if log is not None:
        log(message)


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return repr(value)


def describe_recipe(recipe) -> dict:
    """A :class:`~tfmeta.complexity.TrainingRecipe` as a JSON-friendly dict
    (the optimizer factory by name and arguments).

    Example::

        describe_recipe(default_recipe(5e-4))["optimizer"]   # "sgd({'learning_rate': 0.1, ...})"
    """
    out = dataclasses.asdict(recipe)
    out["optimizer"] = describe_callable(recipe.optimizer)
    return out


def describe_callable(fn) -> str:
    """A factory as results.json records it: ``name({keywords})`` for a
    ``functools.partial``, the name of a function, else its ``repr``. No
    memory address: two runs of one configuration record the same text.

    Example::

        describe_callable(functools.partial(sgd, learning_rate=0.1))   # "sgd({'learning_rate': 0.1})"
    """
    if isinstance(fn, functools.partial):
        args = f"{list(fn.args)}, " if fn.args else ""
        return f"{describe_callable(fn.func)}({args}{fn.keywords})"
    return getattr(fn, "__name__", None) or repr(fn)


def write_outputs(out, output_dir, plot_fn, figure_name, markdown, log):
    """Write an experiment's figure (``plot_fn(path)``, skipped when falsy),
    ``results.json`` and ``summary.md`` (``markdown(out)``) into
    ``output_dir`` (nothing when None), log the summary, and return ``out``
    (with ``out["figure"]``, the PNG's path).

    Example::

        write_outputs(out, "runs/x", lambda p: plot_relabel(out, p), "relabel.png",
                      relabel_markdown, print_line)
    """
    if output_dir is not None:
        folder = pathlib.Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if plot_fn:
            out["figure"] = str(plot_fn(folder / figure_name))
        atomic.write_text(folder / "results.json",
                          json.dumps(out, indent=2, default=_json_default))
        atomic.write_text(folder / "summary.md", markdown(out))
    say(log, markdown(out))
    return out


class CellStore:
    """The finished cells of a long experiment, checkpointed to
    ``results.json`` in its output folder so that ``--resume`` continues it.

    Each cell is a JSON-friendly dict under a string key. :meth:`put` rewrites
    ``results.json`` atomically as ``{"experiment": name, "cells": {...}}``
    after every cell (older files also say ``"partial": true``, which is
    ignored); the experiment's final
    ``results.json`` keeps the ``"cells"`` entry, so resuming a finished run
    recomputes only its summary. With ``resume=False`` (or no folder) nothing
    is read and every cell is computed again (and the file replaced). Given a ``log``, a resumed
    store says how many cells it found, and in one note how many of them
    were computed with other kernels than this process's
    (``machine.other_kernels``): :meth:`put` records in each cell the
    ``machine`` it was computed on (``machine.describe()``, once TensorFlow
    is imported), unless the cell says already. After a Ctrl-C that something
    swallowed, :meth:`put` raises KeyboardInterrupt once the cell is saved.

    Example::

        store = CellStore("runs/kramers", "kramers", resume=True, log=print_line)
        row = store.get("b32_s0") or store.put("b32_s0", measure(32, 0))
    """

    def __init__(self, output_dir, experiment: str, resume: bool = False,
                 log: Optional[Callable[[str], None]] = None):
        self.path = None if output_dir is None else pathlib.Path(output_dir) / "results.json"
        self.experiment = experiment
        self.resume = resume
        self.cells = {}
        self.resumed = 0
        if resume and self.path is not None and self.path.is_file():
            previous = json.loads(self.path.read_text())
            if previous.get("experiment") != experiment:
                raise ValueError(
                    f"--resume: {self.path} holds a {previous.get('experiment')!r} experiment, "
                    f"not {experiment!r}; use another --output_dir or drop --resume")
            self.cells = dict(previous.get("cells", {}))
            self.resumed = len(self.cells)
            say(log, f"resuming: {self.resumed} cells already done")
        self._machine = None
        records = [cell.get("machine") for cell in self.cells.values() if isinstance(cell, dict)]
        here = self._computed_on()
        # Without TensorFlow in this process there are no kernels to compare
        # with: every record would look foreign.
        if any(records) and here is not None:
            note = machine.other_kernels(records, here)
            if note:
                say(log, f"note: {note}")

    def _computed_on(self):
        # Only TensorFlow's kernels are recorded: a store whose process has not
        # imported it (no cell computed with it) records nothing, and starts no
        # TensorFlow just for the record.
        if self._machine is None and "tensorflow" in sys.modules:
            self._machine = machine.describe()
        return self._machine

    def get(self, key: str):
        """The finished cell ``key``, or None."""
        return self.cells.get(key)

    def put(self, key: str, cell: dict) -> dict:
        """Record ``cell`` under ``key``, checkpoint, and return it.

        A resumed store first takes in the cells that other processes added
        to results.json meanwhile (under a lock), so several workers can fill
        one experiment's cells side by side.
        """
        if "machine" not in cell and self._computed_on():  # a record, not a setting: not compared
            cell["machine"] = self._computed_on()
        self.cells[key] = cell
        if self.path is not None:
            with atomic.exclusive_lock(self.path.with_name(".results.json.lock")):
                if self.resume and self.path.is_file():
                    others = json.loads(self.path.read_text()).get("cells", {})
                    self.cells = {**others, **self.cells}
                atomic.write_text(self.path, json.dumps(
                    dict(experiment=self.experiment, cells=self.cells),
                    indent=1, default=_json_default))
        stop_if_interrupted()
        return cell


def stop_if_interrupted():
    """Raise KeyboardInterrupt if a Ctrl-C came and something swallowed it; call it after saving a cell.

    A library may discard the KeyboardInterrupt of a Ctrl-C (a bare
    `except:`, a finalizer's "Exception ignored in"); the tools' SIGINT
    handler (`tfmeta.cli.errors.CtrlC`) remembers it, so an experiment that
    saves its cells stops at the next saved one instead of running on.
    Outside the tools it does nothing.

    Example::

        atomic.write_text(path, json.dumps(results))   # the cell is saved
        stop_if_interrupted()
    """
    if getattr(signal.getsignal(signal.SIGINT), "interrupted", False):
        raise KeyboardInterrupt


def checkpoints_cells(experiment) -> bool:
    """Whether ``experiment`` writes its cells to results.json as they finish: it takes ``resume``.

    Such experiments (relabel, kramers, prediction) continue with
    ``resume=True``; gin's configured function counts as the function.

    Example::

        checkpoints_cells(relabel_experiment)        # True
        checkpoints_cells(reachability_experiment)   # False
    """
    try:
        return "resume" in inspect.signature(inspect.unwrap(experiment)).parameters
    except (TypeError, ValueError):
        return False


def run(output_dir, experiment: Optional[Callable] = None, resume: bool = False):
    """Run ``experiment`` (gin: ``run.experiment = @relabel_experiment``,
    ``@kramers_experiment``, ``@reachability_experiment``,
    ``@ranking_experiment`` or ``@prediction_experiment``) into ``output_dir`` and
    return its results. ``resume=True`` (``tools/complexity.py --resume``)
    continues an interrupted run of an experiment that checkpoints its cells
    (those with a ``resume`` argument); others refuse it.

    Example (gin)::

        tfmeta.complexity.run.experiment = @tfmeta.complexity.relabel_experiment
    """
    if experiment is None:
        raise ValueError(
            "no experiment selected: bind 'run.experiment = @relabel_experiment' "
            "(or @kramers_experiment, @reachability_experiment, @ranking_experiment, "
            "@prediction_experiment) in the gin file, e.g. gin/complexity_relabel.gin"
        )
    if not callable(experiment):
        raise TypeError(
            "run.experiment must be an experiment function, e.g. "
            "'run.experiment = @relabel_experiment' (no parentheses)"
        )
    os.makedirs(output_dir, exist_ok=True)
    if resume:
        if not checkpoints_cells(experiment):
            name = getattr(inspect.unwrap(experiment), "__name__", experiment)
            raise ValueError(f"--resume: {name} does not checkpoint its cells; rerun it without --resume")
        return experiment(output_dir=output_dir, resume=True)
    return experiment(output_dir=output_dir)
