"""The demo's check of its data question: a result is compared with the rows of a query written by hand, and a wrong
one says so and what to do, instead of being shown as if it were the answer. (The whole demo: tests/e2e/test_cli.py.)"""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.client import DataResult
from pgsynapse.demo import DATA_CHECK, SHOP_SQL, check_data_answer

pytestmark = pytest.mark.anyio


def _result(status: str, columns: list[str], rows: list[list]) -> DataResult:
    return DataResult(id=7, status=status, sql="SELECT ...", columns=[{"name": c, "type": "text"} for c in columns],
                      rows=rows, row_count=len(rows), truncated=False, error=None, sql_model_id=None,
                      latency_ms=1.0, session_id=None)


async def test_the_demo_tells_a_wrong_data_answer_from_a_right_one(db_url):
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        await conn.execute(SHOP_SQL)
        shipped = [[r["region"], r["count"]] for r in await (await conn.execute(DATA_CHECK)).fetchall()]
        every = [[r["region"], r["n"]] for r in await (await conn.execute(
            "SELECT region, count(*) AS n FROM demo_shop.orders GROUP BY region")).fetchall()]
        assert shipped and sorted(shipped) != sorted(every)  # the shop has orders not shipped yet
        # right: the same rows in another order, the columns the other way round
        right = await check_data_answer(conn, _result("answered", ["n", "region"], [[n, g] for g, n in shipped[::-1]]))
        assert right.startswith("checked: the rows of a query written by hand (SELECT region, count(*)")
        # wrong: every order counted (what the default 0.5B model writes), or no result at all
        for data in (_result("answered", ["region", "n"], every), _result("failed", [], [])):
            wrong = await check_data_answer(conn, data)
            assert wrong.startswith("checked: NOT the rows of a query written by hand"), wrong
            assert ", ".join(f"{g} {n}" for g, n in shipped) in wrong
            assert "pgsynapse sql-correct 7 --sql" in wrong
