"""The PostgreSQL docs corpus, embedded once by the default model and kept as a template database.

Benchmarks that need the embedded corpus (``answers``, ``learning``) clone it with CREATE DATABASE ... TEMPLATE,
which takes a second instead of the minutes the embedding takes. The embedded server lives in ``--data-dir``
(default /tmp/pgsynapse-bench-corpus) and is reused across runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.common import corpus, run_worker_until
from pgsynapse.config import load_settings
from pgsynapse.embedded import EmbeddedPostgres
from pgsynapse.export import SCHEMES
from pgsynapse.migrate import migrate

TEMPLATE = "pgsynapse_corpus_v1"
DEFAULT_DIR = Path("/tmp/pgsynapse-bench-corpus")


def _url(server_url: str, dbname: str) -> str:
    params = conninfo_to_dict(server_url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def _embed_corpus(url: str, limit: int | None) -> dict[str, float]:
    pages = corpus(limit)
    settings = load_settings(environ={}, database_url=url, kinds=("embed",), batch_size=64)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
            ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))

    run_worker_until(settings, url, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'",
                     ("pgsynapse_documents",), poll=10)
    return {"pages": len(pages), "embed_seconds": round(time.perf_counter() - started, 1)}


def _artifacts_exist(url: str) -> bool:
    """Whether every model version of the database at ``url`` still has its artifact directory."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT artifact_path FROM pgsynapse.model_versions WHERE artifact_path IS NOT NULL").fetchall()
    return all(Path(r[0]).exists() for r in rows)


@contextlib.contextmanager
def corpus_clone(data_dir: Path = DEFAULT_DIR, limit: int | None = None,
                 database_url: str | None = None) -> Iterator[tuple[str, dict]]:
    """A fresh copy of the embedded corpus database, on the server of ``database_url`` (a benchmark's
    ``--database-url``; default DATABASE_URL), else on the embedded server in ``data_dir``; yields ``(url, info)``."""
    url = database_url or os.environ.get("DATABASE_URL")
    server = None
    if not url:
        data_dir.mkdir(parents=True, exist_ok=True)
        server = EmbeddedPostgres(data_dir)
        url = server.start()
    # one template per chunking and runtime (the first INT8 scheme is the one the default model gets): a
    # template embedded with other settings would be measured silently
    defaults = load_settings(environ={}, database_url=url)
    template = (f"{TEMPLATE}_{defaults.chunk_tokens}_{defaults.chunk_overlap}_{defaults.runtime}_{SCHEMES[0]}"
                + (f"_{limit}" if limit else "")).replace("-", "_")
    info_path = data_dir / f"{template}.json"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (template,)).fetchone()
        if exists and not _artifacts_exist(_url(url, template)):
            exists = None  # its model artifacts were deleted (e.g. with the data dir): embed again
        if not exists or not info_path.exists():
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{template}"')
            migrate(_url(url, template))
            info = _embed_corpus(_url(url, template), limit)
            info_path.write_text(json.dumps(info))
        info = json.loads(info_path.read_text())
        name = f"pgsynapse_bench_{os.getpid()}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        # the clone is brought up to this checkout's migrations, never the shared template: branches with other
        # migrations share one template
        migrate(_url(url, name))
        try:
            yield _url(url, name), info
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if server is not None:
            server.stop()


def on_corpus_server(database_url: str | None, run: Callable[[], None]) -> None:
    """``run()`` with DATABASE_URL naming a server: ``database_url`` (or the environment's), else the corpus's
    embedded server in DEFAULT_DIR, started once for the whole run (a stopped embedded server does not start again
    in-process) and stopped after it."""
    url = database_url or os.environ.get("DATABASE_URL")
    if url:
        os.environ["DATABASE_URL"] = url
        run()
        return
    server = EmbeddedPostgres(DEFAULT_DIR)
    os.environ["DATABASE_URL"] = server.start()
    try:
        run()
    finally:
        server.stop()
