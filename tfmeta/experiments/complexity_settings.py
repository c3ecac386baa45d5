"""The settings the fine-tuning complexity experiments share, declared once.

``reachability_experiment`` and ``ranking_experiment`` both pretrain models
on named tasks, measure their complexity and fine-tune them: they take the
same dozen settings (examples, model, recipes, ``lam``, weight decay, Fisher
estimate, seed, plot, data folder, log). :class:`FinetuneSettings` holds
them; :func:`with_settings` adds its fields to an experiment's signature as
keyword parameters, so gin binds and checks them under the experiment's name
(``ranking_experiment.lam = 0.1``) and ``help()`` lists them, and hands the
experiment one resolved ``FinetuneSettings``.

Example::

    @with_settings
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
from tfmeta.experiments.complexity_run import describe_recipe, print_line
from tfmeta.experiments.complexity_tasks import default_recipe, mlp_classifier, task_arrays

__all__ = ["FinetuneSettings", "with_settings"]


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """Pretraining, fine-tuning and complexity settings of one experiment.

    Attributes:
      examples: training examples per task (:func:`task_arrays`).
      model_fn: ``model_fn(num_classes=k)`` makes a fresh model.
      recipe: pretraining recipe (from scratch, and unions of tasks);
        default :func:`default_recipe` with ``weight_decay`` and ``seed``.
      finetune_recipe: fine-tuning recipe; default ``recipe`` with a
        10000-step budget.
      lam, weight_decay: the prior's standard deviation and the weight decay
        that give ``beta`` (:func:`~tfmeta.complexity.resolve_beta`).
      fisher_samples, fisher_batch_size: the Fisher estimate's examples
        (None: all) and batch size.
      seed: the tasks' example draw and the default recipe's seed.
      plot: write the experiment's figure.
      data_dir: where the prepared datasets are (None: the default).
      log: ``log(message)`` for progress lines (None: silent).

    Example::

        s = FinetuneSettings(examples=300)
        s.finetune_recipe.steps        # 10000
    """

    examples: int = 1000
    model_fn: Callable = mlp_classifier
    recipe: Optional[TrainingRecipe] = None
    finetune_recipe: Optional[TrainingRecipe] = None
    lam: float = 0.1
    weight_decay: float = 5e-4
    fisher_samples: Optional[int] = None
    fisher_batch_size: int = 100
    seed: int = 0
    plot: bool = True
    data_dir: Any = None
    log: Optional[Callable[[str], None]] = print_line

    def __post_init__(self):
        recipe = self.recipe or default_recipe(self.weight_decay, seed=self.seed)
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "finetune_recipe",
                           self.finetune_recipe or dataclasses.replace(recipe, steps=10000))

    @property
    def complexity_kwargs(self) -> dict:
        """The Fisher settings as :func:`~tfmeta.complexity.complexity` keywords."""
        return dict(fisher_samples=self.fisher_samples, batch_size=self.fisher_batch_size)

    def task_data(self, names) -> dict:
        """``{name: (x, y)}``: ``examples`` examples of each named task."""
        return {t: task_arrays(t, self.examples, seed=self.seed, data_dir=self.data_dir)
                for t in names}

    def describe(self) -> dict:
        """The settings an experiment's ``results.json`` records."""
        return dict(examples=int(self.examples), lam=self.lam, weight_decay=self.weight_decay,
                    seed=int(self.seed), fisher_samples=self.fisher_samples,
                    recipe=describe_recipe(self.recipe),
                    finetune_recipe=describe_recipe(self.finetune_recipe),
                    model=repr(self.model_fn))


_FIELDS = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                             annotation=f.type)
           for f in dataclasses.fields(FinetuneSettings)]


def with_settings(experiment):
    """``experiment(..., *, settings)`` as a function taking the
    :class:`FinetuneSettings` fields as keyword parameters instead.

    Its signature (``inspect.signature``, which gin reads) is the
    experiment's own parameters followed by the settings' fields; a call
    binds them, fills in the defaults and passes ``settings=
    FinetuneSettings(...)``.

    Example::

        @with_settings
        def my_experiment(output_dir=None, *, settings): ...
        my_experiment("runs/x", lam=0.3)   # settings.lam == 0.3
    """
    own = inspect.signature(experiment)
    if "settings" not in own.parameters:
        raise TypeError(f"{experiment.__name__} must take a keyword parameter 'settings'")
    signature = own.replace(
        parameters=[p for p in own.parameters.values() if p.name != "settings"] + _FIELDS)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        settings = FinetuneSettings(**{p.name: values.pop(p.name) for p in _FIELDS})
        return experiment(**values, settings=settings)

    # Not functools.wraps: gin and inspect follow __wrapped__ to the inner
    # signature, which has `settings` instead of the fields gin binds.
    for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(call, attribute, getattr(experiment, attribute))
    call.__signature__ = signature
    return call
