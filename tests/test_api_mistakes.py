"""A new user's mistakes with the Python API end in one line naming the fix, before any step.

Each case is a mistake that used to end in a raw TensorFlow traceback, a fit
that never ended, or a silently wrong number (the values before the fix are
in the test names' docstrings): labels outside the model's classes, an
endless task stream without `steps_per_epoch`, `validation_data`, a
fractional K; `finetune` given data the model cannot take; a Fisher of
probabilities read as logits; `export_initialization` given the MetaModel or
a path under a file; a seed that names no stream, learner arguments that
say something else, mapping keys naming no task. Nothing is trained or
written when they fail.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from tfmeta import complexity as cx
from tfmeta.finetune import Finetuner, finetune
from tfmeta.tasks.digits import digits_arrays, digits_tasks
from tfmeta.validation import ConfigError

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(units=5, activation=None):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"), keras.layers.Dense(units, activation=activation),
    ])


def meta(units=5, **options):
    model = tfmeta.MetaModel(mlp(units))
    model.compile(optimizer=keras.optimizers.SGD(0.1), inner_optimizer=keras.optimizers.SGD(0.1),
                  loss=SCE, learner=tfmeta.Reptile(), inner_steps=options.pop("inner_steps", 4),
                  **options)
    return model


@pytest.fixture(scope="module")
def stream():
    """Endless 5-way task batches of real digits: T = 2, K = 4, S = 2, B = 5."""
    pretrain, _ = digits_tasks(num_pretrain=8, num_heldout=1)
    return pretrain.as_dataset(tasks_per_batch=2, inner_steps=4, batch_size=5, steps_per_chunk=2)


@pytest.fixture(scope="module")
def digits():
    x, y = digits_arrays()
    return (x.astype("float32") / 255.0).reshape(-1, 8, 8, 1), y.astype("int32")


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _unchanged(model, before):
    return all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))


# ------------------------------------------------------------------ MetaModel


@pytest.mark.parametrize("vectorize, jit", [(False, False), (True, False), (False, True)],
                         ids=["copies", "batched", "xla"])
def test_stream_labels_outside_the_classes_name_the_head_size(stream, vectorize, jit):
    """Was: a 53-line InvalidArgumentError from SparseSoftmaxCrossEntropyWithLogits; under
    XLA (as on GPUs) no kernel checks the labels, and the tasks were only skipped as
    diverged (skipped_tasks 2 per meta-update, no reason given)."""
    model = meta(units=3, vectorize_tasks=vectorize, jit_compile=jit)
    assert model.inner_jit_compile is jit
    with pytest.raises(ConfigError) as error:
        model.fit(stream, steps_per_epoch=2, verbose=0)
    assert str(error.value).count("\n") == 0
    assert "has 3 outputs (classes 0..2): give the model's head at least 5 units" in str(error.value)
    assert int(model.meta_updates.numpy()) == int(model.skipped_tasks.numpy()) == 0


def test_one_hot_labels_with_a_sparse_loss_name_both_fixes(stream):
    """Was: the problem named, but not what to do about it."""
    one_hot = stream.map(lambda x, y: (x, tf.one_hot(y, 5)))
    model = meta()
    with pytest.raises(ConfigError, match=r"look one-hot: pass class ids \(np.argmax\(y, -1\)\) "
                                          r"or use keras.losses.CategoricalCrossentropy"):
        model.fit(one_hot, steps_per_epoch=2, verbose=0)
    assert not model.built


def test_array_labels_outside_the_classes_are_refused_before_any_step():
    rng = np.random.default_rng(0)
    x = rng.random((4, 2, 5, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 5, (4, 2, 5)).astype("int32")
    model = meta(units=3)
    with pytest.raises(ConfigError, match=r"labels range over 0\.\.4 but the model has 3 outputs"):
        model.fit(x, y, batch_size=2, steps_per_epoch=1, verbose=0)
    assert not model.built  # refused before the first step built anything
    # Keras batches arrays along the tasks: a batch_size that leaves a partial meta-batch
    # (which used to end in "Batch with drop_remainder=True") is refused, naming T.
    model = meta(units=5, inner_steps=2)
    for size in (None, 3):
        with pytest.raises(ConfigError, match=rf"batch_size={size}\): pass batch_size=T, a "
                                              r"divisor of the 4 tasks in x"):
            model.fit(x, y, batch_size=size, verbose=0)
    history = model.fit(x, y, batch_size=2, verbose=0)  # 2 meta-batches of 2 tasks, K = 2 = S
    assert history.history["meta_updates"] == [2.0]


def test_an_endless_stream_needs_steps_per_epoch(stream):
    """Was: fit(stream, epochs=2) never left epoch 1 (300 steps and counting)."""
    model = meta()
    with pytest.raises(ConfigError, match="endless stream .* steps_per_epoch=meta.steps_for"):
        model.fit(stream, epochs=2, verbose=0)
    for steps in (0, -6, 2.5):
        with pytest.raises(ConfigError, match=rf"steps_per_epoch={steps} must be an integer >= 1"):
            model.fit(stream, steps_per_epoch=steps, verbose=0)
    with pytest.raises(ConfigError, match="meta_updates=0 must be an integer >= 1"):
        model.steps_for(0, steps_per_chunk=2)
    assert not model.built
    # The advice works: 2 meta-updates of K = 4 in chunks of 2.
    history = model.fit(stream, steps_per_epoch=model.steps_for(2, steps_per_chunk=2), verbose=0)
    assert int(model.meta_updates.numpy()) == 2 and len(history.history["loss"]) == 1


def test_validation_data_and_a_fractional_k_are_refused_up_front(stream):
    """Was: NotImplementedError after the whole first epoch; inner_steps=2.5 ran as K = 2."""
    model = meta()
    with pytest.raises(ConfigError, match="does not take validation_data=: .*tfmeta.finetune"):
        model.fit(stream, steps_per_epoch=40, validation_data=stream, validation_steps=1, verbose=0)
    assert not model.built
    with pytest.raises(ConfigError, match=r"inner_steps \(K\) must be an integer >= 1, got 2\.5"):
        meta(inner_steps=2.5)


# ------------------------------------------------------------------ finetune


def test_finetune_refuses_data_the_model_cannot_take(digits):
    """Was: raw InvalidArgumentError / ValueError / ShuffleDataset errors, or Keras'
    flattened sizes (784 vs 64) instead of the shapes."""
    x, y = digits
    model = mlp(units=10)
    before = _weights(model)
    cases = [
        (dict(train_data=(x[:200], y[:200] % 10), test_data=(x[:50], y[:50] + 3)),
         r"test_data labels range over 3\.\.12 but the model has 10 outputs .*num_classes=13"),
        (dict(train_data=(x[:200], y[:100])), "train_data has 200 inputs but 100 labels"),
        (dict(train_data=(x[:0], y[:0])), "train_data has no examples"),
        (dict(train_data=tf.data.Dataset.from_tensor_slices((x, y))),
         r"yields single examples of shape \(8, 8, 1\), not batches: batch it first"),
        (dict(train_data=(x.reshape(-1, 64), y)),
         r"examples have shape \(64,\) but the model takes \(8, 8, 1\)"),
    ]
    for arguments, message in cases:
        with pytest.raises(ConfigError, match=message):
            finetune(model, steps=4, **arguments)
        with pytest.raises(ConfigError, match=message):
            Finetuner(steps=4)(model, **arguments)
    assert _unchanged(model, before)  # nothing was trained
    with pytest.raises(ConfigError, match=r"labels range over 0\.\.9 but the model has 5 outputs"):
        finetune(mlp(units=5), (x[:200], y[:200]), steps=4)
    # Right data still fine-tunes.
    result = finetune(model, (x[:200], y[:200]), (x[200:300], y[200:300]), steps=4)
    assert len(result.losses) == 4 and not _unchanged(model, before)


# ------------------------------------------------------------------ complexity


def test_fisher_refuses_outputs_that_are_not_the_scores_it_is_told(digits):
    """Was: a softmax model read as logits gave a Fisher trace 84x too small, silently."""
    x, y = digits[0][:64], digits[1][:64]
    probs = mlp(units=10, activation="softmax")
    with pytest.raises(ValueError, match="outputs probabilities .* pass from_logits=False"):
        cx.diagonal_fisher(probs, (x, y))
    with pytest.raises(ValueError, match="outputs probabilities .* pass from_logits=False"):
        cx.complexity(probs, (x, y), lam=0.1, weight_decay=5e-4)
    with pytest.raises(ValueError, match="outputs logits .* pass from_logits=True"):
        cx.diagonal_fisher(mlp(units=10), (x, y), from_logits=False)
    with pytest.raises(ValueError, match=r"outputs shape \(None, 1\), not \[batch, classes\] .*Dense\(2\)"):
        cx.diagonal_fisher(mlp(units=1, activation="sigmoid"), (x, y))
    # The same weights give the same Fisher as logits and as probabilities (exact expectation).
    logits = mlp(units=10)
    probs.set_weights(logits.get_weights())
    as_logits = cx.diagonal_fisher(logits, (x, y), exact=True).trace
    as_probs = cx.diagonal_fisher(probs, (x, y), exact=True, from_logits=False).trace
    assert as_probs == pytest.approx(as_logits, rel=1e-4)


# ------------------------------------------------------------------ export


def test_export_names_the_wrapper_and_a_file_in_the_way(tmp_path):
    model = meta()
    with pytest.raises(TypeError, match=r"got the MetaModel wrapper.*export_initialization\(meta.model"):
        tfmeta.export_initialization(model, tmp_path / "init")
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    with pytest.raises(FileExistsError, match="afile is a file, so .* cannot be a folder under it"):
        tfmeta.export_initialization(mlp(), blocker / "init")
    with pytest.raises(FileExistsError, match="afile is a file, not an export folder"):
        tfmeta.export_initialization(mlp(), blocker, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert blocker.read_text() == "mine"


def test_a_stream_built_for_another_k_is_refused(stream):
    """Was: silently wrong. With the stream's K = 4 and compile's K = 8, one
    trajectory ran two meta-batches' tasks ([1, 4] for two chunks, then [2, 0])."""
    for k in (8, 2):
        model = meta(inner_steps=k)
        with pytest.raises(ConfigError, match=rf"stream keeps .* for inner_steps=4 but compile has "
                                              rf"inner_steps={k}.*as_dataset\(inner_steps={k}"):
            model.fit(stream, steps_per_epoch=4, verbose=0)
        assert not model.built
    # The mark goes with any transformation (an unmarked stream is not checked).
    assert getattr(stream.map(lambda x, y: (x, y)), "tfmeta_inner_steps", None) is None
    model = meta(inner_steps=4)
    model.fit(stream, steps_per_epoch=2, verbose=0)
    assert int(model.meta_updates.numpy()) == 1


def test_integer_images_warn_once_unless_the_model_rescales_them(digits, caplog):
    """Was: silent. uint8 digits (0..255, as digits_arrays returns them) fine-tuned to a
    loss AUC of 970 against 1.9 for the same images in [0, 1], and gave a Fisher trace
    of 15242 against 14."""
    raw = (digits[0] * 255).round().astype("uint8")
    y = digits[1]
    for call in (
        lambda model: finetune(model, (raw[:200], y[:200]), steps=2),
        lambda model: cx.diagonal_fisher(model, (raw[:64], y[:64])),
    ):
        caplog.clear()
        model = mlp(units=10)
        call(model)
        call(model)  # the same model and input: no second warning
        warned = [r.getMessage() for r in caplog.records if r.name == "tfmeta"]
        assert len(warned) == 1, warned
        assert re.search(r"is uint8, and the model \(first layer 'flatten\w*'\) does not rescale "
                         r"it: .*keras\.layers\.Rescaling\(1 / 255\)", warned[0]), warned
        # A model that rescales its inputs itself, and float inputs, get no warning.
        caplog.clear()
        keras.utils.set_random_seed(0)
        call(keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255),
                               keras.layers.Flatten(), keras.layers.Dense(10)]))
        assert not [r for r in caplog.records if r.name == "tfmeta"]
    caplog.clear()
    finetune(mlp(units=10), (digits[0][:200], y[:200]), steps=2)
    assert not [r for r in caplog.records if r.name == "tfmeta"]


def test_meta_training_on_integer_images_warns(stream, caplog):
    """Was: silent; meta-training on uint8 digits logged a loss of 184448 against 1.6."""
    raw = stream.map(lambda x, y: (tf.cast(tf.round(x * 255), tf.uint8), y))
    meta().fit(raw, steps_per_epoch=2, verbose=0)
    warned = [r.getMessage() for r in caplog.records if r.name == "tfmeta"]
    assert len(warned) == 1 and warned[0].startswith("x is uint8, and the model"), warned


def test_task_ids_beyond_the_heads_name_num_heads():
    """Was: the right message, inside a 35-line InvalidArgumentError of assert_less."""
    pretrain, _ = digits_tasks(num_pretrain=8, num_heldout=1)
    stream = pretrain.as_dataset(tasks_per_batch=2, inner_steps=4, batch_size=5,
                                 steps_per_chunk=2, with_task_ids=True)
    model = tfmeta.MetaModel(mlp(5), heads=tfmeta.TaskHeads(3, 5))
    model.compile(optimizer=keras.optimizers.SGD(0.1), inner_optimizer=keras.optimizers.SGD(0.1),
                  loss=SCE, learner=tfmeta.Reptile(), inner_steps=4)
    with pytest.raises(ConfigError) as error:
        model.fit(stream, steps_per_epoch=8, verbose=0)
    assert str(error.value) == (
        "a task batch has task ids out of range: task_ids must be in 0..2 "
        "(TaskHeads(num_heads=3)): give every source task an index below num_heads.")


def test_endless_data_where_all_of_it_would_be_read_is_refused(digits):
    """Was: a hang (evaluate, or the complexity measures reading a repeated dataset
    into memory, 743 -> 801 MB in 9 s)."""
    x, y = digits
    endless = tf.data.Dataset.from_tensor_slices((x[:100], y[:100])).batch(10).repeat()
    with pytest.raises(ConfigError, match="test_data is an endless stream .* test_data.take"):
        finetune(mlp(units=10), (x[:100], y[:100]), endless, steps=2)
    with pytest.raises(ValueError, match=r"data is an endless dataset .* data.take\(n\)"):
        cx.complexity(mlp(units=10), endless, lam=0.1, weight_decay=5e-4)
    # A bounded number of examples from it is fine.
    assert cx.diagonal_fisher(mlp(units=10), endless, num_samples=30).num_examples == 30


def test_leap_needs_two_inner_steps():
    """Was: Leap with K = 1 meta-trained without error and never moved phi (K steps give
    K - 1 path increments, as in the authors' code)."""
    with pytest.raises(ConfigError, match=r"Leap needs inner_steps >= 2, got 1: .*never move phi"):
        tfmeta.MetaModel(mlp()).compile(
            optimizer="sgd", inner_optimizer="sgd", loss=SCE, learner=tfmeta.Leap(), inner_steps=1)
    meta(inner_steps=1)  # Reptile moves phi at K = 1


@pytest.mark.parametrize("field, value, message", [
    ("loss_threshold", 0.0, r"loss_threshold=0\.0 must be None or > 0: .*no run would converge"),
    ("steps", 0, r"steps=0 must be an integer >= 1"),
    ("eval_every", 0, r"eval_every=0 must be an integer >= 1"),
    ("batch_size", 2.5, r"batch_size=2\.5 must be an integer >= 1"),
    ("eval_examples", 0, r"eval_examples=0 must be an integer >= 1"),
    ("optimizer", keras.optimizers.SGD(0.1), r"must be a zero-argument factory .*lambda: keras"),
])
def test_a_training_recipe_refuses_values_no_run_could_use(field, value, message):
    """Was: a threshold of 0 made every run 'not converged', silently; eval_every=0 a
    ZeroDivisionError; an optimizer instance "'SGD' object is not callable" at the first run."""
    with pytest.raises(ValueError, match=message):
        cx.TrainingRecipe(**{field: value})
    assert cx.TrainingRecipe(loss_threshold=None).loss_threshold is None


def test_complexity_refuses_another_models_fisher(digits):
    """Was: silently used. The Fisher of a 128-unit MLP gave a 16-unit one's C = 2.5618
    (its own Fisher: 2.529): only the number of entries was compared."""
    x, y = digits[0][:64], digits[1][:64]

    def net(hidden):
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(10)])

    small, wide = net(16), net(128)
    other = cx.diagonal_fisher(wide, (x, y))
    with pytest.raises(ValueError, match=r"not this model's \(\(64, 128\) for variable 0 of shape "
                                         r"\(64, 16\)\): recompute it with diagonal_fisher"):
        cx.complexity(small, (x, y), lam=0.1, weight_decay=5e-4, fisher=other)
    own = cx.diagonal_fisher(small, (x, y))
    given = cx.complexity(small, (x, y), lam=0.1, weight_decay=5e-4, fisher=own).total
    assert given == pytest.approx(cx.complexity(small, (x, y), lam=0.1, weight_decay=5e-4).total)


def test_an_augmentation_factory_instead_of_an_augmentation_says_call_it():
    """Was: a 97-line OperatorNotAllowedInGraphError from tf.data's tracing (gin:
    `digits_tasks.augment = @random_affine` instead of `@random_affine()`)."""
    from tfmeta.tasks.augment import RandomAffine, random_affine

    for factory, name in ((random_affine, "random_affine"), (RandomAffine, "RandomAffine")):
        with pytest.raises(TypeError, match=rf"augment is {name} itself, not an augmentation: "
                                            rf"call it, augment={name}\(\) \(in gin, @{name}\(\)"):
            digits_tasks(num_pretrain=4, num_heldout=1, augment=factory)
        pretrain, _ = digits_tasks(num_pretrain=4, num_heldout=1)
        with pytest.raises(TypeError, match=rf"augment is {name} itself"):
            pretrain.as_dataset(tasks_per_batch=2, inner_steps=2, batch_size=5, augment=factory)
    with pytest.raises(TypeError, match="augment must be a callable"):
        digits_tasks(num_pretrain=4, num_heldout=1, augment="affine")
    digits_tasks(num_pretrain=4, num_heldout=1, augment=random_affine())  # the right call


def test_heldout_finetuning_checks_each_candidate_against_the_tasks():
    """Was: 80-, 34- and 52-line tracebacks (a 3-unit head on 5-way tasks, another input
    shape, the MetaModel wrapper), and a negative rate trained by gradient ascent."""
    from tfmeta.evaluation import finetune_every_task, heldout_finetuning

    _, heldout = digits_tasks(num_pretrain=4, num_heldout=2)
    cases = [
        (mlp(units=3), r"held-out tasks have 5 classes but the model has 3 outputs: .*"
                       r"num_classes=5\) or tfmeta.heads.with_new_head\(model, 5\)"),
        (keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(5)]),
         r"images have shape \(8, 8, 1\) but the model takes \(28, 28, 1\)"),
        (meta(), r"the candidate is the MetaModel wrapper: .*meta.model"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            heldout_finetuning(model, None, heldout, steps=2, batch_size=10)
    with pytest.raises(ValueError, match=r"finetune_every_task.learning_rate=-0.1 must be a "
                                         r"finite number > 0"):
        finetune_every_task(mlp(units=5), heldout, steps=2, learning_rate=-0.1, batch_size=10)
    assert len(finetune_every_task(mlp(units=5), heldout, steps=2, batch_size=10)) == 2


def test_random_affine_refuses_arguments_that_blank_or_misread_images():
    """Was: translation=2 left 77 % of the digits blank, and rotation='180' became
    (1.0, 8.0, 0.0), silently; rotation=(30,) failed later inside tf.data."""
    from tfmeta.tasks.augment import random_affine

    with pytest.raises(ValueError, match=r"translation=2 is a fraction of the image size .* \[0, 1\)"):
        random_affine(translation=2)
    for rotation in ("180", (30,), float("nan")):
        with pytest.raises(ValueError, match=r"rotation=.* must be a number or a \(low, high\) pair"):
            random_affine(rotation=rotation)
    affine = random_affine(rotation=30, translation=(0.1, 0.2), scale=1.0)
    assert (affine.rotation, affine.translation, affine.scale) == ((-30.0, 30.0), (0.1, 0.2), (1.0, 1.0))


def test_task_stream_counts_must_be_whole():
    """Was: int() made 2.7 tasks per batch 2 and 4.9 inner steps 4, silently."""
    pretrain, _ = digits_tasks(num_pretrain=4, num_heldout=1)
    for name, value in (("tasks_per_batch", 2.7), ("inner_steps", 4.9), ("batch_size", True),
                        ("steps_per_chunk", 0)):
        arguments = dict(tasks_per_batch=2, inner_steps=4, batch_size=5, steps_per_chunk=2)
        with pytest.raises(ConfigError, match=rf"{name}={value!r} must be an integer >= 1"):
            pretrain.as_dataset(**{**arguments, name: value})
    with pytest.raises(ConfigError, match=r"batch_size=2.5 must be an integer >= 1"):
        pretrain.finetune_data(0, batch_size=2.5)


def test_a_seed_must_name_one_stream():
    """Was: seed=None a raw int() TypeError in as_dataset and finetune_data, a new random
    family on every digits_tasks call, and seed=2.5 quietly stream 2."""
    pretrain, _ = digits_tasks(num_pretrain=4, num_heldout=1)
    arguments = dict(tasks_per_batch=2, inner_steps=4, batch_size=5)
    for seed in (None, 2.5, "0", True):
        message = rf"seed={re.escape(repr(seed))} must be an integer .* e\.g\. seed=0"
        with pytest.raises(ConfigError, match=message):
            pretrain.as_dataset(**arguments, seed=seed)
        with pytest.raises(ConfigError, match=message):
            pretrain.finetune_data(0, seed=seed)
        with pytest.raises(ConfigError, match=message):
            digits_tasks(num_pretrain=4, num_heldout=1, seed=seed)
        with pytest.raises(ConfigError, match=message):
            tfmeta.tasks.RotatedHimmelblau(seed=seed)
    # Any int64 is a stream, negative and NumPy integers included, and the same one each time.
    first = next(iter(pretrain.as_dataset(**arguments, seed=np.int64(-3))))[1].numpy()
    again = next(iter(pretrain.as_dataset(**arguments, seed=-3)))[1].numpy()
    np.testing.assert_array_equal(first, again)


def test_learner_arguments_are_what_they_say():
    """Was: CTS("reptile") or CTS(Reptile) accepted and failing at fit's trace, every=2.5
    quietly every 2 steps, and Leap(norm="false") quietly the path length (bool("false"))."""
    cts = tfmeta.ContinualTrajectoryShifting
    with pytest.raises(ConfigError, match=r"learner='reptile'\) needs a tfmeta meta-learner .*Reptile\(\)"):
        cts("reptile")
    with pytest.raises(ConfigError, match=r"instance: pass Reptile\(\)"):
        cts(tfmeta.Reptile)
    for every in (2.5, "2", 0):
        with pytest.raises(ConfigError, match=rf"every={re.escape(repr(every))} must be an integer >= 1"):
            cts(every=every)
    with pytest.raises(ConfigError, match=r"Leap\(norm=\.\.\.\) must be True or False, got 'false'"):
        tfmeta.Leap(norm="false")
    with pytest.raises(ConfigError, match=r"Leap\(loss=\.\.\.\) must be True or False, got 0"):
        tfmeta.Leap(loss=0)
    assert cts(tfmeta.FOMAML(), every=3).every == 3
    assert tfmeta.Leap(norm=np.bool_(False)).norm is False


def test_finetune_datas_train_stream_says_it_is_endless(digits):
    """Was: its cardinality unknown, so passing it as test_data hung evaluate instead of
    being refused like any other endless stream."""
    pretrain, _ = digits_tasks(num_pretrain=4, num_heldout=1)
    train = pretrain.finetune_data(0)
    assert int(train.cardinality()) == int(tf.data.INFINITE_CARDINALITY)
    one_pass = pretrain.finetune_data(0, repeat=False, batch_size=30)
    n = len(pretrain.task(0).x_train)
    assert int(one_pass.cardinality()) == -(-n // 30) == sum(1 for _ in one_pass)
    with pytest.raises(ConfigError, match="test_data is an endless stream"):
        finetune(mlp(), train, train, steps=2)
    with pytest.raises(ConfigError, match=r"repeat must be True or False, got 'no'"):
        pretrain.finetune_data(0, repeat="no")


def test_complexity_mappings_name_their_typos(digits):
    """Was: reachability_matrix ignored num_classes / label_spaces keys naming no task (a typo
    silently meant the default), rank_initializations({}) returned an empty ranking, and
    max_examples=0 ended in a raw error inside training."""
    x, y = digits
    tasks = {"low": (x[y < 5][:40], y[y < 5][:40]), "high": (x[y >= 5][:40], y[y >= 5][:40] - 5)}
    recipe = cx.TrainingRecipe(steps=5, eval_every=5, batch_size=8)
    with pytest.raises(ConfigError, match=r"num_classes names \['hihg'\] .* did you mean 'high'"):
        cx.reachability_matrix(tasks, lambda num_classes: mlp(num_classes), recipe, lam=0.1,
                               weight_decay=5e-4, heads="per_task", num_classes={"hihg": 5})
    with pytest.raises(ConfigError, match=r"label_spaces applies to heads='per_task' only"):
        cx.reachability_matrix(tasks, mlp, recipe, lam=0.1, weight_decay=5e-4,
                               label_spaces={"low": "digits", "high": "digits"})
    with pytest.raises(ConfigError, match=r"at least two candidates .*random_initialization"):
        cx.rank_initializations(tasks["low"], {}, recipe)
    with pytest.raises(ConfigError, match=r"candidates\['leap'\] is 'runs/leap', not a Keras model: .*load_initialization"):
        cx.rank_initializations(tasks["low"], {"scratch": mlp(), "leap": "runs/leap"}, recipe)
    with pytest.raises(ConfigError, match=r"sources names \['scrach'\] but the candidates are"):
        cx.rank_initializations(tasks["low"], {"scratch": mlp(), "other": mlp()}, recipe,
                                predictor="distance", sources={"scrach": tasks["low"]},
                                lam=0.1, weight_decay=5e-4)
    with pytest.raises(ConfigError, match=r"max_examples=0 must be an integer >= 1: .*or None"):
        cx.static_distance(tasks["low"], tasks["high"], recipe, model_fn=mlp, lam=0.1,
                           weight_decay=5e-4, max_examples=0)


def test_prepare_datasets_touches_nothing_on_a_wrong_folder(tmp_path, archive_dir):
    """Was: a data_dir that is (or is under) a file ended in a raw FileExistsError /
    NotADirectoryError, and a wrong archive folder created data_dir and its lock file."""
    from tfmeta.prepare import prepare_datasets

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"data_dir .*a_file is a file: pass a folder"):
        prepare_datasets(archive_dir, data_dir=blocker, names=["mnist"])
    with pytest.raises(NotADirectoryError, match=r"data_dir .*sub is under the file .*a_file"):
        prepare_datasets(archive_dir, data_dir=blocker / "sub", names=["mnist"])
    with pytest.raises(FileNotFoundError, match=r"archive folder .*missing does not exist"):
        prepare_datasets(tmp_path / "missing", data_dir=tmp_path / "data", names=["mnist"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ------------------------------------------------ the second audit (2026-12-04)


def test_finetune_refuses_a_loss_optimizer_or_data_it_would_misread(digits):
    """Was: the loss name on a logits head (it means probabilities) fine-tuned at a loss
    stuck near ln 5 and a softmax head under the default loss got only Keras' warning,
    both with plausible-looking curves; the loss class trained on garbage (7.7 vs 1.6);
    SGD(-0.1) ran gradient ascent (1.6 -> 435); mse, batch_size=0, inputs without labels,
    an empty split and seed=1.5 ended in raw TensorFlow errors or a KeyError."""
    _, held = digits_tasks(num_pretrain=4, num_heldout=1)
    train, test = held.finetune_data(0), held.finetune_data(0, "test")
    x, y = digits
    sce = keras.losses.SparseCategoricalCrossentropy
    mistakes = [
        (dict(loss="sparse_categorical_crossentropy"),
         r"outputs logits .* from_logits=False reads them as probabilities: pass loss=keras\.losses\."
         r"SparseCategoricalCrossentropy\(from_logits=True\)"),
        (dict(loss="mse"), r"integer class indices .* mean_squared_error compares them elementwise"),
        (dict(loss=sce), r"loss=SparseCategoricalCrossentropy is the class, not a loss: call it"),
        (dict(loss="sparse_categorical_crossentrpy"), r"did you mean 'sparse_categorical_crossentropy'"),
        (dict(optimizer=keras.optimizers.SGD(-0.1)), r"learning rate -0\.1\d*; it must be a finite number > 0"),
        (dict(train_data=(x[:50], y[:50] % 5), batch_size=0), r"batch_size=0 must be an integer >= 1"),
        (dict(train_data=(x[:50], y[:50] % 5), seed=1.5), r"seed=1\.5 must be an integer"),
        (dict(train_data=tf.data.Dataset.from_tensor_slices(x[:50]).batch(5)),
         r"train_data yields inputs only, not \(x, y\) batches"),
        (dict(train_data=train.take(0)), r"train_data yields no batches"),
        (dict(test_data=test.take(0)), r"test_data yields no batches"),
    ]
    for change, message in mistakes:
        arguments = dict(train_data=train, test_data=None, steps=3) | change
        model = mlp()
        before = _weights(model)
        with pytest.raises(ConfigError, match=message):
            finetune(model, **arguments)
        assert all(np.array_equal(a, b) for a, b in zip(before, _weights(model)))
    with pytest.raises(ConfigError, match=r"outputs probabilities .* pass loss=keras\.losses\."
                                          r"SparseCategoricalCrossentropy\(from_logits=False\)"):
        finetune(mlp(activation="softmax"), train, steps=3)
    with pytest.raises(ConfigError, match=r"Finetuner needs a built Keras model.*keras\.Input"):
        Finetuner(steps=3)(keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(5)]), train)
    with pytest.raises(ConfigError, match=r"batch_size=2\.5 must be an integer >= 1"):
        Finetuner(steps=3, batch_size=2.5)
    # What they should have been: the loss name fits probabilities; the same numbers both ways.
    finetune(mlp(activation="softmax"), train, steps=3, loss="sparse_categorical_crossentropy")
    assert finetune(mlp(), train, test, steps=3).loss_auc == Finetuner(steps=3)(mlp(), train, test).loss_auc


def test_meta_compile_refuses_what_it_would_ignore_or_fail_on(stream):
    """Was: metrics= broke fit in Keras' result() ("metric has not yet been built"),
    loss_weights= and reduction="sum" were ignored or scaled the inner step by B, the
    loss name on logits meta-trained on a loss of 9.1 instead of 1.7 (wrong meta-gradients),
    steps_per_execution=-1 trained nothing and returned an empty History, a compile after
    fit failed in the inner optimizer, and fit / steps_for before compile raised
    AttributeErrors."""
    for options, message in [
        (dict(metrics=["accuracy"]), r"does not take metrics=: .*by fine-tuning"),
        (dict(loss_weights=[2.0]), r"does not take loss_weights="),
        (dict(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")),
         r"reduction='sum': each inner step needs the batch mean"),
        (dict(steps_per_execution=-1), r"steps_per_execution=-1 must be an integer >= 1"),
    ]:
        loss = options.pop("loss", SCE)
        with pytest.raises(ConfigError, match=message):
            tfmeta.MetaModel(mlp()).compile(optimizer="sgd", inner_optimizer="sgd", loss=loss,
                                            learner=tfmeta.Reptile(), inner_steps=4, **options)
    named = tfmeta.MetaModel(mlp())
    named.compile(optimizer="sgd", inner_optimizer="sgd", loss="sparse_categorical_crossentropy",
                  learner=tfmeta.Reptile(), inner_steps=4)
    with pytest.raises(ConfigError, match=r"outputs logits .* compile with loss=keras\.losses\."
                                          r"SparseCategoricalCrossentropy\(from_logits=True\)"):
        named.fit(stream, steps_per_epoch=2, verbose=0)
    with pytest.raises(ConfigError, match=r"Call MetaModel\.compile\(\.\.\.\) before fitting"):
        tfmeta.MetaModel(mlp()).fit(stream, steps_per_epoch=2)
    with pytest.raises(ConfigError, match=r"Call MetaModel\.compile\(\.\.\.\) before steps_for"):
        tfmeta.MetaModel(mlp()).steps_for(2, steps_per_chunk=2)
    trained = meta()
    trained.fit(stream, steps_per_epoch=2, verbose=0)
    with pytest.raises(ConfigError, match=r"already built by fit .* tfmeta\.MetaModel\(meta\.model\)"):
        trained.compile(optimizer="sgd", inner_optimizer="sgd", loss=SCE, learner=tfmeta.Reptile(),
                        inner_steps=4)


def test_meta_fit_refuses_epochs_and_callbacks_that_would_lose_work(stream, tmp_path):
    """Was: initial_epoch >= epochs (and epochs=0) returned an empty History silently; a
    bare callback (not in a list) dropped the DivergenceGuard, so a diverged run ended
    "successfully" with loss NaN; ModelCheckpoint and save failed in Keras' serializer,
    the former after the first epoch's work."""
    with pytest.raises(ConfigError, match=r"epochs=2 with initial_epoch=2 would run no epoch: .*epochs=3"):
        meta().fit(stream, steps_per_epoch=2, initial_epoch=2, epochs=2)
    with pytest.raises(ConfigError, match=r"epochs=0 must be an integer >= 1"):
        meta().fit(stream, steps_per_epoch=2, epochs=0)
    diverging = tfmeta.MetaModel(mlp())
    diverging.compile(optimizer="sgd", inner_optimizer=keras.optimizers.SGD(1e30), loss=SCE,
                      learner=tfmeta.Reptile(), inner_steps=4)
    with pytest.raises(tfmeta.divergence.DivergenceError):
        diverging.fit(stream, steps_per_epoch=2, callbacks=keras.callbacks.History(), verbose=0)
    model = meta()
    with pytest.raises(ConfigError, match=r"ModelCheckpoint would save the whole MetaModel.*MetaCheckpoint"):
        model.fit(stream, steps_per_epoch=2, callbacks=[keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))])
    with pytest.raises(ConfigError, match=r"not saved as a whole .*export_initialization\(meta\.model"):
        model.save(tmp_path / "m.keras")
    assert not model.built and not list(tmp_path.iterdir())  # nothing trained, nothing written
    # weights-only checkpoints are Keras' own and work
    history = model.fit(stream, steps_per_epoch=2, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(str(tmp_path / "m.weights.h5"), save_weights_only=True)])
    assert history.history["meta_updates"] == [1.0] and (tmp_path / "m.weights.h5").is_file()


def test_evaluation_names_a_pair_of_families_a_path_and_swapped_arguments():
    """Was: AttributeErrors ('tuple' object has no attribute 'num_tasks', 'str' object has
    no attribute 'get_build_config'), and seed=None passed the settings check tools/train.py
    runs before training, to fail after it."""
    from tfmeta.evaluation import heldout_finetuning

    pair = digits_tasks(num_pretrain=4, num_heldout=1)
    held = pair[1]
    with pytest.raises(ConfigError, match=r"\(pretrain, heldout\) pair .* pass the held-out one"):
        heldout_finetuning(mlp(), None, pair, steps=3)
    with pytest.raises(ConfigError, match=r"is a path: load it first, tfmeta\.load_initialization"):
        heldout_finetuning("runs/init", None, held, steps=3)
    with pytest.raises(ConfigError, match=r"must be a Keras model, got ClassificationTasks .*order"):
        heldout_finetuning(held, mlp(), held, steps=3)
    with pytest.raises(ConfigError, match=r"heldout_finetuning\.seed=None must be an integer"):
        heldout_finetuning(None, None, held, seed=None)
    with pytest.raises(ValueError, match=r"learning_rate=True must be a finite number > 0"):
        heldout_finetuning(None, None, held, learning_rate=True)


def test_flags_indices_and_counts_are_what_they_say(tmp_path):
    """Was: values that bool() or int() turned into something else, silently:
    export_initialization(overwrite="no") replaced an export, Schedule(reset_optimizer="no")
    and CTS(hard_reset="false") reset, ExcludeHeads("23") excluded parameters 2 and 3 and
    (2.7,) parameter 2, MetaCheckpoint(every_steps=2.5) saved every 2 steps; NaN metadata
    wrote an export whose tfmeta.json no JSON reader accepts; heads=8, TaskHeads(seed=None)
    and plot_curves([result]) ended in AttributeErrors or TypeErrors."""
    from tfmeta.checkpoint import MetaCheckpoint
    from tfmeta.finetune import FinetuneResult, plot_curves
    from tfmeta.learners import ExcludeHeads, Schedule

    export = tfmeta.export_initialization(mlp(), tmp_path / "init")
    with pytest.raises(ConfigError, match=r"overwrite must be True or False, got 'no'"):
        tfmeta.export_initialization(mlp(), export, overwrite="no")
    with pytest.raises(TypeError, match=r"metadata must be a dict"):
        tfmeta.export_initialization(mlp(), tmp_path / "other", metadata=[1, 2])
    with pytest.raises(TypeError, match=r"metadata must be JSON-serializable .*finite"):
        tfmeta.export_initialization(mlp(), tmp_path / "other", metadata={"lr": float("nan")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]
    with pytest.raises(ConfigError, match=r"reset_optimizer=\.\.\.\) must be True or False, got 'no'"):
        Schedule(reset_optimizer="no")
    assert Schedule(np.int64(2), "shift").update_every == 2
    with pytest.raises(ConfigError, match=r"hard_reset=\.\.\.\) must be True or False"):
        tfmeta.ContinualTrajectoryShifting(hard_reset="false")
    for indices in ("23", (2.7,), 2):
        with pytest.raises(ConfigError, match=r"head_indices, the positions .* as integers"):
            ExcludeHeads(tfmeta.Reptile(), indices)
    assert ExcludeHeads(tfmeta.Reptile(), [np.int64(3), 2]).head_indices == (2, 3)
    with pytest.raises(ConfigError, match=r"every_steps=2\.5 must be an integer >= 1"):
        MetaCheckpoint(tmp_path / "ckpt", every_steps=2.5)
    with pytest.raises(ConfigError, match=r"keep=1\.9 must be an integer >= 1"):
        MetaCheckpoint(tmp_path / "ckpt", keep=1.9)
    with pytest.raises(ConfigError, match=r"heads=8 must be a TaskHeads instance"):
        tfmeta.MetaModel(mlp(), heads=8)
    with pytest.raises(ConfigError, match=r"call it, heads=tfmeta\.TaskHeads\(num_tasks\)"):
        tfmeta.MetaModel(mlp(), heads=tfmeta.TaskHeads)
    with pytest.raises(ConfigError, match=r"seed=None must be an integer"):
        tfmeta.TaskHeads(8, seed=None)
    result = FinetuneResult(losses=[1.0, 0.5], errors=[0.5, 0.25], loss_auc=0.75, error_auc=0.375)
    with pytest.raises(ConfigError, match=r"dict from a legend label to a FinetuneResult"):
        plot_curves([result], tmp_path / "curves.png")
    with pytest.raises(ConfigError, match=r"writes a PNG: give the path a \.png suffix"):
        plot_curves({"a": result}, tmp_path / "curves.pdf")
    assert plot_curves({"a": result}, tmp_path / "curves.png").is_file()


def test_multitask_model_refuses_what_it_cannot_train_on():
    """Was: num_classes=5 a raw "'int' object is not iterable", a stream without task ids
    "None values not supported", a multi-step stream a reshape error, compile(loss=...)
    silently ignored, evaluate and predict an OperatorNotAllowedInGraphError."""
    from tfmeta.multitask import MultiTaskModel

    pretrain, _ = digits_tasks(num_pretrain=3, num_heldout=1)
    with pytest.raises(ConfigError, match=r"num_classes=5\) needs one whole class count per source"):
        MultiTaskModel(mlp(), num_classes=5)
    model = MultiTaskModel(mlp(), num_classes=[5] * 3)
    with pytest.raises(ConfigError, match=r"takes no loss= or metrics="):
        model.compile(optimizer="sgd", loss="mse")
    model.compile(optimizer="sgd")
    arguments = dict(tasks_per_batch=3, batch_size=5)
    for stream, message in [
        (pretrain.as_dataset(**arguments, inner_steps=1), r"needs \(x, y, task_ids\) task batches"),
        (pretrain.as_dataset(**arguments, inner_steps=2, steps_per_chunk=2, with_task_ids=True),
         r"one step per task and batch, got task batches of 2 steps"),
    ]:
        with pytest.raises(ConfigError, match=message):
            model.fit(stream, steps_per_epoch=2, verbose=0)
    ok = pretrain.as_dataset(**arguments, inner_steps=1, with_task_ids=True)
    assert len(model.fit(ok, steps_per_epoch=2, verbose=0).history["loss"]) == 1
    with pytest.raises(ConfigError, match=r"trains only: evaluate the shared body by fine-tuning"):
        model.evaluate(ok, steps=1, verbose=0)


def test_a_checkpoint_of_another_k_or_learner_is_refused(stream, tmp_path):
    """Was: restored silently (the shapes match): a K = 4 checkpoint restored into a K = 8
    run kept its trajectory length 4 and made 2 meta-updates where a K = 8 run makes 1; a
    Reptile checkpoint restored into CTS ran on as CTS."""
    from tfmeta.checkpoint import IncompatibleCheckpointError, MetaCheckpoint

    model = meta()
    model.fit(stream, steps_per_epoch=4, callbacks=[MetaCheckpoint(tmp_path, every_steps=2)], verbose=0)
    shape = (2, 2, 5, 8, 8, 1)
    with pytest.raises(IncompatibleCheckpointError, match=r"written with inner_steps=4, this run has inner_steps=8"):
        MetaCheckpoint(tmp_path).restore(meta(inner_steps=8), shape)
    cts = tfmeta.MetaModel(mlp())
    cts.compile(optimizer="sgd", inner_optimizer="sgd", loss=SCE, inner_steps=4,
                learner=tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile(), every=2))
    with pytest.raises(IncompatibleCheckpointError, match=r"written with learner=\{'class': 'Reptile'\}"):
        MetaCheckpoint(tmp_path).restore(cts, shape)
    assert MetaCheckpoint(tmp_path).restore(meta(), shape) == 4  # the same settings resume


def test_heads_left_out_where_they_can_be_and_checkpoints_in_their_folder(tmp_path):
    """Was: CTS(ExcludeHeads(...)) moved the heads it promised to keep (the outer step
    reads only the outermost learner); head_indices past the model's variables excluded
    nothing, silently, and all of them an IndexError; a MetaCheckpoint pointed at one
    checkpoint started a fresh run inside it, and at a file a FileExistsError mid-fit."""
    from tfmeta.checkpoint import CheckpointError, MetaCheckpoint
    from tfmeta.learners import ExcludeHeads

    with pytest.raises(ConfigError, match=r"cannot wrap ExcludeHeads .*ExcludeHeads\(ContinualTrajectoryShifting"):
        tfmeta.ContinualTrajectoryShifting(ExcludeHeads(tfmeta.Reptile(), (2, 3)), every=2)
    for indices in ((10, 11), (0, 1, 2, 3)):
        with pytest.raises(ConfigError, match=r"must name some, not all, of the model's 4 trainable"):
            tfmeta.MetaModel(mlp()).compile(optimizer="sgd", inner_optimizer="sgd", loss=SCE,
                                            learner=ExcludeHeads(tfmeta.Reptile(), indices), inner_steps=4)
    (tmp_path / "ckpt-000000006").mkdir()
    (tmp_path / "ckpt-000000006" / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"is one checkpoint, not a checkpoint folder"):
        MetaCheckpoint(tmp_path / "ckpt-000000006")
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=r"checkpoint folder .*file is a file"):
        MetaCheckpoint(tmp_path / "file")
