"""Offline preparation of the real TFDS datasets (tfmeta.prepare).

Runs on the original archives (fixture ``archive_dir``); the prepared datasets
are cached in ``default_data_dir()`` by the session fixture ``tfds_dir``.
"""

import logging
import pathlib
import re
import shutil
import time

import numpy as np
import pytest

from tfmeta import prepare
from tfmeta.prepare import (
    ArchiveChecksumError,
    DatasetNotPreparedError,
    default_data_dir,
    load,
    prepare_datasets,
)

SPLITS = {
    "mnist": {"train": 60000, "test": 10000},
    "fashion_mnist": {"train": 60000, "test": 10000},
    "omniglot": {"train": 19280, "test": 13180, "small1": 2720, "small2": 3120},
}


def _skip_image_decoding():
    import tensorflow_datasets as tfds

    # Counting and label checks do not need pixels; PNG decoding would
    # dominate the runtime.
    return {"image": tfds.decode.SkipDecoding()}


def _count_records(split_info):
    import tensorflow as tf

    # Raw records of the split's files: counts what is on disk at a third of
    # the cost of parsing every example.
    files = [str(path) for path in split_info.filepaths]
    return int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))


@pytest.mark.data
@pytest.mark.parametrize(
    "name,split", [(n, s) for n, splits in SPLITS.items() for s in splits]
)
def test_split_sizes(tfds_dir, name, split):
    ds, info = load(name, split, data_dir=tfds_dir, with_info=True)
    assert info.splits[split].num_examples == SPLITS[name][split]
    assert len(ds) == SPLITS[name][split]
    # Counted from the records, not only taken from the metadata.
    assert _count_records(info.splits[split]) == SPLITS[name][split]


@pytest.mark.data
@pytest.mark.parametrize(
    "name,shape",
    [
        ("mnist", (28, 28, 1)),
        ("fashion_mnist", (28, 28, 1)),
        ("omniglot", (105, 105, 3)),
    ],
)
def test_supervised_shapes_and_dtypes(tfds_dir, name, shape):
    import tensorflow as tf

    ds = load(name, "train", data_dir=tfds_dir, as_supervised=True)
    image_spec, label_spec = ds.element_spec
    assert tuple(image_spec.shape) == shape
    assert image_spec.dtype == tf.uint8
    assert label_spec.dtype == tf.int64 and label_spec.shape == ()
    image, label = next(iter(ds.take(1)))
    assert tuple(image.shape) == shape
    assert image.numpy().max() > image.numpy().min()  # a real picture


@pytest.mark.data
def test_fashion_mnist_is_not_mnist(tfds_dir):
    def test_images_and_labels(name):
        ds = load(name, "test", data_dir=tfds_dir, as_supervised=True, batch_size=-1)
        images, labels = ds
        return images.numpy(), labels.numpy()

    mnist_x, mnist_y = test_images_and_labels("mnist")
    fashion_x, fashion_y = test_images_and_labels("fashion_mnist")
    assert not np.array_equal(mnist_x[0], fashion_x[0])
    assert not np.array_equal(np.bincount(mnist_y), np.bincount(fashion_y))
    # Published statistics: mean pixel 0.1325 (MNIST test) vs 0.2868
    # (Fashion-MNIST test), i.e. about 33.8 vs 73.1 on 0..255.
    assert 31 < mnist_x.mean() < 36
    assert 70 < fashion_x.mean() < 76
    # Fashion-MNIST's test split is exactly balanced (1,000 per class); MNIST's
    # is not.
    assert (np.bincount(fashion_y) == 1000).all()
    assert not (np.bincount(mnist_y) == 1000).all()


@pytest.mark.data
def test_omniglot_characters_and_alphabets(tfds_dir):
    """The re-zipped background/evaluation archives hold the full content."""
    expected = {"train": (964, 30), "test": (659, 20)}
    for split, (n_chars, n_alphabets) in expected.items():
        ds = load("omniglot", split, data_dir=tfds_dir, decoders=_skip_image_decoding())
        batch = next(iter(ds.batch(20000)))
        assert len(np.unique(batch["label"].numpy())) == n_chars
        assert len(np.unique(batch["alphabet"].numpy())) == n_alphabets


@pytest.mark.data
def test_second_prepare_is_a_fast_no_op(tfds_dir, archive_dir, caplog):
    infos = sorted(tfds_dir.glob("*/*/dataset_info.json"))
    assert len(infos) == 3
    before = {p: p.stat().st_mtime_ns for p in infos}
    caplog.set_level(logging.INFO, logger=prepare.__name__)

    start = time.perf_counter()
    assert prepare_datasets(archive_dir, data_dir=tfds_dir) == tfds_dir
    elapsed = time.perf_counter() - start

    assert {p: p.stat().st_mtime_ns for p in infos} == before
    messages = [r.getMessage() for r in caplog.records]
    assert sum("already prepared" in m for m in messages) == 3
    assert not any("building" in m for m in messages)
    # A first preparation takes ~35 s; the check is only builder look-ups.
    # Generous bound so a loaded machine does not flake.
    assert elapsed < 15
    # Nothing is read from the archives once prepared.
    prepare_datasets(archive_dir / "does-not-exist", data_dir=tfds_dir)


@pytest.mark.data
def test_a_concurrent_preparation_waits_and_builds_nothing_twice(tfds_dir, tmp_path, caplog):
    """While another process holds the data_dir's lock, prepare waits; it then finds mnist prepared."""
    import fcntl
    import threading

    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    caplog.set_level(logging.INFO, logger=prepare.__name__)
    done = []
    with open(data_dir / ".prepare.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "the other process", mid-preparation
        # An archive folder with no archives: a build would raise, so success
        # proves nothing was built.
        (tmp_path / "no-archives").mkdir()
        worker = threading.Thread(target=lambda: done.append(
            prepare_datasets(tmp_path / "no-archives", data_dir=data_dir, names=["mnist"])))
        worker.start()
        deadline = time.monotonic() + 60
        while not any("waiting for another preparation" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and worker.is_alive(), "prepare did not wait for the lock"
            time.sleep(0.05)
        shutil.copytree(tfds_dir / "mnist", data_dir / "mnist")  # the other process finishes
        fcntl.flock(lock, fcntl.LOCK_UN)
    worker.join(60)
    assert done == [data_dir]
    assert not any("building" in r.getMessage() for r in caplog.records)
    assert load("mnist", "test", data_dir=data_dir).cardinality().numpy() == 10000


def _copy_mnist_archives(archive_dir, dst):
    (dst / "mnist").mkdir(parents=True)
    shutil.copy(archive_dir / prepare.SUMS_FILENAME, dst)
    for path in (archive_dir / "mnist").iterdir():
        shutil.copy(path, dst / "mnist" / path.name)
        (dst / "mnist" / path.name).chmod(0o644)  # The originals are read-only.
    return dst


@pytest.mark.data
def test_corrupted_archive_names_the_file(archive_dir, tmp_path, capsys):
    archives = _copy_mnist_archives(archive_dir, tmp_path / "archives")
    bad = archives / "mnist" / "train-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    data_dir = tmp_path / "tfds"

    with pytest.raises(ArchiveChecksumError, match="mnist/train-labels-idx1-ubyte.gz"):
        prepare_datasets(archives, data_dir=data_dir, names=["mnist"])
    assert not (data_dir / "mnist").exists()  # Verified before building.

    from tfmeta.cli import errors

    assert errors.run_tool(
        "prepare_data.py", prepare.main,
        ["--from", str(archives), "--data_dir", str(data_dir), "--names", "mnist"],
    ) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("prepare_data.py: error: ArchiveChecksumError: ")
    assert "mnist/train-labels-idx1-ubyte.gz" in last


@pytest.mark.data
def test_missing_archive_names_the_file(archive_dir, tmp_path):
    archives = _copy_mnist_archives(archive_dir, tmp_path / "archives")
    (archives / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="mnist/t10k-images-idx3-ubyte.gz"):
        prepare_datasets(archives, data_dir=tmp_path / "tfds", names=["mnist"])


@pytest.mark.data
def test_the_tool_refuses_a_missing_archive_folder_even_when_everything_is_prepared(
        tfds_dir, archive_dir, tmp_path, monkeypatch, capsys):
    """Nothing would be read, but a mistyped --from (or $TFMETA_DATA_DIR) is said, not passed over."""
    from tfmeta.cli import errors

    def tool(*argv):
        code = errors.run_tool("prepare_data.py", prepare.main, [*map(str, argv), "--data_dir", str(tfds_dir)])
        return code, capsys.readouterr()

    missing = tmp_path / "archives-typo"
    code, out = tool("--from", missing)
    assert code == 2 and out.out == ""
    assert out.err.strip().splitlines()[-1] == (
        f"prepare_data.py: error: FileNotFoundError: the archive folder (--from) {missing} does not exist: "
        "pass the folder holding mnist, fashion_mnist, omniglot (one sub-folder each) and SHA256SUMS "
        "(e.g. --from ../shared/data)")
    monkeypatch.setenv("TFMETA_DATA_DIR", str(missing))
    code, out = tool()
    assert code == 2 and f"the archive folder ($TFMETA_DATA_DIR) {missing} does not exist: " in out.err
    (tmp_path / "a-file").write_text("")
    code, out = tool("--from", tmp_path / "a-file")
    assert code == 2 and f"(--from) {tmp_path / 'a-file'} is a file, not a folder: " in out.err
    # The real folder: still a no-op that says where the datasets are.
    code, out = tool("--from", archive_dir)
    assert code == 0 and out.out.strip().splitlines()[-1] == f"datasets ready in {tfds_dir}"


@pytest.mark.parametrize("verify", [True, False])
def test_a_build_from_a_missing_archive_folder_names_the_folder(tmp_path, verify):
    # Before anything else: not "SHA256SUMS not found" (which --no-verify would not fix)
    # nor "archive mnist/... is missing" (as if only that file were).
    with pytest.raises(FileNotFoundError, match=f"^the archive folder {re.escape(str(tmp_path / 'nowhere'))} "
                       "does not exist: "):
        prepare_datasets(tmp_path / "nowhere", data_dir=tmp_path / "tfds", names=["mnist"], verify=verify)
    assert not (tmp_path / "tfds" / "mnist").exists()


def test_a_folder_without_sha256sums_says_how_to_skip_the_check(tmp_path):
    (tmp_path / "archives").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        prepare_datasets(tmp_path / "archives", data_dir=tmp_path / "tfds", names=["mnist"])
    assert str(err.value) == (
        f"{tmp_path / 'archives' / 'SHA256SUMS'} not found; it is needed to verify the archives "
        "(verify=False or --no-verify skips that check)")


def test_missing_dataset_error_says_how_to_prepare(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as err:
        load("mnist", "train", data_dir=tmp_path)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "\n" not in message
    command = "python tools/prepare_data.py --from ../shared/data"
    assert f"{command} --data_dir {tmp_path.resolve()}" in message
    assert "prepare_datasets(" in message


def test_an_unknown_name_names_the_archive_folder_it_was_given(tmp_path):
    archives = tmp_path / "my archives"
    with pytest.raises(ValueError) as err:
        prepare_datasets(archives, data_dir=tmp_path / "tfds", names=["mnsit"])
    assert str(err.value) == (
        "TFDS has no dataset named 'mnsit': did you mean 'mnist'? tfmeta prepares "
        f"mnist, fashion_mnist, omniglot from the archives in {archives} "
        "(--names mnist fashion_mnist omniglot)")
    with pytest.raises(ValueError, match="'zzz': tfmeta prepares .* from local archives"):
        load("zzz", "train", data_dir=tmp_path)


def test_python_m_tfmeta_prepare_points_to_the_tool(tmp_path):
    import os
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tfmeta.prepare", "--from", str(tmp_path / "missing")],
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
    assert proc.stderr == ("python -m tfmeta.prepare is no command: run python tools/prepare_data.py with "
                           "the same arguments (e.g. --from ../shared/data)\n")


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFMETA_TFDS_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    monkeypatch.delenv("TFMETA_TFDS_DIR")
    assert default_data_dir().parts[-3:] == (".cache", "tfmeta", "tensorflow_datasets")


@pytest.mark.data
def test_interrupted_prepare_is_not_loadable(archive_dir, tmp_path, monkeypatch):
    """TFDS stages into ``incomplete.*`` and renames on success only."""
    import tensorflow_datasets as tfds

    builder_cls = tfds.builder_cls("mnist")
    original = builder_cls._generate_examples

    def interrupted(self, *args, **kwargs):
        for i, example in enumerate(original(self, *args, **kwargs)):
            if i == 1000:
                raise RuntimeError("simulated interruption")
            yield example

    monkeypatch.setattr(builder_cls, "_generate_examples", interrupted)
    data_dir = tmp_path / "tfds"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        prepare_datasets(archive_dir, data_dir=data_dir, names=["mnist"])
    assert not list((data_dir / "mnist").glob("[0-9]*"))

    # A process killed outright leaves its staging folder behind; it must not
    # count as a prepared dataset either.
    leftover = data_dir / "mnist" / "incomplete.ABC123_3.0.1"
    leftover.mkdir(parents=True)
    (leftover / "dataset_info.json").write_text("{}")
    (leftover / "features.json").write_text("{}")
    with pytest.raises(DatasetNotPreparedError):
        load("mnist", "train", data_dir=data_dir)


@pytest.mark.data
@pytest.mark.parametrize("failing_write", [1, 2])   # the archive copy, then its .INFO
def test_a_failed_cache_write_never_marks_an_archive_cached(
    archive_dir, tmp_path, monkeypatch, failing_write
):
    """Omniglot's re-zipped archives are copied into the TFDS download cache and
    marked cached by an ``.INFO`` file: an I/O error (a failpoint here) in either
    write leaves no ``.INFO`` beside a missing or truncated copy, and no temporary."""
    from tensorflow_datasets.core.download import resource

    from tfmeta import atomic, failpoints

    builder = prepare._builder("omniglot", tmp_path / "tfds")
    archives = prepare._check_archives(builder, archive_dir, {}, verify=False)
    rezipped = [a for a in archives if a[3] != a[1].checksum]
    assert rezipped, "omniglot has re-zipped archives: the download-cache route"
    download_dir = tmp_path / "downloads"
    monkeypatch.setenv(failpoints.ENV, f"atomic.file_synced@{failing_write}=error")
    failpoints.reset()
    with pytest.raises(atomic.WriteError):
        prepare._stage(builder, archives, download_dir, download_dir / "manual")
    cache = download_dir / "omniglot"
    url, info, path, _ = rezipped[0]
    copy = cache / resource.get_dl_fname(url, info.checksum)
    assert not resource.get_info_path(copy).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    if failing_write == 2:  # the copy itself completed: whole, byte for byte
        assert copy.read_bytes() == path.read_bytes()
    else:
        assert not copy.exists()

    monkeypatch.delenv(failpoints.ENV)
    prepare._stage(builder, archives, download_dir, download_dir / "manual")
    for url, info, path, _ in rezipped:
        copy = cache / resource.get_dl_fname(url, info.checksum)
        assert copy.read_bytes() == path.read_bytes()
        assert resource.get_info_path(copy).is_file()
