"""MetaModel under tf.distribute: replicas, workers and XLA give the same phi.

Without a GPU, replicas are two logical CPU devices. They must be configured
before TensorFlow initializes its devices, so those runs happen in a
subprocess (this file run as a script); so do the two-worker runs
(MultiWorkerMirroredStrategy on localhost ports, one process per worker).
Every subprocess is bounded in time and killed when a test ends.

What is shown:
- one meta-step (Leap, Reptile) and a few CTS meta-steps from the same phi
  on the same task batch give the same phi, BatchNorm statistics and task
  states with 2 replicas as with 1 (to 1e-5), with dropout (per-task random
  streams use global task indices) and a stateful outer optimizer (Adam);
- two workers on localhost give the phi of a single worker on the same tasks,
  through MetaModel directly and through tools/train.py (gin
  `train.strategy = "multi_worker"`), where only the chief writes the outputs;
- `jit_compile=True` on CPU gives the same phi as without (XLA per replica:
  tests/test_xla_replicas.py);
- `get_strategy("mirrored")` picks the all-reduce that fits its devices
  (NCCL over GPUs, `ReductionToOneDevice` on CPUs);
- the unsupported combinations fail with an error naming the fix.
"""

import json
import os
import pathlib
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
EPOCHS_TOLERANCE = dict(rtol=1e-6, atol=1e-6)  # several epochs of a finite stream
TIMEOUT = 240  # seconds, per subprocess

T, K, S = 4, 4, 2  # tasks, inner steps, steps per chunk


# --------------------------------------------------------------------------
# the experiment, shared by the subprocesses and the in-process references


def make_model(dropout=True):
    """BatchNorm (float state), Dropout (seed state), Dense; fixed weights."""
    import keras

    layers = [keras.Input((3,)), keras.layers.BatchNormalization(momentum=0.8)]
    if dropout:
        layers.append(keras.layers.Dropout(0.3, seed=7))
    layers += [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
    model = keras.Sequential(layers)
    rng = np.random.default_rng(1)
    for variable in model.weights:  # kernels from a fixed RNG, the rest as built
        if variable.path.endswith("kernel"):
            variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    return model


def make_learner(name):
    import tfmeta

    return {
        "leap": lambda: tfmeta.Leap(),
        "reptile": lambda: tfmeta.Reptile(),
        "cts": lambda: tfmeta.ContinualTrajectoryShifting(tfmeta.Reptile(), every=S),
    }[name]()


def task_data(tasks=T, steps=K, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tasks, steps, 5, 3)).astype("float32") * [1.0, 2.0, 0.5] + [3, -1, 0]
    w = rng.normal(size=(tasks, 1, 3, 2)).astype("float32")
    y = (x @ w).astype("float32")
    return x.astype("float32"), y


def dataset(x, y):
    import tensorflow as tf

    chunks = x.shape[1] // S
    xs = np.stack([x[:, c * S:(c + 1) * S] for c in range(chunks)])
    ys = np.stack([y[:, c * S:(c + 1) * S] for c in range(chunks)])
    return tf.data.Dataset.from_tensor_slices((xs, ys))


def meta_train(strategy, learner, x, y, steps_per_execution=1, jit_compile="auto", dropout=True,
               loss=None, epochs=1, steps_per_epoch=None):
    """Meta-train from the fixed phi on (x, y) for `epochs` epochs; every value as NumPy."""
    import keras

    import tfmeta

    with strategy.scope():
        model = make_model(dropout)
        meta = tfmeta.MetaModel(model)
        meta.compile(
            optimizer=keras.optimizers.Adam(0.05),
            inner_optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
            loss=loss or keras.losses.MeanSquaredError(),
            learner=make_learner(learner),
            inner_steps=K,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
        )
    after_epoch = []  # meta-updates done at each epoch's end
    count = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: after_epoch.append(int(meta.meta_updates.numpy()))
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta.fit(dataset(x, y), epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=[count],
                 verbose=0)

    def tasks(variable):  # every task's state, replicas concatenated
        parts = strategy.experimental_local_results(variable.value)
        return np.concatenate([p.numpy() for p in parts]).tolist()

    return {
        "phi": [v.numpy().tolist() for v in model.trainable_variables],
        "state": [v.numpy().tolist() for v in model.non_trainable_variables],
        "task_params": [tasks(v) for v in meta.task_params],
        "meta_updates": int(meta.meta_updates.numpy()),
        "jit_compile": bool(meta.inner_jit_compile),
        "after_epoch": after_epoch,
        "ran_out": [str(w.message) for w in caught if "ran out of data" in str(w.message)],
    }


def digits_meta_train(strategy):
    """Leap on augmented digit tasks (2 meta-updates): phi, and the tasks augmented per traced chunk function."""
    import collections

    import keras

    import tfmeta
    from tfmeta.tasks import digits_tasks, random_affine

    affine = random_affine()
    traced = collections.Counter()  # chunk function graph -> tasks augmented in it

    def augment(images, seed, rows=None):  # called once per chunk, on its tasks' images
        traced[images.graph] += int(images.shape[0]) // (S * 5)
        return affine(images, seed, rows=rows)

    pretrain, _ = digits_tasks(num_pretrain=8, num_heldout=1)
    stream = pretrain.as_dataset(tasks_per_batch=T, inner_steps=K, batch_size=5, steps_per_chunk=S,
                                 seed=3, augment=augment)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((8, 8, 1)), keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(pretrain.num_classes),
        ])
        rng = np.random.default_rng(2)
        for variable in model.weights:
            if variable.path.endswith("kernel"):
                variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
        meta = tfmeta.MetaModel(model)
        meta.compile(
            optimizer=keras.optimizers.Adam(0.05), inner_optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            learner=tfmeta.Leap(), inner_steps=K,
        )
    initial = [v.numpy().tolist() for v in model.trainable_variables]
    meta.fit(stream, steps_per_epoch=2 * K // S, verbose=0)
    return {
        "initial": initial,
        "phi": [v.numpy().tolist() for v in model.trainable_variables],
        "meta_updates": int(meta.meta_updates.numpy()),
        "traced_tasks": sorted(traced.values()),
    }


def assert_same(actual, expected, what, tolerance=TOLERANCE):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(a, e, **tolerance, err_msg=f"{what} [{i}]")


# --------------------------------------------------------------------------
# subprocess entry points


def _replicas_main(part):
    """2 logical CPUs: every learner with 1 and 2 replicas, and the errors.

    The runs come in two halves (`part` "0" and "1"), which the fixture runs
    side by side; each half holds the runs its tests compare.
    """
    from tfmeta import distribute

    devices = distribute.use_logical_cpus(2)
    import tensorflow as tf

    one = tf.distribute.get_strategy()
    two = distribute.get_strategy("mirrored", devices)
    x, y = task_data()
    out = {
        "replicas": two.num_replicas_in_sync,
        "cross_device_ops": type(two.extended._cross_device_ops).__name__,
    }
    # CTS: K / S meta-updates, the others one
    for learner in ("leap", "cts") if part == "0" else ("reptile",):
        out[learner] = {
            "one": meta_train(one, learner, x, y),
            "two": meta_train(two, learner, x, y, steps_per_execution=2),
        }
    if part == "0":
        # 4 chunks (2 trajectories of K), 3 epochs; 3 steps per execution: each epoch's last is partial
        x4, y4 = task_data(steps=2 * K)
        out["epochs"] = {
            "one": meta_train(one, "cts", x4, y4, epochs=3),
            "two": meta_train(two, "cts", x4, y4, steps_per_execution=3, epochs=3),
        }
    else:
        out.update(_scalar_loss_and_errors(one, two, devices, x, y))
    print("RESULT " + json.dumps(out))


def _scalar_loss_and_errors(one, two, devices, x, y):
    """A scalar-valued loss on 1 and 2 replicas, TensorFlow's collective
    all-reduce, and the errors of unsupported combinations."""
    import keras
    import tensorflow as tf

    import tfmeta
    from tfmeta import distribute

    out = {}

    class ScalarMSE(keras.losses.Loss):  # already reduced: Keras does not scale it
        def call(self, y_true, y_pred):
            return keras.ops.mean(keras.ops.square(y_true - y_pred))

    out["scalar_loss"] = {
        "one": meta_train(one, "reptile", x, y, loss=ScalarMSE()),
        "two": meta_train(two, "reptile", x, y, loss=ScalarMSE()),
    }
    errors = {}

    def error_of(fn):
        try:
            fn()
        except ValueError as error:
            return str(error)
        return None

    errors["uneven"] = error_of(lambda: meta_train(two, "reptile", x[:3], y[:3]))
    collective = tf.distribute.MirroredStrategy(devices)  # TF's default: collective ops
    errors["collective_steps_per_execution"] = error_of(
        lambda: meta_train(collective, "reptile", x, y, steps_per_execution=2)
    )
    out["collective_one_step"] = meta_train(collective, "reptile", x, y)

    def outside_scope():
        model = make_model()
        with two.scope():
            tfmeta.MetaModel(model)

    errors["outside_scope"] = error_of(outside_scope)
    # gin builds the model before train() enters the scope: in_scope copies it.
    copy = distribute.in_scope(make_model(), two)
    out["in_scope_copy"] = [v.numpy().tolist() for v in copy.weights]
    out["errors"] = errors
    return out


def _worker_main():
    """One worker of a MultiWorkerMirroredStrategy cluster (TF_CONFIG)."""
    from tfmeta import distribute

    strategy = distribute.get_strategy("multi_worker")  # before any TF op
    x, y = task_data()
    out = meta_train(strategy, "leap", x, y)
    out.update(chief=distribute.is_chief(strategy), replicas=strategy.num_replicas_in_sync)
    print("RESULT " + json.dumps(out))


def _digits_worker_main():
    """One worker of a cluster meta-training on augmented digit tasks (its own tasks only)."""
    from tfmeta import distribute

    strategy = distribute.get_strategy("multi_worker")  # before any TF op
    print("RESULT " + json.dumps(digits_meta_train(strategy)))


def _start(argvs, envs):
    processes = []
    for argv, env in zip(argvs, envs):
        processes.append(subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ))
    return processes


def _collect(processes, timeout):
    """Wait for every process (bounded); kill them all on any failure."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if process.returncode:
                raise AssertionError(
                    f"subprocess {process.args[1:]} failed ({process.returncode}):\n{err[-4000:]}"
                )
            outputs.append((out, err))
    finally:
        _kill(processes)
    results = []
    for out, _ in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        results.append(json.loads(lines[-1][len("RESULT "):]) if lines else out)
    return results


# --------------------------------------------------------------------------
# 2 replicas vs 1


@pytest.fixture(scope="module")
def replicas():
    # the two halves side by side: tracing, most of a run's time, uses one core
    halves = _collect(_start([[__file__, "replicas", part] for part in "01"], [{}, {}]), TIMEOUT)
    assert all(isinstance(half, dict) for half in halves), halves
    return {**halves[0], **halves[1]}


@pytest.mark.parametrize("learner", ["leap", "reptile", "cts"])
def test_two_replicas_give_the_phi_of_one(replicas, learner):
    assert replicas["replicas"] == 2
    one, two = replicas[learner]["one"], replicas[learner]["two"]
    expected_updates = K // S if learner == "cts" else 1
    assert one["meta_updates"] == two["meta_updates"] == expected_updates
    assert_same(two["phi"], one["phi"], "phi")
    # BatchNorm moving statistics (the mean over all tasks) and the seed state
    assert_same(two["state"], one["state"], "non-trainable state")
    # each replica kept its own tasks: together they are the tasks of 1 replica
    assert_same(two["task_params"], one["task_params"], "task parameters")
    # phi did move, and the tasks differ (the comparison is not vacuous)
    start = [np.asarray(w) for w in _initial_phi()]
    assert max(np.max(np.abs(np.asarray(p) - s)) for p, s in zip(one["phi"], start)) > 1e-3
    kernel = np.asarray(one["task_params"][2])
    assert np.max(np.abs(kernel[0] - kernel[T - 1])) > 1e-4


def _initial_phi():
    return [v.numpy() for v in make_model().trainable_variables]


def _assert_epochs_like_no_strategy(run, reference, chunks_per_epoch, epochs):
    """`run` did each epoch over the finite stream as `reference` (no strategy) did."""
    # CTS with every=S: one meta-update per chunk, every epoch
    assert reference["after_epoch"] == [chunks_per_epoch * (e + 1) for e in range(epochs)]
    assert run["after_epoch"] == reference["after_epoch"]
    assert run["ran_out"] == reference["ran_out"] == []
    assert_same(run["phi"], reference["phi"], "phi", EPOCHS_TOLERANCE)
    assert_same(run["state"], reference["state"], "non-trainable state", EPOCHS_TOLERANCE)
    assert_same(run["task_params"], reference["task_params"], "task parameters", EPOCHS_TOLERANCE)


def test_two_replicas_run_every_epoch_of_a_finite_stream(replicas):
    """Keras keeps one iterator across epochs when steps_per_epoch is given
    and the length unknown: each epoch must still be one pass over the stream."""
    _assert_epochs_like_no_strategy(replicas["epochs"]["two"], replicas["epochs"]["one"], 4, 3)


@pytest.mark.parametrize("steps_per_execution, steps_per_epoch", [(1, None), (3, None), (1, 2)],
                         ids=["one_pass", "partial_execution", "half_pass"])
def test_a_strategy_runs_every_epoch_of_a_finite_stream(steps_per_execution, steps_per_epoch):
    """A one-device MirroredStrategy (in process) does the epochs of no strategy
    over 4 chunks: also when the epoch's last execution is partial (3 per
    execution), and with 2 steps per epoch (Keras starts a new pass every 2 epochs)."""
    import tensorflow as tf

    from tfmeta import distribute

    x, y = task_data(steps=2 * K)  # 4 chunks
    mirrored = distribute.get_strategy("mirrored", ["/cpu:0"])
    settings = dict(steps_per_execution=steps_per_execution, steps_per_epoch=steps_per_epoch,
                    epochs=3)
    run = meta_train(mirrored, "cts", x, y, **settings)
    reference = meta_train(tf.distribute.get_strategy(), "cts", x, y, **settings)
    _assert_epochs_like_no_strategy(run, reference, steps_per_epoch or 4, 3)


def test_inner_losses_are_not_divided_by_the_replicas(replicas):
    """Keras divides mean losses by the number of replicas (a shard of a global
    batch); a task's loss is no shard. A loss already reduced to a scalar,
    which Keras leaves alone, must not be multiplied back either."""
    # the per-example MSE of the runs above, and a scalar-valued one
    assert_same(replicas["scalar_loss"]["two"]["phi"], replicas["scalar_loss"]["one"]["phi"], "phi")
    assert_same(replicas["scalar_loss"]["one"]["phi"], replicas["reptile"]["one"]["phi"], "phi")


def test_mirrored_on_cpus_reduces_to_one_device(replicas):
    # the runs above (steps_per_execution=2) used it: no collective all-reduce
    assert replicas["cross_device_ops"] == "ReductionToOneDevice"


def test_all_reduce_fits_the_devices():
    """NCCL over several whole GPUs; one device's sum on CPUs, mixed or single devices."""
    from tfmeta.distribute import cross_device_ops

    def chosen(devices, nccl):
        return type(cross_device_ops(devices, nccl=nccl)).__name__

    assert chosen(["/gpu:0", "/gpu:1"], nccl=True) == "NcclAllReduce"
    assert chosen(["/device:GPU:0", "/device:GPU:1", "/device:GPU:2"], nccl=True) == "NcclAllReduce"
    assert chosen(["/gpu:0", "/gpu:1"], nccl=False) == "ReductionToOneDevice"  # no NCCL kernel
    assert chosen(["/gpu:0"], nccl=True) == "ReductionToOneDevice"  # nothing to reduce over
    assert chosen(["/cpu:0", "/cpu:1"], nccl=True) == "ReductionToOneDevice"
    assert chosen(["/gpu:0", "/cpu:0"], nccl=True) == "ReductionToOneDevice"
    # on this machine (no GPU in the tests' CPU runs) the default looks for NCCL only on GPUs
    assert chosen(["/cpu:0", "/cpu:1"], nccl=None) == "ReductionToOneDevice"


def test_collective_mirrored_strategy_matches_with_one_step_per_execution(replicas):
    # TensorFlow's default MirroredStrategy (collective all-reduce) works too,
    # with steps_per_execution=1.
    reference = replicas["reptile"]["one"]
    assert_same(replicas["collective_one_step"]["phi"], reference["phi"], "phi")


def test_unsupported_combinations_name_the_fix(replicas):
    errors = replicas["errors"]
    assert "does not split evenly over 2 replicas" in errors["uneven"]
    assert "tasks_per_batch a multiple of 2" in errors["uneven"]
    assert "steps_per_execution=2 fails under MirroredStrategy" in errors["collective_steps_per_execution"]
    assert "use steps_per_execution=1" in errors["collective_steps_per_execution"]
    assert "created outside its scope" in errors["outside_scope"]
    assert "with strategy.scope()" in errors["outside_scope"]
    # the in-scope copy keeps the weights
    assert_same(replicas["in_scope_copy"], [w.tolist() for w in _copy_weights()], "in_scope copy")


def _copy_weights():
    return make_model().get_weights()


# --------------------------------------------------------------------------
# two workers on localhost vs one


def _kill(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _cluster(argv, beside, num_workers=2, timeout=TIMEOUT):
    """The workers' results of `argv` on a localhost cluster, and `beside()`,
    run in this process while the workers run (the single-worker reference)."""
    from tfmeta.distribute import local_tf_configs

    configs = local_tf_configs(num_workers)
    processes = _start([argv] * num_workers, [{"TF_CONFIG": c} for c in configs])
    try:
        reference = beside()
    except BaseException:
        _kill(processes)
        raise
    return _collect(processes, timeout), reference


def test_two_workers_give_the_phi_of_one_worker():
    import tensorflow as tf

    x, y = task_data()
    workers, single = _cluster(
        [__file__, "worker"], lambda: meta_train(tf.distribute.get_strategy(), "leap", x, y)
    )
    assert [w["chief"] for w in workers] == [True, False]
    for worker in workers:
        assert worker["replicas"] == 2
        assert worker["meta_updates"] == single["meta_updates"] == 1
        assert_same(worker["phi"], single["phi"], "phi")
        assert_same(worker["state"], single["state"], "BatchNorm statistics")
    # each worker holds its own two tasks
    assert_same(workers[0]["task_params"][2], single["task_params"][2][:2], "worker 0 tasks")
    assert_same(workers[1]["task_params"][2], single["task_params"][2][2:], "worker 1 tasks")


def test_two_workers_make_only_their_tasks_and_give_the_phi_of_one_worker():
    """Each worker builds the stream of its T / 2 tasks (task_shard), not all T:
    same phi as one worker reading every task, with augmentation."""
    import tensorflow as tf

    workers, single = _cluster(
        [__file__, "digits_worker"], lambda: digits_meta_train(tf.distribute.get_strategy())
    )
    assert single["traced_tasks"] == [T]
    for worker in workers:
        assert worker["meta_updates"] == single["meta_updates"] == 2
        assert_same(worker["phi"], single["phi"], "phi")
        # the whole stream (built by fit's caller) and the worker's shard of T / 2 tasks
        assert worker["traced_tasks"] == [T // 2, T]
    moved = [np.max(np.abs(np.subtract(p, s))) for p, s in zip(single["phi"], single["initial"])]
    assert max(moved) > 1e-3  # the comparison is not vacuous


TRAIN_PARAMS = [
    "train.inner_steps=10",
    "train.meta_updates=10",
    "train.epochs=1",
    "train.steps_per_execution=5",
    "train.evaluation=None",
    "train.verbose=0",
]


def _train_argv(output_dir, extra=()):
    argv = ["tools/train.py", "--gin_file", "gin/cts_synthetic.gin", "--output_dir", str(output_dir)]
    for param in [*TRAIN_PARAMS, *extra]:
        argv += ["--gin_param", param]
    return argv


def test_train_multi_worker_from_gin_writes_from_the_chief_only(tmp_path):
    import gin
    import keras

    from tfmeta.cli import train as cli

    def one_worker():  # in this process, while the two workers run
        gin.clear_config()
        try:
            cli.run(_train_argv(tmp_path / "one")[1:])
        finally:
            gin.clear_config()

    outputs, _ = _cluster(_train_argv(tmp_path / "two", ['train.strategy="multi_worker"']), one_worker)
    assert "Initialization exported" in outputs[0]
    assert "Worker 1" in outputs[1] and "the chief wrote the outputs" in outputs[1]
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == sorted([
        "checkpoints", "history.csv", "initialization", "logs", "operative_config.gin",
        "results.json", "workers",
    ])
    # the other worker only checkpoints its own tasks' states
    assert [p.name for p in (tmp_path / "two" / "workers").iterdir()] == ["worker-1"]
    assert "train.strategy = 'multi_worker'" in (tmp_path / "two" / "operative_config.gin").read_text()

    from tfmeta.tasks import himmelblau  # noqa: F401  (registers TaskFrame)

    two = keras.saving.load_model(tmp_path / "two" / "initialization" / "model.keras")
    one = keras.saving.load_model(tmp_path / "one" / "initialization" / "model.keras")
    assert_same(two.get_weights(), one.get_weights(), "exported phi")
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("two", "one")]
    assert results[0]["meta_updates"] == results[1]["meta_updates"] == 10


# --------------------------------------------------------------------------
# XLA


def test_jit_compile_gives_the_same_phi_on_cpu():
    """XLA changes float rounding only; without random ops (dropout, CTS's
    random shift) the phi is the same: TensorFlow's stateless RNG picks
    another algorithm under XLA, so random streams differ there. (Leap here;
    every learner under XLA against no XLA: tests/test_xla_replicas.py.)"""
    import tensorflow as tf

    x, y = task_data()
    strategy = tf.distribute.get_strategy()
    auto = meta_train(strategy, "leap", x, y, dropout=False)
    jit = meta_train(strategy, "leap", x, y, jit_compile=True, dropout=False)
    assert auto["jit_compile"] is False  # Keras' "auto": no XLA on a CPU-only machine
    assert jit["jit_compile"] is True
    assert_same(jit["phi"], auto["phi"], "phi")
    assert_same(jit["state"], auto["state"], "BatchNorm statistics")


# --------------------------------------------------------------------------
# cluster configuration (no TensorFlow runtime needed)


def test_chief_follows_tf_config(monkeypatch):
    from tfmeta import distribute

    def config(cluster, task_type, index):
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": cluster, "task": {"type": task_type, "index": index}}))

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.is_chief() and distribute.worker_index() == 0
    assert distribute.worker_count() == 1
    workers = {"worker": ["a:1", "b:2"]}
    config(workers, "worker", 0)
    assert distribute.is_chief() and distribute.worker_count() == 2
    config(workers, "worker", 1)
    assert not distribute.is_chief() and distribute.worker_index() == 1
    with_chief = {"chief": ["c:0"], "worker": ["a:1", "b:2"]}
    config(with_chief, "chief", 0)
    assert distribute.is_chief() and distribute.worker_count() == 3
    config(with_chief, "worker", 0)
    assert not distribute.is_chief()


def test_strategy_names_and_configs(monkeypatch):
    from tfmeta import distribute

    with pytest.raises(ValueError, match=r"Unknown strategy 'tpu'.*choose one of"):
        distribute.get_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the cluster in TF_CONFIG"):
        distribute.get_strategy("multi_worker")
    configs = [json.loads(c) for c in distribute.local_tf_configs(3)]
    hosts = configs[0]["cluster"]["worker"]
    assert len(set(hosts)) == 3 and all(h.startswith("localhost:") for h in hosts)
    assert [c["task"]["index"] for c in configs] == [0, 1, 2]


def test_task_batches_must_split_evenly():
    import tensorflow as tf

    from tfmeta.distribute import check_jit_compile, distribute_task_batches

    class Two:
        num_replicas_in_sync = 2

    x = np.zeros((2, 3, S, 5, 3), "float32")
    with pytest.raises(ValueError, match=r"3 tasks does not split evenly over 2 replicas.*\(e\.g\. 4\)"):
        distribute_task_batches(tf.data.Dataset.from_tensor_slices((x, x)), Two())
    # XLA is compiled per replica: every setting works with any number of replicas
    for setting in (True, False, "auto"):
        check_jit_compile(setting, Two())


if __name__ == "__main__":
    {"replicas": _replicas_main, "worker": _worker_main, "digits_worker": _digits_worker_main}[sys.argv[1]](
        *sys.argv[2:]
    )
