"""Asking from Python: insert a question, wait for its answer's NOTIFY (never polling), read the row.

    async with Client(url) as client:
        result = await client.ask("how do I create an index?", session_id="alice")
        print(result.answer, result.sources)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg.rows import dict_row

from pgsynapse.errors import PgsynapseError

ANSWERS_CHANNEL = "pgsynapse_answers"


class AnswerTimeout(PgsynapseError):
    """No answer arrived in time: is a worker running (`pgsynapse run`)?"""


@dataclass(frozen=True)
class Result:
    id: int
    status: str
    answer: str | None
    sources: list[dict[str, Any]]
    model_version_id: int | None
    latency_ms: float | None
    error: str | None
    guardrail: dict[str, Any] | None
    session_id: str | None


class Client:
    """One LISTENing connection. Several tasks may ``ask`` on one client at once: they share the connection,
    and whichever task reads an answer's NOTIFY hands it to the task that asked."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = anyio.Lock()
        self._waiting: set[int] = set()  # questions asked on this client and not answered yet
        # of those, the ones announced on the channel but not yet collected by their ask()
        self._arrived: set[int] = set()
        self.recheck_seconds = 5.0  # safety net only: a re-read of the row when no NOTIFY came in this long

    async def __aenter__(self) -> Client:
        self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, row_factory=dict_row)
        await self._conn.execute(f"LISTEN {ANSWERS_CHANNEL}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def ask(self, text: str, *, session_id: str | None = None, timeout: float = 120.0) -> Result:
        assert self._conn is not None, "use `async with Client(url) as client`"
        async with self._lock:
            # LISTEN is already up: the NOTIFY cannot be missed, it is sent on the worker's commit
            row = await (await self._conn.execute(
                "INSERT INTO pgsynapse.questions (session_id, text) VALUES (%s, %s) RETURNING id",
                (session_id, text))).fetchone()
        qid = row["id"]
        self._waiting.add(qid)
        try:
            with anyio.fail_after(timeout) if timeout else anyio.CancelScope():
                check = True
                while True:
                    if check or qid in self._arrived:
                        self._arrived.discard(qid)
                        result = await self._read(qid)
                        if result.status != "pending":
                            return result
                    check = await self._wait_one(qid)
        except TimeoutError:
            raise AnswerTimeout(f"no answer to question {qid} within {timeout:g}s: is `pgsynapse run` running?") from None
        finally:
            self._waiting.discard(qid)
            self._arrived.discard(qid)

    async def _wait_one(self, qid: int) -> bool:
        """Wait for the next NOTIFY and note whose question it announces (asks on this client share one
        connection: whoever reads an announcement keeps it for its asker). True when none came within
        ``recheck_seconds`` (the caller then re-reads its row: a safety net, not the way answers arrive)."""
        assert self._conn is not None
        async with self._lock:
            if qid in self._arrived:
                return False
            async for n in self._conn.notifies(timeout=self.recheck_seconds, stop_after=1):
                try:
                    announced = int(json.loads(n.payload)["id"])
                except (ValueError, KeyError, TypeError):
                    return True
                if announced in self._waiting:
                    self._arrived.add(announced)
                return False
            return True

    async def _read(self, qid: int) -> Result:
        assert self._conn is not None
        async with self._lock:
            r = await (await self._conn.execute(
                "SELECT id, status, answer, sources, model_version_id, latency_ms, error, guardrail, session_id"
                " FROM pgsynapse.questions WHERE id = %s", (qid,))).fetchone()
        return Result(r["id"], r["status"], r["answer"], r["sources"] or [], r["model_version_id"], r["latency_ms"],
                      r["error"], r["guardrail"], r["session_id"])


def format_result(result: Result) -> str:
    lines = [result.answer or f"({result.status}: {result.error or 'no answer'})"]
    if result.guardrail:
        g = result.guardrail
        lines.append(f"guardrail: {g['action']} by rule {g['rule_id']} ({g['stage']}, similarity {g['similarity']})")
    for s in result.sources:
        where = s.get("source") or f"document {s['document_id']}"
        lines.append(f"  [{s['rank']}] {s['score']:.3f}  {s.get('title') or ''}  ({where}, chunk {s['chunk_id']})")
    if result.latency_ms is not None:
        lines.append(f"  answered in {result.latency_ms:.0f} ms by model version {result.model_version_id}")
    return "\n".join(lines)
