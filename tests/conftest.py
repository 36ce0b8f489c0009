"""Shared fixtures for the test suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from reliability import REPORT_NAME, Recorder, ReliabilityLog, results_from_stats, write_report

from pipelines.config import Config
from pipelines.data.images import decode_image, load_images
from pipelines.data.sources import Dataset, ingest

# The real "Brain MRI Images for Brain Tumor Detection" set, read-only, beside the repository
# (``../shared/data/brain-mri-yes-no`` from the project root).
REAL_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain-mri-yes-no"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real yes/no MRI folder; tests that need it skip (with the reason) where it is missing."""
    if not (REAL_DATA_DIR / "yes").is_dir() or not (REAL_DATA_DIR / "no").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA_DIR} (expected yes/ and no/ sub-folders)")
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache the real set's arrays are decoded into once per session."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="session")
def real_dataset(real_data_dir: Path, real_cache_dir: Path) -> Dataset:
    """The real yes/no set ingested (hashing, no decoding)."""
    return ingest(Config(data_dir=str(real_data_dir), cache_dir=str(real_cache_dir)))


@pytest.fixture(scope="session")
def real_decoded(real_dataset: Dataset, real_cache_dir: Path) -> tuple[np.ndarray, dict[str, tuple]]:
    """The one decode of all real images (load_images at 32 px), recording each raw decode's properties."""
    raw: dict[str, tuple] = {}
    original = decode_image

    def recording(path, modality=None):
        image = original(path, modality)
        raw[str(path)] = (image.shape, image.dtype, bool(np.all(np.isfinite(image))), float(image.std()))
        return image

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("pipelines.data.images.decode_image", recording)
        images = load_images(real_dataset, 32, real_cache_dir)
    return images, raw


POSTGRES_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="test")


@contextmanager
def _database_factory() -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL databases on this machine's server, all dropped afterwards.

    Skips with the reason where no server runs; CI sets KD_REQUIRE_POSTGRES=1, which turns the skip
    into a failure, so the PostgreSQL tests can never silently vanish there.
    """
    import os
    import uuid

    import psycopg

    try:
        admin = psycopg.connect(connect_timeout=3, autocommit=True, **POSTGRES_ADMIN)
    except psycopg.OperationalError as error:
        reason = f"PostgreSQL not reachable at {POSTGRES_ADMIN['host']}:{POSTGRES_ADMIN['port']}: {str(error).strip().splitlines()[0]}"
        if os.environ.get("KD_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    created: list[str] = []

    def create() -> str:
        name = f"kd_test_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql://{POSTGRES_ADMIN['user']}@{POSTGRES_ADMIN['host']}:{POSTGRES_ADMIN['port']}/{name}"

    try:
        yield create
    finally:
        for name in created:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def postgres_databases():
    """Fresh PostgreSQL databases for one test (see _database_factory)."""
    with _database_factory() as create:
        yield create


@pytest.fixture(scope="module")
def module_postgres_databases():
    """Fresh PostgreSQL databases shared by one test module (see _database_factory)."""
    with _database_factory() as create:
        yield create


@pytest.fixture
def postgres_uri(postgres_databases) -> str:
    """One fresh PostgreSQL database (see postgres_databases)."""
    return postgres_databases()


@pytest.fixture(scope="session")
def mri_subset(real_data_dir, tmp_path_factory) -> Path:
    """14 tumour and 10 normal real scans, for fast end-to-end runs (names with spaces among them)."""
    import shutil

    root = tmp_path_factory.mktemp("mri-subset")
    for label, count in (("yes", 14), ("no", 10)):
        (root / label).mkdir()
        for path in sorted((real_data_dir / label).iterdir())[:count]:
            shutil.copy(path, root / label / path.name)
    return root


# The reliability record (tests/reliability.py): one log per session, written to RELIABILITY.md at the end.
RELIABILITY_LOG = ReliabilityLog()


@pytest.fixture
def reliability(request) -> Recorder:
    """Record faults injected, bad inputs tried and runs/trials/models lost for RELIABILITY.md."""
    return RELIABILITY_LOG.recorder(request.node.nodeid)


def whole_suite(config) -> bool:
    """Whether this run selected every test (``make test``): no paths, marker or keyword narrowed it."""
    return config.args == config.getini("testpaths") and not config.option.markexpr and not config.option.keyword


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist's controller: take a finished worker's reliability records (sent by its pytest_sessionfinish)."""
    records = getattr(node, "workeroutput", {}).get("reliability")
    if records:
        RELIABILITY_LOG.merge(records)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Write RELIABILITY.md at the repository root when the whole suite ran and any test recorded something; an xdist
    worker sends its records to the controller instead. A partial run (``make test-fast``, one file) would replace the
    full record with a part of it, so it writes nothing."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["reliability"] = RELIABILITY_LOG.as_dict()
        return
    if RELIABILITY_LOG.empty or not whole_suite(session.config):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    results = results_from_stats(reporter.stats if reporter else {})
    selection = " ".join(session.config.invocation_params.args)
    write_report(Path(session.config.rootpath) / REPORT_NAME, RELIABILITY_LOG, results, selection)
