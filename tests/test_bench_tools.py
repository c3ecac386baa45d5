"""tools/bench.py's `pytorch` table: every row runs, and PyTorch's rows are skipped cleanly without it;
tools/bench_tasks.py's rows and ratios.

The smoke sizes (one block of 4 filters, 4 steps, 2 rounds) check that the
table is built and consistent, not how fast anything is: no assertion here
depends on the CPU or its load.
"""

import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TF_ROWS = ("fused tf.function loop", "Keras fit", "Leap T=4", "Leap T=1", "Reptile T=4")
TORCH_ROWS = ("PyTorch NCHW", "PyTorch channels_last", "PyTorch NCHW, 1 thread", "PyTorch channels_last, 1 thread")


def _smoke(*extra):
    """The smoke run's rows: {run: cells} of the steps/s table, [cells] of the goals table."""
    proc = subprocess.run(
        [sys.executable, "tools/bench.py", "pytorch", "--smoke", *extra], cwd=REPO,
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table, goals = proc.stdout.split("Goals, from the medians:")
    return _rows(table), list(_rows(goals, keyed=False))


def _rows(text, keyed=True):
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines() if line.startswith("| ")
    ]
    rows = [cells for cells in rows if cells[0] not in ("run", "TensorFlow kernels")]
    return {cells[0]: cells for cells in rows} if keyed else rows


def _rate(cells):
    return float(cells[1])


def _check_measured(rows, names, baseline):
    """Every row measured; its ratio is its median over the baseline's (a second computation)."""
    base = _rate(rows[baseline])
    for name in names:
        cells = rows[name]
        low, high = (float(v) for v in cells[2].split("-"))
        assert 0 < low <= _rate(cells) <= high, cells
        # the printed medians are rounded to whole steps/s
        assert float(cells[3]) == pytest.approx(_rate(cells) / base, rel=0.05, abs=0.02), cells
    assert rows[baseline][3] == "1.00"


def test_without_torch_its_rows_are_skipped_and_the_tensorflow_rows_run():
    rows, goals = _smoke("--no_torch", "--one_thread")
    for name in TORCH_ROWS:
        assert rows[name][1].startswith("skipped: PyTorch is not installed"), rows[name]
    tf_rows = [f"oneDNN on: {name}" for name in TF_ROWS]
    _check_measured(rows, tf_rows, "oneDNN on: fused tf.function loop")
    # the batched row is measured once InnerLoop can run tasks batched, and says so until then
    wired = "task_batched" in (REPO / "tfmeta" / "inner_loop.py").read_text()
    if wired:
        _check_measured(rows, ["oneDNN on: Leap T=4, tasks batched"], "oneDNN on: fused tf.function loop")
    else:
        assert rows["Leap T=4, tasks batched"][1].startswith("not run")
    # --one_thread: the same rows in a worker with one thread per op, the batched
    # one in shards
    one = "oneDNN on, 1 thread per op"
    _check_measured(rows, [f"{one}: {name}" for name in TF_ROWS] + [f"{one}: Leap T=4, tasks batched in shards"],
                    "oneDNN on: fused tf.function loop")
    # no PyTorch, no ratio to it: only Leap's time over Reptile's, per worker
    assert [row[0] for row in goals] == ["oneDNN on", one]
    for row, label in zip(goals, ("oneDNN on", one)):
        assert row[1:5] == ["no PyTorch", "-", "-", "-"] and row[6] == "-"
        leap, reptile = _rate(rows[f"{label}: Leap T=4"]), _rate(rows[f"{label}: Reptile T=4"])
        assert float(row[5].split("%")[0]) == pytest.approx(100 * (reptile / leap - 1), abs=3)


def test_with_torch_every_row_is_measured_against_plain_pytorch():
    pytest.importorskip("torch")
    rows, goals = _smoke()
    _check_measured(rows, TORCH_ROWS + tuple(f"oneDNN on: {name}" for name in TF_ROWS), "PyTorch NCHW")
    assert [row[1] for row in goals][0] == "PyTorch NCHW" and goals[1][1].startswith("fastest: PyTorch")
    torch = _rate(rows["PyTorch NCHW"])
    leap = _rate(rows["oneDNN on: Leap T=4"])
    assert float(goals[0][2].split()[0]) == pytest.approx(leap / torch, rel=0.05, abs=0.02)


def test_the_pytorch_network_is_tfmetas_convnet():
    """Same layer shapes: the same trainable parameter count, block by block."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "tools"))
    import bench

    from tfmeta.models import convnet

    for filters, blocks in ((64, 4), (8, 1), (5, 3)):
        keras_count = sum(int(w.numpy().size) for w in convnet(20, filters=filters, blocks=blocks).trainable_weights)
        torch_count = sum(p.numel() for p in bench._torch_convnet(filters, blocks).parameters())
        # by hand: conv 3x3 weights + bias, BatchNorm gamma + beta, Dense from 28 / 2^blocks (ceil) squared
        size = 28
        for _ in range(blocks):
            size = -(-size // 2)
        by_hand = (9 * 1 * filters + filters + 2 * filters
                   + (blocks - 1) * (9 * filters * filters + 3 * filters)
                   + filters * size * size * 20 + 20)
        assert keras_count == torch_count == by_hand


def test_bench_tasks_prints_every_path_and_its_ratio_to_the_per_copy_step(capsys):
    """tools/bench_tasks.py at smoke size, in this process: per copy, batched and in
    shards for each filter count, ratios that are their medians' ratios, the build
    table (sizes too small to say anything of speed), and each path's profile: op
    types only (not the executor's enclosing spans), the convolutions among them,
    shares that add up to at most the whole."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_tasks
    finally:
        sys.path.pop(0)
    assert bench_tasks.run([
        "--tasks", "3", "--filters", "2", "--steps", "2", "--rounds", "1", "--shards", "2",
        "--build_tasks", "2", "3", "--profile",
    ]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"speed T=3 filters=2 conv=auto, (steps/s|steps per CPU-second): (.*)", out)
    assert [unit for unit, _ in rows] == ["steps/s", "steps per CPU-second"], out
    for _, row in rows:
        cells = re.fullmatch(
            r"per-copy (\d+), batched (\d+) \(([\d.]+)x\), batched in 2 shards (\d+) \(([\d.]+)x\)", row
        )
        assert cells, row
        base, batched, ratio, sharded, sharded_ratio = (float(v) for v in cells.groups())
        assert ratio == pytest.approx(batched / base, rel=0.02, abs=0.02)
        assert sharded_ratio == pytest.approx(sharded / base, rel=0.02, abs=0.02)
    builds = re.findall(r"build\+first chunk (per-copy|batched) \(filters=2\): T=2 [\d.]+ s, "
                        r"T=3 [\d.]+ s, ratio [\d.]+", out)
    assert builds == ["per-copy", "batched"], out
    profiles = dict(re.findall(r"profile T=3 filters=2 (per-copy|batched), ms over 3 chunks "
                               r"\(total [\d.]+\): (.*)", out))
    assert sorted(profiles) == ["batched", "per-copy"], out
    for name, row in profiles.items():
        ops = re.findall(r"(\S+) [\d.]+ \((\d+)%\)", row)
        assert len(ops) == 12 and all(re.fullmatch(r"_?[A-Z]\w*", op) for op, _ in ops), row
        assert any("Conv2D" in op for op, _ in ops), row
        assert not {"Process", "Run", "Start", "Done"} & {op for op, _ in ops}, row
        assert sum(int(share) for _, share in ops) <= 100 + len(ops), row  # rounded shares
