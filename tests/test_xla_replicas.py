"""XLA per replica: each replica's chunk of inner steps is one XLA computation.

`MetaModel.compile(jit_compile=True)` compiles `InnerLoop.run` (the chunk of
S inner steps of the replica's tasks, on tensors) with XLA inside the replica
context; the variable reads and writes, the all-reduce and the outer update
stay outside, so it works with any number of replicas. The runs use two
logical CPU devices, configured before TensorFlow starts, so they happen in
two subprocesses run side by side, each with half of the runs (this file run
as a script, with test_distribute's helpers).

What is shown, on real digit tasks (`tfmeta.tasks.digits`) with a small
convnet (Conv2D, BatchNorm: float state, and in the dropout runs Dropout:
seed state):
- without dropout, 2 replicas with XLA give the phi, BatchNorm statistics
  and task states of 1 replica without XLA (to 1e-5) for Leap, Reptile,
  FOMAML and CTS over two trajectories (with `steps_per_execution=2` and
  `inner_unroll=2`), and with `vectorize_tasks=True` (a Dense model);
- with dropout, 2 replicas with XLA give the phi of 1 replica with XLA (to
  1e-5). XLA draws other dropout masks than TensorFlow's CPU kernels
  (stateless random ops use another bit generator under XLA, even with
  `alg="philox"`), so with dropout XLA's phi differs from the phi without
  XLA: the test checks that it does, which XLA silently off could not pass;
- the convnet's tasks as one computation (`vectorize_tasks="auto"`, each
  replica's tasks in 2 shards, `task_shards=2`) on 2 replicas give the phi
  of the tasks as copies on 1 (Reptile);
- the inner loop is a `tf.function` traced once per replica, and its XLA
  HLO can be read (`experimental_get_compiler_ir`);
- a task that diverges (NaN inputs, in Leap's runs) is left out of the
  meta-update under XLA per replica as without XLA (same phi, one skipped
  task);
- a run checkpointed after one trajectory (and cut off there) and resumed
  under 2 replicas with XLA ends where the uninterrupted one does;
- `jit_compile="auto"` gives no XLA on CPU, and bad settings fail naming
  the fix.
"""

import functools
import json
import sys

import numpy as np
import pytest

from test_distribute import _collect, _start, assert_same

T, K, S = 4, 4, 2  # tasks, inner steps, steps per chunk
CHUNKS = 2 * K // S  # two trajectories: 2 meta-updates (CTS every=S: 4)
LEARNERS = ("leap", "reptile", "fomaml", "cts")
TWO_XLA = dict(steps_per_execution=2, inner_unroll=2)  # options of the 2-replica XLA runs


@functools.lru_cache(maxsize=None)
def task_chunks():
    """CHUNKS chunks of T five-way digit tasks ([T, S, 5, 8, 8, 1]), as NumPy."""
    from tfmeta.tasks import digits_tasks

    pretrain, _ = digits_tasks(num_pretrain=8, num_heldout=1)
    stream = pretrain.as_dataset(tasks_per_batch=T, inner_steps=K, batch_size=5,
                                 steps_per_chunk=S, seed=3, augment=False)
    chunks = list(stream.take(CHUNKS).as_numpy_iterator())
    return np.stack([x for x, _ in chunks]), np.stack([y for _, y in chunks])


def make_model(dropout, conv=True):
    """Conv2D (or Dense), BatchNorm, ReLU, [Dropout], Dense; fixed weights."""
    import keras

    # No bias before BatchNorm, which cancels it: its gradient would be
    # rounding noise only, and the comparison would measure that noise.
    layers = [keras.Input((8, 8, 1))]
    if conv:
        layers += [keras.layers.Conv2D(4, 3, padding="same", use_bias=False), keras.layers.Flatten()]
    else:
        layers += [keras.layers.Flatten(), keras.layers.Dense(16, use_bias=False)]
    layers += [keras.layers.BatchNormalization(momentum=0.8), keras.layers.ReLU()]
    if dropout:
        layers.append(keras.layers.Dropout(0.3, seed=7))
    layers.append(keras.layers.Dense(5))
    model = keras.Sequential(layers)
    rng = np.random.default_rng(1)
    for variable in model.weights:  # kernels from a fixed RNG (LeCun scale), the rest as built
        if variable.path.endswith("kernel"):
            fan_in = np.prod(variable.shape[:-1])
            variable.assign(rng.normal(0, fan_in ** -0.5, variable.shape).astype("float32"))
    return model


def make_learner(name):
    import tfmeta

    return {
        "leap": tfmeta.Leap,
        "reptile": tfmeta.Reptile,
        "fomaml": tfmeta.FOMAML,
        "cts": lambda: tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile(), every=S),
    }[name]()


def compile_meta(strategy, learner, jit_compile, dropout=False, conv=True, **options):
    import keras

    import tfmeta

    with strategy.scope():
        meta = tfmeta.MetaModel(make_model(dropout, conv))
        # A linear outer rule: Adam would turn rounding-level differences of
        # near-zero meta-gradient entries into differences of its step size.
        meta.compile(
            optimizer=keras.optimizers.SGD(0.5, momentum=0.5),
            inner_optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            learner=make_learner(learner), inner_steps=K, jit_compile=jit_compile,
            **options,
        )
    return meta


def results(meta, strategy):
    def tasks(variable):  # every task's state, replicas concatenated
        parts = strategy.experimental_local_results(variable.value)
        return np.concatenate([p.numpy() for p in parts]).tolist()

    model = meta.model
    return {
        "phi": [v.numpy().tolist() for v in model.trainable_variables],
        "state": [v.numpy().tolist() for v in model.non_trainable_variables],
        "task_params": [tasks(v) for v in meta.task_params],
        "meta_updates": int(meta.meta_updates.numpy()),
        "skipped_tasks": int(meta.skipped_tasks.numpy()),
        "xla": bool(meta.inner_jit_compile),
        "batched": meta.inner_loop._batched is not None,
    }


def meta_train(strategy, learner, jit_compile, chunks=(0, CHUNKS), meta=None, nan_task=None,
               callbacks=None, **options):
    """Meta-train from the fixed phi on chunks [first, last) of the digit tasks.

    `nan_task`: that task's inputs are NaN in the first chunk (it diverges).
    """
    import tensorflow as tf

    x, y = task_chunks()
    if nan_task is not None:
        x = x.copy()
        x[0, nan_task] = np.nan
    meta = meta or compile_meta(strategy, learner, jit_compile, **options)
    first, last = chunks
    meta.fit(tf.data.Dataset.from_tensor_slices((x[first:last], y[first:last])), callbacks=callbacks,
             verbose=0)
    out = results(meta, strategy)
    run = meta.inner_loop.run
    function = isinstance(run, tf.types.experimental.PolymorphicFunction)
    out["inner_loop"] = {
        "function": function, "traces": run.experimental_get_tracing_count() if function else 0,
    }
    return out


# --------------------------------------------------------------------------
# the subprocess: 2 logical CPUs


def _main(part):
    """One half of the runs (`part` 0 or 1): the fixture runs both halves side by side."""
    from tfmeta import distribute

    devices = distribute.use_logical_cpus(2)
    import tensorflow as tf

    one = tf.distribute.get_strategy()
    two = distribute.get_strategy("mirrored", devices)
    out = {"replicas": two.num_replicas_in_sync}
    if part == "0":
        for learner in ("leap", "reptile"):
            # Leap's runs: a task of replica 1 diverges in the first trajectory
            nan = {"nan_task": T - 1} if learner == "leap" else {}
            out[learner] = {
                "reference": meta_train(one, learner, False, **nan),
                "two_xla": meta_train(two, learner, True, **TWO_XLA, **nan),
            }
        # vectorize_tasks needs a model tf.vectorized_map batches: no conv, no dropout
        out["vectorized"] = {
            "reference": meta_train(one, "reptile", False, conv=False),
            "two_xla": meta_train(two, "reptile", True, conv=False, vectorize_tasks=True),
        }
        # the convnet's tasks as one computation (tfmeta.task_batched), 2 replicas,
        # each replica's 2 tasks in 2 shards, against Reptile's reference above
        # (the tasks as copies)
        out["batched"] = {
            "reference": out["reptile"]["reference"],
            "two": meta_train(two, "reptile", False, vectorize_tasks="auto", task_shards=2),
        }
        out["dropout"] = {"one": meta_train(one, "leap", False, dropout=True)}
    else:
        out["fomaml"] = {
            "reference": meta_train(one, "fomaml", False),
            "two_xla": meta_train(two, "fomaml", True, **TWO_XLA),
        }
        out["cts"], out["resumed"] = _straight_and_resumed(one, two)
        one_xla = compile_meta(one, "leap", True, dropout=True)
        out["dropout"] = {
            "one_xla": meta_train(one, "leap", True, meta=one_xla),
            "two_xla": meta_train(two, "leap", True, dropout=True),
        }
        out["hlo"] = _hlo(one_xla)
        # Leap's diverging task again, the tasks as one computation under XLA
        out["batched_nan"] = meta_train(
            one, "leap", True, nan_task=T - 1, vectorize_tasks="auto", inner_unroll=2
        )
    print("RESULT " + json.dumps(out))


def _straight_and_resumed(one, two):
    """CTS's reference and 2-replica XLA run, the latter checkpointed after one
    trajectory; that checkpoint restored into a new MetaModel and run to the end."""
    import shutil
    import tempfile

    from tfmeta.checkpoint import MetaCheckpoint, list_checkpoints

    half = CHUNKS // 2
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = MetaCheckpoint(directory, every_steps=half)
        straight = {
            "reference": meta_train(one, "cts", False),
            "two_xla": meta_train(two, "cts", True, callbacks=[checkpoint], **TWO_XLA),
        }
        saved = dict(list_checkpoints(directory))
        assert sorted(saved) == [half, CHUNKS], saved
        shutil.rmtree(saved[CHUNKS])  # as if killed before the last checkpoint
        second = compile_meta(two, "cts", True, **TWO_XLA)
        shape = (T // two.num_replicas_in_sync, S, 5, 8, 8, 1)
        done = MetaCheckpoint(directory).restore(second, shape)
        assert done == half, done
        return straight, meta_train(two, "cts", True, chunks=(done, CHUNKS), meta=second)


def _hlo(meta):
    """The compiled inner loop's XLA HLO, from its own inputs (one replica)."""
    import tensorflow as tf

    x, y = task_chunks()
    tasks = meta.task_state.read(restart=tf.constant(True), first=0)
    hlo = meta.inner_loop.run.experimental_get_compiler_ir(
        tasks, tf.constant(x[0]), tf.constant(y[0]), tf.constant(0)
    )(stage="hlo")
    return {"has_while": "while" in hlo, "has_convolution": "convolution" in hlo}


# --------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def runs():
    # two subprocesses side by side (tracing and XLA compiles mostly use one core each)
    halves = _collect(_start([[__file__, "replicas", part] for part in "01"], [{}, {}]), timeout=900)
    assert all(isinstance(half, dict) for half in halves), halves
    dropout = {**halves[0].pop("dropout"), **halves[1].pop("dropout")}
    return {**halves[0], **halves[1], "dropout": dropout}


def _initial_phi():
    return [v.numpy() for v in make_model(dropout=False).trainable_variables]


def _moved(run):
    return max(np.max(np.abs(np.subtract(p, s))) for p, s in zip(run["phi"], _initial_phi()))


def assert_same_run(actual, expected):
    assert actual["meta_updates"] == expected["meta_updates"]
    assert_same(actual["phi"], expected["phi"], "phi")
    # BatchNorm moving statistics (the mean over all tasks) and the seed state
    assert_same(actual["state"], expected["state"], "non-trainable state")
    # each replica kept its own tasks: together they are the tasks of 1 replica
    assert_same(actual["task_params"], expected["task_params"], "task parameters")


@pytest.mark.parametrize("learner", LEARNERS)
def test_two_replicas_with_xla_give_the_phi_of_one_without(runs, learner):
    assert runs["replicas"] == 2
    reference, two = runs[learner]["reference"], runs[learner]["two_xla"]
    assert reference["xla"] is False and two["xla"] is True
    assert two["skipped_tasks"] == reference["skipped_tasks"]
    assert reference["meta_updates"] == (CHUNKS if learner == "cts" else CHUNKS * S // K)
    assert_same_run(two, reference)
    assert _moved(reference) > 1e-3  # phi did move: the comparison is not vacuous
    # the inner loop was one function, traced for each of the 2 replicas (that
    # it runs as XLA: test_dropout_under_xla_...)
    assert two["inner_loop"] == {"function": True, "traces": 2}
    assert reference["inner_loop"] == {"function": False, "traces": 0}


def test_vectorized_tasks_under_xla_per_replica(runs):
    run = runs["vectorized"]
    assert run["two_xla"]["inner_loop"] == {"function": True, "traces": 2}
    assert_same_run(run["two_xla"], run["reference"])


def test_convnet_tasks_as_one_computation_on_two_replicas_give_the_phi_of_copies(runs):
    run = runs["batched"]
    assert run["two"]["batched"] and not run["reference"]["batched"]
    assert_same_run(run["two"], run["reference"])


def test_dropout_under_xla_matches_across_replicas_and_xla_is_really_on(runs):
    """XLA's random bits differ from TensorFlow's kernels: with dropout, XLA on
    1 and 2 replicas agree with each other (per-task streams from global task
    indices), and both differ from no XLA, so XLA did run the inner loop."""
    run = runs["dropout"]
    assert_same_run(run["two_xla"], run["one_xla"])
    assert run["one_xla"]["inner_loop"] == {"function": True, "traces": 1}
    difference = max(
        np.max(np.abs(np.subtract(a, b))) for a, b in zip(run["one_xla"]["phi"], run["one"]["phi"])
    )
    assert difference > 1e-3  # other dropout masks: XLA ran


def test_a_diverged_task_is_left_out_under_xla_per_replica(runs):
    run = runs["leap"]  # same phi as without XLA: test_two_replicas_with_xla_...[leap]
    assert run["reference"]["skipped_tasks"] == run["two_xla"]["skipped_tasks"] == 1
    assert np.all(np.isfinite(np.concatenate([np.ravel(p) for p in run["two_xla"]["phi"]])))


def test_a_diverged_task_stays_in_its_task_when_tasks_are_one_xla_computation(runs):
    """XLA's CPU grouped convolution spreads one group's NaN into every group's
    filter gradient: the lowering probe must see it and lower otherwise, or
    every task of the batch diverges with the one that did (DivergenceError)."""
    run, reference = runs["batched_nan"], runs["leap"]["reference"]
    assert run["batched"] and run["xla"] and not reference["batched"]
    assert run["skipped_tasks"] == reference["skipped_tasks"] == 1
    assert_same_run(run, reference)


def test_resume_under_xla_per_replica_ends_where_the_straight_run_does(runs):
    straight = runs["cts"]["two_xla"]
    assert straight["meta_updates"] == CHUNKS
    assert_same_run(runs["resumed"], straight)


def test_the_inner_loop_lowers_to_xla_hlo(runs):
    assert runs["hlo"] == {"has_while": True, "has_convolution": True}


def test_auto_is_xla_on_gpu_replicas_only():
    import tensorflow as tf

    from tfmeta.distribute import check_jit_compile, inner_loop_xla, replica_devices

    assert inner_loop_xla("auto", ["/gpu:0", "/gpu:1"]) is True
    assert inner_loop_xla("auto", ["/job:worker/replica:0/task:1/device:GPU:0"]) is True
    assert inner_loop_xla("auto", ["/cpu:0", "/cpu:1"]) is False
    assert inner_loop_xla("auto", ["/gpu:0", "/cpu:0"]) is False
    assert inner_loop_xla(True, ["/cpu:0", "/cpu:1"]) is True
    assert inner_loop_xla(False, ["/gpu:0"]) is False
    assert inner_loop_xla(True, ["/gpu:0"], run_eagerly=True) is False
    if not tf.config.list_physical_devices("GPU"):
        assert replica_devices() == ["/cpu:0"]
        meta = compile_meta(tf.distribute.get_strategy(), "reptile", "auto")
        assert meta.inner_jit_compile is False and meta.jit_compile is False
    with pytest.raises(ValueError, match=r"jit_compile='yes' is not a jit_compile setting: pass True"):
        check_jit_compile("yes")
    with pytest.raises(ValueError, match=r"jit_compile=1 is not a jit_compile setting"):
        inner_loop_xla(1, ["/cpu:0"])


def test_xla_in_one_replica_keeps_keras_train_function_uncompiled():
    """Keras' own jit_compile stays off: it would compile strategy.run too."""
    import tensorflow as tf

    meta = compile_meta(tf.distribute.get_strategy(), "reptile", True)
    assert meta.inner_jit_compile is True and meta.jit_compile is False


if __name__ == "__main__":
    {"replicas": _main}[sys.argv[1]](*sys.argv[2:])
