"""The many-shot benchmark (issue 11 §3-4): split, budgets, multi-task heads, resume, and a real smoke run.

The smoke test meta-trains on real dataset-level tasks at small scale and
needs the archives (`tfds_dir` fixture: skips where they are absent, fails
under CI).
"""

import json
import pathlib
import sys

import keras
import numpy as np
import pytest

from tfmeta.experiments import many_shot
from tfmeta.experiments.many_shot import (
    HELD_OUT_DATASETS,
    SOURCES,
    TARGETS,
    VALIDATION_SOURCES,
    VALIDATION_TARGETS,
    Benchmark,
    Method,
    cell_key,
    split_datasets,
)
from tfmeta.learners import Reptile
from tfmeta.multitask import MultiTaskModel
from tfmeta.tasks.domains import NAMES
from tfmeta.validation import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import many_shot as tool  # noqa: E402  (tools/many_shot.py)


# ------------------------------------------------------------ the split
def test_split_is_disjoint_and_holds_out_whole_datasets():
    assert len(SOURCES) >= 7 and len(TARGETS) >= 5
    assert set(SOURCES) <= set(NAMES) and set(TARGETS) <= set(NAMES)
    assert not set(SOURCES) & set(TARGETS)
    # No task of a held-out dataset is a source, and >= 2 targets come from them.
    assert not split_datasets(SOURCES) & set(HELD_OUT_DATASETS)
    assert len([t for t in TARGETS if t.split("/")[0] in HELD_OUT_DATASETS]) >= 2
    # Hyperparameters are chosen on sources only.
    assert set(VALIDATION_SOURCES) | set(VALIDATION_TARGETS) == set(SOURCES)
    assert not set(VALIDATION_SOURCES) & set(VALIDATION_TARGETS)


def test_benchmark_refuses_a_target_among_the_sources():
    with pytest.raises(ConfigError, match="both sources and targets"):
        Benchmark(sources=("mnist", "digits"), targets=("digits",))
    with pytest.raises(ConfigError, match="multiple of inner_steps x checkpoints"):
        Benchmark(inner_steps=1000, budget=1500, checkpoints=1)


# ------------------------------------------------------------ the budget
@pytest.fixture(scope="module")
def configured_methods():
    """`{name: (bench, method, settings, learner)}` of every gin/many_shot_<name>.gin.

    Gin resolves the factories' bindings when they are called, so everything
    is read while the file's configuration is in force.
    """
    import gin

    import tfmeta.configurables  # noqa: F401

    gin.add_config_file_search_path(str(REPO / "gin"))
    found = {}
    for name in tool.METHODS:
        bench, method = tool.configured(name, [])
        learner = method.learner() if method.kind == "meta" else None
        found[name] = (bench, method, bench.to_dict(), learner)
    gin.clear_config()
    return found


def test_one_gin_file_per_method_with_the_shared_setting(configured_methods):
    settings = [s for _, _, s, _ in configured_methods.values()]
    assert all(s == settings[0] for s in settings)
    assert (settings[0]["inner_steps"], tuple(settings[0]["sources"]), tuple(settings[0]["targets"])) == (
        1000, SOURCES, TARGETS)
    inner = settings[0]["inner_optimizer"]
    assert (inner["momentum"], inner["weight_decay"]) == (pytest.approx(0.9), pytest.approx(5e-4))
    methods = {m.name: learner for _, m, _, learner in configured_methods.values()}
    assert set(methods) == {"cts", "cts without shifting", "reptile", "leap", "fomaml",
                            "multi-task", "no pretraining"}
    cts, no_shift = methods["cts"], methods["cts without shifting"]
    assert (cts.every, cts.shift_rule, no_shift.shift_rule) == (1, "gradient", "none")
    assert isinstance(cts.learner, Reptile) and isinstance(no_shift.learner, Reptile)
    assert (cts.every, cts.hard_reset) == (no_shift.every, no_shift.hard_reset)


def test_every_method_spends_the_same_inner_steps(configured_methods):
    spent = {}
    for bench, method, _, learner in configured_methods.values():
        if method.kind == "none":
            continue
        period = learner.schedule.period(bench.inner_steps) if learner else 1
        chunk = int(np.gcd(period, bench.steps_per_chunk)) if learner else 1
        per_checkpoint = many_shot.chunks_per_checkpoint(bench, chunk)
        # Task-steps: train steps x inner steps per step x tasks per step.
        spent[method.name] = per_checkpoint * bench.checkpoints * chunk * bench.tasks_per_batch
        if learner:
            # Every checkpoint ends exactly on a meta-update.
            for steps in bench.checkpoint_steps():
                assert steps % period == 0
                assert learner.schedule.inner_steps_for(steps // period, bench.inner_steps) == steps
    assert len(spent) == 6 and set(spent.values()) == {4 * 12000}, spent


# ------------------------------------------------------ multi-task heads
def test_multitask_model_sends_each_task_through_its_own_head():
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((3, 3, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(5, name="head")])
    head_before = [w.copy() for w in net.layers[-1].get_weights()]
    mtl = MultiTaskModel(net, num_classes=[5, 2, 3], seed=1)
    lr = 0.5
    mtl.compile(optimizer=keras.optimizers.SGD(lr))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 1, 6, 3, 3, 1)).astype("float32")   # T=2 tasks, B=6
    task_ids = np.array([1, 2], dtype="int32")
    y = np.stack([rng.integers(0, 2, 6), rng.integers(0, 3, 6)])[:, None].astype("int32")
    kernel0, bias0 = mtl.heads_kernel.numpy().copy(), mtl.heads_bias.numpy().copy()
    body = keras.Model(net.inputs, net.layers[-2].output)
    features = body(x.reshape(12, 3, 3, 1)).numpy().astype("float64")

    # NumPy: each task's examples through its own head, unused classes masked.
    def task_loss(t):
        f = features[6 * t: 6 * (t + 1)]
        logits = f @ kernel0[task_ids[t]] + bias0[task_ids[t]]
        logits[:, [5, 2, 3][task_ids[t]]:] += -1e4
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -logp[np.arange(6), y[t, 0]].mean(), np.exp(logp), f

    expected = np.mean([task_loss(t)[0] for t in range(2)])
    logs = mtl.train_on_batch(x, y, sample_weight=task_ids, return_dict=True)
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
    kernel1, bias1 = mtl.heads_kernel.numpy(), mtl.heads_bias.numpy()
    # Head 0 had no task: unchanged. Head 1's unused classes 2..4, head 2's 3..4: unchanged.
    np.testing.assert_array_equal(kernel1[0], kernel0[0])
    np.testing.assert_array_equal(bias1[0], bias0[0])
    np.testing.assert_array_equal(kernel1[1][:, 2:], kernel0[1][:, 2:])
    np.testing.assert_array_equal(kernel1[2][:, 3:], kernel0[2][:, 3:])
    # The used classes' bias gradient: (softmax - onehot) summed over the task's
    # examples / (T * B), the mean over all 12 examples.
    for t in range(2):
        _, probs, _ = task_loss(t)
        onehot = np.eye(5)[y[t, 0]]
        grad = (probs - onehot).sum(0) / 12
        used = [5, 2, 3][task_ids[t]]
        np.testing.assert_allclose(bias1[task_ids[t]][:used], bias0[task_ids[t]][:used] - lr * grad[:used],
                                   rtol=1e-4, atol=1e-6)
    # The body is `net`'s (trained); `net`'s own head is never touched.
    for before, after in zip(head_before, net.layers[-1].get_weights()):
        np.testing.assert_array_equal(before, after)
    assert not np.allclose(body(x.reshape(12, 3, 3, 1)).numpy(), features)


def test_multitask_model_refuses_more_classes_than_the_head():
    net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="head")])
    with pytest.raises(ConfigError, match="head's 3 units"):
        MultiTaskModel(net, num_classes=[3, 4])


# ---------------------------------------------------------------- resume
def test_resume_skips_finished_cells(tmp_path, monkeypatch):
    bench = Benchmark(sources=("mnist",), targets=("digits",), inner_steps=10, budget=30,
                      checkpoints=3, tasks_per_batch=1)
    calls = {"pretrain": [], "meta_test": 0}

    def fake_pretrain(bench, method, seed, checkpoints=None):
        calls["pretrain"].append((method.name, seed, checkpoints))
        steps = [0] if method.kind == "none" else bench.checkpoint_steps()[:checkpoints]
        return [(s, [np.full(2, s + seed)]) for s in steps]

    def fake_meta_test(bench, weights, seed, targets=None):
        calls["meta_test"] += 1
        return {"digits": {"test_accuracy": float(weights[0][0]), "loss_auc": 1.0}}

    monkeypatch.setattr(many_shot, "pretrain", fake_pretrain)
    monkeypatch.setattr(many_shot, "meta_test", fake_meta_test)
    methods = [Method("reptile", learner=Reptile, meta_optimizer=keras.optimizers.SGD),
               Method("no pretraining", kind="none")]
    logs = []
    first = many_shot.run(bench, methods, seeds=[0, 1], output_dir=tmp_path, log=logs.append)
    assert len(first["cells"]) == 2 * (3 + 1) and calls["meta_test"] == 8
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(first))

    # Drop reptile seed 1's middle cell: resume trains that method x seed up to it
    # and fine-tunes only the missing cell.
    del on_disk["cells"][cell_key("reptile", 1, 20)]
    (tmp_path / "results.json").write_text(json.dumps(on_disk))
    calls.update(pretrain=[], meta_test=0)
    again = many_shot.run(bench, methods, seeds=[0, 1], output_dir=tmp_path, resume=True, log=logs.append)
    assert calls == {"pretrain": [("reptile", 1, 2)], "meta_test": 1}
    timing = ("pretrain_seconds", "finetune_seconds")
    strip = lambda cells: {k: {f: v for f, v in c.items() if f not in timing} for k, c in cells.items()}  # noqa: E731
    assert strip(again["cells"]) == strip(first["cells"])
    # The other cells are the very records of the first run, timings included.
    kept = set(first["cells"]) - {cell_key("reptile", 1, 20)}
    assert all(again["cells"][k] == first["cells"][k] for k in kept)

    with pytest.raises(ConfigError, match="other settings"):
        many_shot.run(Benchmark(sources=("mnist",), targets=("digits",), inner_steps=10, budget=60,
                                checkpoints=3), methods, seeds=[0], output_dir=tmp_path, resume=True)


def test_the_tool_refuses_to_overwrite_without_resume(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert tool.main(["--output_dir", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err


# ------------------------------------------------------------ real smoke
def test_smoke_meta_learned_init_beats_no_pretraining_on_a_held_out_dataset(tfds_dir, tmp_path):
    # Small but not vanishing: 6 Reptile meta-updates of K = 50 steps (beta 1:
    # phi becomes the tasks' mean trained body), inner SGD 0.05 with momentum.
    bench = Benchmark(
        sources=("mnist", "mnist/inverted", "mnist/rot90", "omniglot/background_a"),
        targets=("fashion_mnist",), filters=8, inner_steps=50, tasks_per_batch=2, batch_size=16,
        budget=300, checkpoints=1, finetune_steps=100, finetune_examples=500, test_examples=1000,
        inner_optimizer=lambda: keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=5e-4),
    )
    methods = [
        Method("reptile", learner=Reptile, meta_optimizer=lambda: keras.optimizers.SGD(1.0)),
        Method("no pretraining", kind="none"),
    ]
    results = many_shot.run(bench, methods, seeds=[0], output_dir=tmp_path, log=lambda _: None)
    scores = {c["method"]: c["targets"]["fashion_mnist"] for c in results["cells"].values()}
    # Fashion-MNIST is a dataset none of whose tasks is a source.
    assert scores["reptile"]["loss_auc"] < 0.97 * scores["no pretraining"]["loss_auc"], scores
