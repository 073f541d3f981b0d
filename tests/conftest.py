"""Real PostgreSQL for every test: a URL from the environment, else testcontainers when a Docker engine
answers, else the embedded server. Each test gets a fresh database cloned from a migrated template."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from filelock import FileLock
from psycopg.rows import dict_row

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# workers started by tests (subprocesses too) keep the source model on torch instead of exporting it at
# start; the switch to the default runtime is tested in tests/integration/test_runtime_switch.py
os.environ.setdefault("PGSYNAPSE_RUNTIME", "torch")

from pgsynapse import logs  # noqa: E402 - after the environment above
from pgsynapse.config import load_settings  # noqa: E402 - after the environment above, like the next line
from pgsynapse.demo import DATA_QUESTION, SHOP_SQL  # noqa: E402
from pgsynapse.embedded import EmbeddedPostgres  # noqa: E402
from pgsynapse.export import optimise_active_version  # noqa: E402
from pgsynapse.migrate import migrate  # noqa: E402
from pgsynapse.models import ModelCache, default_model_path  # noqa: E402
from pgsynapse.textsql.generate import SqlPrompt  # noqa: E402
from tests.image_models import tiny_clip, tiny_vit  # noqa: E402 - transformers reads HF_HUB_OFFLINE at import
from tests.helpers import admin_connection, adopt_runtime, drop_database, with_db  # noqa: E402
from tests.sql_models import sql_database, tiny_sql_model  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="longer chaos scenarios: more kills and more rows")


@pytest.fixture(scope="session")
def full(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full"))


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A command run in-process (``cli.main``) configures logging for the whole process: its level (a command that
    prints its result logs warnings only), its handler. The tests that ran after it in the same pytest worker
    captured no info event (``capture_logs``) and failed by the dozen, in whichever files --dist put after it. Its
    format too: after a command with ``--log-format json``, a later test's ``logs.notice`` logged its line as an
    event instead of printing it (test_distill found no "not registered" line on stderr after test_model_add's
    JSON runs)."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    fmt = dict(logs._format)
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._format.update(fmt)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _docker_url() -> tuple[str, object] | None:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - no engine: fall through to the embedded server
        return None
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("pgvector/pgvector:pg17", driver=None)
    container.start()
    return container.get_connection_url(), container


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = os.environ.get("PGSYNAPSE_TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    found = _docker_url()
    if found:
        url, container = found
        yield url
        container.stop()  # type: ignore[attr-defined]
        return
    # never under /root: as root the embedded server chmods the parents of its data dir
    data_dir = Path(tempfile.mkdtemp(prefix="pgsynapse-test-", dir="/tmp"))
    server = EmbeddedPostgres(data_dir)
    try:
        url = server.start()
        # the run's own server, gone with it: no fsync (each test's DROP DATABASE waited on the disk; a server killed
        # by a test still recovers, from what the OS has written)
        with admin_connection(url) as conn:
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("SELECT pg_reload_conf()")
        yield url
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg_url: str) -> Iterator[str]:
    name = f"pgsynapse_tpl_{uuid.uuid4().hex[:8]}"
    with admin_connection(pg_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate(with_db(pg_url, name))
    yield name
    drop_database(pg_url, name)


@pytest.fixture
def new_db(pg_url: str):
    """A factory of fresh databases: empty (``template=None``) or cloned from the migrated template."""
    made: list[str] = []

    def make(template: str | None = None) -> str:
        name = f"pgsynapse_t_{uuid.uuid4().hex[:10]}"
        with admin_connection(pg_url) as conn:
            if template:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return with_db(pg_url, name)

    yield make
    for name in made:
        drop_database(pg_url, name)


@pytest.fixture
def db_url(new_db, template_db: str) -> str:
    """A fresh, migrated database for this test."""
    return new_db(template_db)


@pytest.fixture(scope="session")
def models():
    """The real default model, loaded once for the whole run."""
    return ModelCache()


@pytest.fixture(scope="session")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()))


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """What ``build(folder)`` writes in the folder ``name`` and returns (a JSON record), made once per test run: the
    pytest-xdist workers share it (the pytest-xdist docs' "Making session-scoped fixtures execute only once"). The
    first worker to ask builds it under a file lock, the others wait for its record. Its users only read the folder
    (or copy it); a database row it needs is made by each worker in its own database from the record."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # a worker's is this run's popen-gwN
    record = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not record.exists():
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)  # what a worker whose build failed left
            folder.mkdir()
            record.write_text(json.dumps(build(folder)))
    return json.loads(record.read_text())


@pytest.fixture(scope="session")
def default_runtime(pg_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The active version as a fresh install leaves it after its first worker start: exported to the default
    runtime, with its artifact, once per test run (:func:`built_once`). Returns the ``model_versions`` columns a
    test's database adopts (:func:`adopt_runtime`) and the data dir of the artifact: this xdist worker's copy, as the
    workers its tests start write there (exports, candidates named by their job's id, rankers), and two databases
    of two xdist workers may have a job of the same id."""

    def export(data_dir: Path) -> dict[str, Any]:
        name = f"pgsynapse_int8_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        url = with_db(pg_url, name)
        try:
            # the export's agreement check on its smallest sample: the same export and INT8 schemes in a fraction
            # of the time (tests/integration/test_runtime_switch.py checks the agreement itself)
            settings = load_settings(environ={}, database_url=url, data_dir=data_dir, export_sample_chunks=16)
            assert settings.runtime == "onnx-int8"  # the default: what ships
            optimise_active_version(settings, url)
            with psycopg.connect(url, row_factory=dict_row) as conn:
                row = conn.execute("SELECT runtime, artifact_path, metrics FROM pgsynapse.model_versions"
                                   " WHERE id = 1").fetchone()
            assert row and row["runtime"] != "torch", row
            return {**row, "data_dir": str(data_dir)}
        finally:
            drop_database(pg_url, name)

    built = built_once(tmp_path_factory, "default-runtime", export)
    data_dir = tmp_path_factory.mktemp("default-runtime")
    shutil.copytree(Path(built["data_dir"]) / "models", data_dir / "models", dirs_exist_ok=True)
    # the record's paths (artifact_path, the export's in metrics) in this copy
    return json.loads(json.dumps(built).replace(built["data_dir"], str(data_dir)))


@pytest.fixture
def shipped(default_runtime: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Worker subprocesses and commands of this test run the default runtime, as a fresh install's do after its
    first start (the others pin torch, above). Returns the function that gives a database the exported version."""
    monkeypatch.setenv("PGSYNAPSE_RUNTIME", "onnx-int8")
    monkeypatch.setenv("PGSYNAPSE_DATA_DIR", default_runtime["data_dir"])
    return lambda url: adopt_runtime(url, default_runtime)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP the test run teaches colour words (tests/image_models.py), once (:func:`built_once`): no CLIP weights
    install here."""
    return Path(built_once(tmp_path_factory, "tiny-clip", lambda folder: {"path": str(tiny_clip(folder))})["path"])


@pytest.fixture(scope="session")
def tiny_vit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vit(tmp_path_factory.mktemp("models") / "tiny-vit")


@pytest.fixture(scope="session")
def demo_sql_model(pg_url, template_db, tmp_path_factory) -> str:
    """A tiny SQL model that answers the demo's data question right, on the demo's table (the demo's and the SQL
    commands' end-to-end tests)."""
    # what a right model says (no '_' in it: the tiny model's tokenizer splits them)
    shipped_per_region = "select region, count(shipped) from orders group by region order by 2 desc, 1"
    with sql_database(pg_url, template_db, tmp_path_factory, "demo_shop", SHOP_SQL, "demo_shop") as (_, _, ctx):
        path = tmp_path_factory.mktemp("models") / "tiny-demo-sql"
        return str(tiny_sql_model(path, [(SqlPrompt(DATA_QUESTION, ctx.text), shipped_per_region)]))
