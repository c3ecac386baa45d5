"""`CellStore`: several processes fill one results.json side by side (many_shot
--jobs); what a cell records of its settings."""

import json
import multiprocessing

from tfmeta.experiments.complexity_run import CellStore


def _cells(path):
    """results.json's cells without the `machine` records (there once TensorFlow is imported)."""
    cells = json.loads(path.read_text())["cells"]
    return {key: {k: v for k, v in cell.items() if k != "machine"} for key, cell in cells.items()}


def _fill(folder, prefix, count):
    store = CellStore(folder, "demo", resume=True)
    for index in range(count):
        store.put(f"{prefix}{index}", {"value": index})


def test_resumed_stores_keep_each_others_cells(tmp_path):
    first, second = CellStore(tmp_path, "demo", resume=True), CellStore(tmp_path, "demo", resume=True)
    first.put("a", {"value": 1})
    second.put("b", {"value": 2})   # it started before "a" was written
    first.put("c", {"value": 3})
    assert _cells(tmp_path / "results.json") == {"a": {"value": 1}, "b": {"value": 2}, "c": {"value": 3}}


def test_processes_writing_at_once_lose_no_cell(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_fill, args=(tmp_path, prefix, 40)) for prefix in "xyz"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert sorted(cells) == sorted(f"{p}{i}" for p in "xyz" for i in range(40))


def test_a_store_that_does_not_resume_replaces_the_file(tmp_path):
    CellStore(tmp_path, "demo", resume=True).put("old", {"value": 0})
    CellStore(tmp_path, "demo", resume=False).put("new", {"value": 1})
    assert _cells(tmp_path / "results.json") == {"new": {"value": 1}}


def test_cells_record_their_machine_and_a_resume_notes_other_kernels(tmp_path):
    import tensorflow  # noqa: F401  (the kernels a cell records are TensorFlow's)

    from tfmeta.experiments import machine

    store = CellStore(tmp_path, "demo")
    assert store.put("a", {"value": 1}) == {"value": 1, "machine": machine.describe()}
    store.put("b", {"value": 2, "machine": {**machine.describe(), "cpu": "another CPU"}})  # kept as given
    lines = []
    again = CellStore(tmp_path, "demo", resume=True, log=lines.append)
    assert again.get("a")["machine"] == machine.describe()
    assert lines[0] == "resuming: 2 cells already done"
    assert len(lines) == 2 and lines[1].startswith(
        "note: 1 kept cell was computed with other kernels (1 with cpu 'another CPU'"), lines


def test_a_store_without_tensorflow_notes_no_kernels(tmp_path, monkeypatch):
    """A process that has not imported TensorFlow has no kernels to compare the
    kept records with: no note (it would call every cell foreign), and no record."""
    import tensorflow  # noqa: F401

    from tfmeta.experiments import machine

    CellStore(tmp_path, "demo").put("a", {"value": 1})
    monkeypatch.setattr(CellStore, "_computed_on", lambda self: None)
    lines = []
    again = CellStore(tmp_path, "demo", resume=True, log=lines.append)
    assert lines == ["resuming: 1 cells already done"]
    assert again.put("b", {"value": 2}) == {"value": 2}
    assert again.get("a")["machine"] == machine.describe()


def test_factories_are_recorded_by_name_and_arguments_without_an_address():
    import functools

    from tfmeta.experiments.complexity_run import describe_callable
    from tfmeta.experiments.complexity_tasks import conv_classifier

    assert describe_callable(conv_classifier) == "conv_classifier"
    assert (describe_callable(functools.partial(conv_classifier, filters=(16, 32)))
            == "conv_classifier({'filters': (16, 32)})")
    assert (describe_callable(functools.partial(conv_classifier, 10, units=64))
            == "conv_classifier([10], {'units': 64})")
    assert "0x" not in describe_callable(lambda: None)
