"""The settings the complexity experiments share, each declared once.

Every experiment trains models from scratch on named tasks
(:class:`TrainSettings`: examples, model, recipe, plot, data folder, log).
Those that measure ``C_beta`` add the prior and the Fisher estimate
(:class:`ComplexitySettings`: ``lam``, weight decay, Fisher samples and
batch: ``relabel_experiment``, ``kramers_experiment``); those that fine-tune
what they trained add the fine-tuning recipe and the tasks' seed
(:class:`TransferSettings`: ``prediction_experiment``); those that do both
have both (:class:`FinetuneSettings`: ``reachability_experiment``,
``ranking_experiment``). :func:`with_settings` adds a class's fields to an
experiment's signature as keyword parameters, so gin binds and checks them
under the experiment's name (``ranking_experiment.lam = 0.1``) and
``help()`` lists them, and hands the experiment one resolved settings
object.

Example::

    @with_settings(FinetuneSettings)
    def my_experiment(output_dir=None, tasks=("mnist",), *, settings):
        data = settings.task_data(tasks)
        return dict(settings=dict(tasks=list(tasks), **settings.describe()))

    my_experiment("runs/x", examples=300, lam=0.1)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

from tfmeta.complexity import TrainingRecipe
from tfmeta.complexity.measure import resolve_beta
from tfmeta.experiments.complexity_run import (
    describe_callable,
    describe_recipe,
    print_line,
    write_outputs,
)
from tfmeta.experiments.complexity_tasks import default_recipe, mlp_classifier, task_arrays

__all__ = [
    "ComplexitySettings",
    "FinetuneSettings",
    "TrainSettings",
    "TransferSettings",
    "with_settings",
]

#: The weight decay ``gamma`` of the default recipe where no ``weight_decay``
#: is a setting (and the default of ``weight_decay`` where it is).
DEFAULT_WEIGHT_DECAY = 5e-4
#: The default recipes of the experiments that measure ``C_beta`` check the
#: loss after every step once it is within this factor of the threshold
#: (``TrainingRecipe.fine_check_factor``, as gin/complexity_relabel.gin and
#: gin/complexity_kramers.gin bind it), so that ``C_beta`` and step counts are
#: taken at the first step under the threshold (issue 12 section 3).
FINE_CHECK_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Training models from scratch on named tasks.

    Attributes:
      examples: training examples per task (:func:`task_arrays`).
      model_fn: ``model_fn(num_classes=k)`` makes a fresh model.
      recipe: the training recipe from scratch; default
        :func:`default_recipe` (each class says with what: ``_default_recipe``).
      plot: write the experiment's figure.
      data_dir: where the prepared datasets are (None: the default).
      log: ``log(message)`` for progress lines (None: silent).

    Example::

        s = TrainSettings(examples=300)
        s.task("mnist")[0].shape       # (300, 28, 28, 1)
    """

    examples: int = 1000
    model_fn: Callable = mlp_classifier
    recipe: Optional[TrainingRecipe] = None
    plot: bool = True
    data_dir: Any = None
    log: Optional[Callable[[str], None]] = print_line

    def __post_init__(self):
        object.__setattr__(self, "recipe", self.recipe or self._default_recipe())

    def _default_recipe(self) -> TrainingRecipe:
        """``recipe`` when none is given: :func:`default_recipe` (SGD, weight
        decay ``2 * DEFAULT_WEIGHT_DECAY``, seed 0)."""
        return default_recipe(DEFAULT_WEIGHT_DECAY)

    def task(self, name, seed=0):
        """``(x, y)``: ``examples`` examples of the named task, drawn with ``seed``."""
        return task_arrays(name, self.examples, seed=seed, data_dir=self.data_dir)

    def describe(self) -> dict:
        """The settings an experiment's ``results.json`` records."""
        return dict(examples=int(self.examples), recipe=describe_recipe(self.recipe),
                    model=describe_callable(self.model_fn))

    def write_outputs(self, out, output_dir, plot_fn, figure_name, markdown):
        """:func:`~tfmeta.experiments.complexity_run.write_outputs` with this
        run's ``log``, drawing the figure (``plot_fn(path)``) only if ``plot``."""
        return write_outputs(out, output_dir, self.plot and plot_fn, figure_name, markdown,
                             self.log)


@dataclasses.dataclass(frozen=True)
class ComplexitySettings(TrainSettings):
    """:class:`TrainSettings` and how ``C_beta`` is measured.

    Attributes (besides :class:`TrainSettings`'):
      lam, weight_decay: the prior's standard deviation and the weight decay
        that give ``beta`` (:func:`~tfmeta.complexity.resolve_beta`); the
        default recipe decays the weights by ``2 * weight_decay``.
      fisher_samples, fisher_batch_size: the Fisher estimate's examples
        (None: all) and batch size.

    Example::

        s = ComplexitySettings(lam=0.1, weight_decay=5e-4)
        s.beta                         # 2 lam^2 gamma = 1e-05
        s.recipe.fine_check_factor     # 2.0
    """

    lam: float = 0.1
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    fisher_samples: Optional[int] = None
    fisher_batch_size: int = 100

    def __post_init__(self):
        super().__post_init__()
        # a bad lam or weight decay is refused here, before any training
        resolve_beta(None, self.lam, self.weight_decay)

    def _default_recipe(self) -> TrainingRecipe:
        """:func:`default_recipe` with ``weight_decay``, checking the loss after
        every step once within 2x of the threshold, so that a run stops, and
        ``C_beta`` is measured, at the first step under it."""
        return default_recipe(self.weight_decay, fine_check_factor=FINE_CHECK_FACTOR)

    @property
    def beta(self) -> float:
        """``2 lam^2 weight_decay``."""
        return resolve_beta(None, self.lam, self.weight_decay)[0]

    @property
    def complexity_kwargs(self) -> dict:
        """The Fisher settings as :func:`~tfmeta.complexity.complexity` keywords."""
        return dict(fisher_samples=self.fisher_samples, batch_size=self.fisher_batch_size)

    def describe(self) -> dict:
        """:meth:`TrainSettings.describe` with ``lam``, ``weight_decay``, ``beta``
        and ``fisher_samples``."""
        return dict(super().describe(), lam=float(self.lam),
                    weight_decay=float(self.weight_decay), beta=self.beta,
                    fisher_samples=self.fisher_samples)


@dataclasses.dataclass(frozen=True)
class TransferSettings(TrainSettings):
    """:class:`TrainSettings` and the fine-tuning of what was trained.

    Attributes (besides :class:`TrainSettings`'):
      finetune_recipe: the fine-tuning recipe; default ``recipe`` with a
        10000-step budget.
      seed: the tasks' example draw and the default recipe's seed.

    Example::

        s = TransferSettings(seed=1)
        s.recipe.seed, s.finetune_recipe.steps    # 1, 10000
    """

    finetune_recipe: Optional[TrainingRecipe] = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "finetune_recipe", self.finetune_recipe
                           or dataclasses.replace(self.recipe, steps=10000))

    def _default_recipe(self) -> TrainingRecipe:
        """The next class's default recipe with ``seed``: :class:`TrainSettings`'
        here, :class:`ComplexitySettings`' in :class:`FinetuneSettings`."""
        # super(), not TrainSettings: in FinetuneSettings the next class in the
        # MRO is ComplexitySettings, whose recipe (weight_decay, the fine
        # check) is the one to seed.
        return dataclasses.replace(super()._default_recipe(), seed=self.seed)

    def task_data(self, names) -> dict:
        """``{name: (x, y)}``: ``examples`` examples of each named task, drawn with ``seed``."""
        return {t: self.task(t, self.seed) for t in names}

    def describe(self) -> dict:
        """:meth:`TrainSettings.describe` with ``seed`` and ``finetune_recipe``."""
        return dict(super().describe(), seed=int(self.seed),
                    finetune_recipe=describe_recipe(self.finetune_recipe))


@dataclasses.dataclass(frozen=True)
class FinetuneSettings(TransferSettings, ComplexitySettings):
    """Pretraining, complexity and fine-tuning settings: the fields of
    :class:`ComplexitySettings` and of :class:`TransferSettings`.

    The default recipe is :class:`ComplexitySettings`' (checks after every
    step within 2x of the threshold) with ``seed`` (set by
    :class:`TransferSettings`' ``_default_recipe``, next in the MRO): the pretrained models
    whose ``C_beta`` is measured stop at the first step under the threshold,
    and the default fine-tuning recipe (the same, with a 10000-step budget)
    counts fine-tuning steps to that step, not to the next multiple of
    ``eval_every``.

    Example::

        s = FinetuneSettings(examples=300, weight_decay=1e-3, seed=2)
        s.finetune_recipe.steps        # 10000
        s.finetune_recipe.fine_check_factor    # 2.0
    """


def with_settings(settings_class):
    """A decorator: ``experiment(..., *, settings)`` as a function taking the
    fields of ``settings_class`` (a settings dataclass of this module) as
    keyword parameters instead.

    Its signature (``inspect.signature``, which gin reads) is the
    experiment's own parameters followed by the settings' fields; a call
    binds them, fills in the defaults and passes ``settings=
    settings_class(...)``.

    Example::

        @with_settings(ComplexitySettings)
        def my_experiment(output_dir=None, *, settings): ...
        my_experiment("runs/x", lam=0.3)   # settings.lam == 0.3
    """
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                annotation=f.type)
              for f in dataclasses.fields(settings_class)]

    def decorate(experiment):
        own = inspect.signature(experiment)
        if "settings" not in own.parameters:
            raise TypeError(f"{experiment.__name__} must take a keyword parameter 'settings'")
        signature = own.replace(
            parameters=[p for p in own.parameters.values() if p.name != "settings"] + fields)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = bound.arguments
            settings = settings_class(**{p.name: values.pop(p.name) for p in fields})
            return experiment(**values, settings=settings)

        # Not functools.wraps: gin and inspect follow __wrapped__ to the inner
        # signature, which has `settings` instead of the fields gin binds.
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(call, attribute, getattr(experiment, attribute))
        call.__signature__ = signature
        return call

    return decorate
