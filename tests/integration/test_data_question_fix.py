"""The fix turn (sql_fix_attempts): a statement that fails in Postgres is shown to the model again with the
server's error, and the corrected statement is checked, run and written on the row. The tiny model
(tests/sql_models.py) is taught the broken statement for the question and the corrected one for the fix prompt the
handler will build from the error the database really gives (computed here through the handler's own path)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.client import Client
from pgsynapse.handlers.sql_answer import SqlAnswerHandler, attempt
from pgsynapse.textsql.generate import SqlPrompt
from tests.helpers import fast_settings, running_worker
from tests.sql_models import as_generated, sql_database, tiny_sql_model

pytestmark = pytest.mark.anyio

SHOP = """
CREATE TABLE regions (name text PRIMARY KEY, manager text);
CREATE TABLE orders (id int PRIMARY KEY, region text REFERENCES regions (name), total int);
INSERT INTO regions VALUES ('north', 'ann'), ('south', 'bob');
INSERT INTO orders SELECT g, CASE WHEN g % 4 = 0 THEN 'south' ELSE 'north' END, g * 10 FROM generate_series(1, 8) g;
GRANT SELECT ON regions, orders TO pgsynapse_reader;
"""
MANAGERS = "who are the managers?"
BROKEN = "select manager from orders order by manager"  # passes the parser check, fails in Postgres (42703)
FIXED = "select manager from regions order by manager"


@pytest.fixture(scope="module")
def fix_shop(pg_url, template_db, tmp_path_factory):
    with sql_database(pg_url, template_db, tmp_path_factory, "fix", SHOP) as (name, settings, ctx):
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            failed = attempt(conn, as_generated(BROKEN), ctx, "public", settings)
        assert failed.result is None and failed.fixable_error, failed
        assert failed.fixable_error.startswith('column "manager" does not exist'), failed.fixable_error
        prompt = SqlPrompt(MANAGERS, ctx.text)
        pairs = [(prompt, BROKEN), (SqlPrompt(MANAGERS, ctx.text, fix=((failed.said, failed.fixable_error),)), FIXED)]
        model = tiny_sql_model(tmp_path_factory.mktemp("models") / "tiny-fix", pairs)
        yield name, str(model), failed, ctx.text


@pytest.fixture
def shop(fix_shop, new_db):
    template, model, failed, schema = fix_shop
    return new_db(template), model, failed, schema


def _row(url: str, qid: int):
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("SELECT status, sql, error, result, schema_context FROM pgsynapse.data_questions"
                            " WHERE id = %s",
                            (qid,)).fetchone()


async def _ask_managers(url: str, model: str, models, *, fix_attempts: int):
    """MANAGERS asked through a worker with the tiny model: the answer and the log events."""
    settings = fast_settings(url, sql_runtime="transformers", sql_model_path=model, sql_fix_attempts=fix_attempts)
    with capture_logs() as logs:
        async with running_worker(settings, models, handlers={"sql_answer": SqlAnswerHandler(settings, models)}):
            async with Client(url) as client:
                return await client.ask_data(MANAGERS), logs


async def test_a_statement_failing_in_postgres_is_fixed_with_its_error_and_the_fix_runs(shop, models):
    url, model, failed, schema = shop
    got, logs = await _ask_managers(url, model, models, fix_attempts=1)
    assert got.status == "answered" and got.error is None, got
    assert got.sql == 'select manager from "public".regions order by manager' and got.rows == [["ann"], ["bob"]]
    row = _row(url, got.id)
    assert row["result"]["fix"] == {"attempts": 1, "first_sql": failed.sql, "first_error": failed.error}
    assert "does not exist" in failed.error
    # the base prompt's schema, not the fix prompt's: what a correction of this row trains
    assert row["schema_context"] == schema
    [event] = [e for e in logs if e["event"] == "sql_fix_attempted"]
    assert event["attempt"] == 1 and event["status"] == "answered" and event["error"] == failed.error


async def test_without_fix_attempts_the_first_error_stays_on_the_row(shop, models):
    url, model, failed, _ = shop
    got, logs = await _ask_managers(url, model, models, fix_attempts=0)
    assert got.status == "failed" and got.error == failed.error and got.sql == failed.sql, got
    assert _row(url, got.id)["result"] is None
    assert not [e for e in logs if e["event"] == "sql_fix_attempted"]
