"""The reachability and ranking experiments' default recipe stops at the first step under the threshold.

`FinetuneSettings` (reachability, ranking) measures `C_beta` of models it
trains to the loss threshold and counts fine-tuning steps to it; like
`ComplexitySettings` (relabel, kramers) and their gin files, its default
recipe checks every step within `fine_check_factor` of the threshold
(issue 12 section 3). Reference: the same run checked after every step.
"""

import dataclasses
import pathlib
import re

import keras
import numpy as np
import pytest

from tfmeta import complexity as cx
from tfmeta.experiments.complexity_settings import (
    ComplexitySettings,
    FinetuneSettings,
    TrainSettings,
    TransferSettings,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bound_factor(gin_file):
    text = (REPO / "gin" / gin_file).read_text()
    return float(re.search(r"^\S*TrainingRecipe\.fine_check_factor = (\S+)", text, re.M).group(1))


def test_the_default_recipes_check_as_the_c_beta_experiments_gin_files_do():
    factors = {_bound_factor(name) for name in ("complexity_relabel.gin", "complexity_kramers.gin")}
    assert factors == {2.0}
    settings = FinetuneSettings(seed=3, weight_decay=1e-3)
    assert settings.recipe.fine_check_factor == settings.finetune_recipe.fine_check_factor == 2.0
    assert ComplexitySettings().recipe.fine_check_factor == 2.0
    # Otherwise the recipe is what it was: seed, weight decay, budgets.
    assert settings.recipe.seed == 3 and settings.finetune_recipe.steps == 10000
    assert settings.recipe.steps == 20000 and settings.recipe.eval_every == 10
    assert settings.recipe.optimizer().weight_decay == 2e-3


@pytest.mark.parametrize("settings,weight_decay,seed,factor", [
    (TrainSettings(), 5e-4, 0, None),
    (ComplexitySettings(weight_decay=1e-3), 1e-3, 0, 2.0),
    (TransferSettings(seed=3), 5e-4, 3, None),
    (FinetuneSettings(seed=3, weight_decay=1e-3), 1e-3, 3, 2.0),
], ids=["train", "complexity", "transfer", "finetune"])
def test_each_default_recipe_field_by_field(settings, weight_decay, seed, factor):
    """Every field of each class's default recipe, written out (SGD lr 0.1 decaying by 2 gamma)."""
    recipe = settings.recipe
    optimizer = recipe.optimizer
    assert (optimizer.func, optimizer.args, optimizer.keywords) == (
        cx.sgd, (), dict(learning_rate=0.1, weight_decay=2 * weight_decay))
    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name != "optimizer"}
    assert fields == dict(steps=20000, batch_size=32, loss_threshold=0.1, eval_every=10, eval_examples=4096,
                          seed=seed, from_logits=True, jit_compile=False, fine_check_factor=factor)
    if hasattr(settings, "finetune_recipe"):
        assert settings.finetune_recipe == dataclasses.replace(recipe, steps=10000)


def test_the_finetune_recipe_is_composed_not_restated():
    # ComplexitySettings' recipe (weight decay, the fine check) with TransferSettings' seed:
    # FinetuneSettings, which inherits both, defines no recipe of its own.
    assert "_default_recipe" not in vars(FinetuneSettings)


def test_default_fine_tuning_counts_steps_to_the_first_step_under_the_threshold():
    rng = np.random.default_rng(12)
    y = np.repeat([0, 1], 32).astype(np.int32)
    x = (np.where(y[:, None] == 0, -1.0, 1.0) + 0.5 * rng.normal(size=(64, 2))).astype(np.float32)
    keras.utils.set_random_seed(0)
    init = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    recipe = FinetuneSettings().finetune_recipe
    every_step = cx.train((x, y), dataclasses.replace(recipe, eval_every=1, fine_check_factor=None),
                          init=init)
    default = cx.train((x, y), recipe, init=init)
    coarse = cx.train((x, y), dataclasses.replace(recipe, fine_check_factor=None), init=init)
    first = next(step for step, loss in every_step.curve if loss <= recipe.loss_threshold)
    assert every_step.converged and default.converged and first % 10 != 0, first
    assert default.steps == first and default.resolution == 1
    assert coarse.steps == -(-first // 10) * 10  # the factor unset: the next check after it
