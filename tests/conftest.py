"""Shared test fixtures.

The real dataset archives are found through ``TFMETA_DATA_DIR`` (default:
``../shared/data`` next to the repository). Where they are absent, tests that
need them skip with the reason, except under CI (``CI=true``), where absence
is a failure: CI must always exercise the real data.
"""

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# pytest-xdist runs its workers side by side: give each TensorFlow (and the
# tools it starts, which inherit the environment) its share of the CPUs, as
# `tools/many_shot.py --jobs` does for its workers, instead of TensorFlow's
# default of every CPU for every pool of every process. Measured on 2 cores,
# 2 workers: the many-shot smoke test 37.6 s -> 9.8 s, the ranking on real
# MNIST 23.4 s -> 8.7 s; the whole suite 636 s -> 608 s (one run each).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    from tfmeta.cli.workers import threads_per_job

    _threads = str(threads_per_job(int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", _threads)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", _threads)

REPO = pathlib.Path(__file__).resolve().parents[1]


def _archive_dir():
    return pathlib.Path(
        os.environ.get("TFMETA_DATA_DIR", REPO.parent / "shared" / "data")
    ).resolve()


@pytest.fixture(scope="session")
def archive_dir():
    """Folder with the original Omniglot / MNIST / Fashion-MNIST archives."""
    path = _archive_dir()
    if not (path / "mnist").is_dir():
        reason = (
            f"dataset archives not found at {path}; set TFMETA_DATA_DIR to the "
            "folder holding omniglot/, mnist/ and fashion_mnist/"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(scope="session")
def tfds_dir(archive_dir):
    """TFDS data_dir with mnist, fashion_mnist and omniglot prepared.

    Built once from the real archives into ``default_data_dir()`` (outside the
    repository), so later sessions reuse it and only pay a quick check.
    """
    from tfmeta.prepare import default_data_dir, prepare_datasets

    return prepare_datasets(archive_dir, data_dir=default_data_dir())
