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
