"""The ``backfill`` job: embed every chunk for a new model version, a throttled batch at a time.

Each job embeds up to ``backfill_batch`` chunks that lack the version's embedding, in chunk id order after the
cursor of its payload (``after``), and queues the next job with the cursor moved on; a crash loses at most one
batch of work, and the ``(model_version_id, chunk_id)`` key means a resumed
backfill never writes a duplicate. When no chunk is missing, the version is marked backfilled and gets its
traffic share.

A query encoder (``passage_version_id``, what the retrain job registers) searches its passage version's chunk
vectors: those are copied in SQL, and only a chunk the passage version lacks is encoded, by that version's model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.chunking import Chunker
from pgsynapse.config import Settings
from pgsynapse.db import columns
from pgsynapse.handlers.base import Handler, Job, Outcome, WriteReport
from pgsynapse.learning.routing import share_left
from pgsynapse.logs import get_logger
from pgsynapse.models import ModelCache
from pgsynapse.queries import q

log = get_logger(__name__)


@dataclass
class BackfillWork:
    job: Job
    version: dict[str, Any]
    chunks: list[tuple[int, str | None, str]]
    encoder: dict[str, Any]  # the version whose model encodes the chunks: its passage version, or itself
    copied: set[int] = field(default_factory=set)  # chunks whose passage version's vector is copied, not encoded


class BackfillHandler(Handler[BackfillWork]):
    kind = "backfill"
    concurrency = 1

    def __init__(self, settings: Settings, models: ModelCache) -> None:
        self.settings = settings
        self.models = models

    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[BackfillWork], list[Outcome]]:
        work, known = [], []
        for job in jobs:
            v = await (await conn.execute(q("version_by_id", "learning.sql"), {"version": job.ref_id})).fetchone()
            if v is None or v["status"] not in ("candidate", "active"):
                known.append(Outcome(job, skip_reason="version gone, rejected or retired"))
                continue
            after = int(job.payload.get("after", 0))
            rows = await self._missing(conn, job.ref_id, after)
            if not rows and after:  # the end: once more from the start, for a chunk written behind the cursor
                rows = await self._missing(conn, job.ref_id, 0)
            w = BackfillWork(job, v, [(r["id"], r["title"], r["text"]) for r in rows], v)
            if v["passage_version_id"] and rows:
                w.encoder = await (await conn.execute(q("version_by_id", "learning.sql"),
                                                      {"version": v["passage_version_id"]})).fetchone()
                found = await (await conn.execute(q("passage_has_chunks", "learning.sql"), {
                    "passage": v["passage_version_id"], "ids": [r["id"] for r in rows]})).fetchall()
                w.copied = {r["chunk_id"] for r in found}
            work.append(w)
        return work, known

    async def _missing(self, conn: psycopg.AsyncConnection, version: int, after: int) -> list[dict[str, Any]]:
        return list(await (await conn.execute(q("missing_chunks", "learning.sql"), {
            "version": version, "after": after, "limit": self.settings.backfill_batch})).fetchall())

    def served_by(self, work: list[BackfillWork]) -> list[dict[str, Any]] | None:
        """The version being backfilled (its passage version's model encodes a query encoder's chunks)."""
        return list({w.version["id"]: w.version for w in work}.values()) or None  # none computed: not observed

    def compute(self, work: list[BackfillWork]) -> list[Outcome]:
        out = []
        for w in work:
            if not w.chunks:
                out.append(Outcome(w.job, result=("done", [], [], None, 0)))
                continue
            todo = [(cid, title, text) for cid, title, text in w.chunks if cid not in w.copied]
            vectors = self._encode(w, todo) if todo else []
            # a step cut short by its time budget ends at the last chunk it encoded: the next one starts after it
            cursor = vectors[-1][0] if len(vectors) < len(todo) else max(cid for cid, _, _ in w.chunks)
            copied = sorted(cid for cid in w.copied if cid <= cursor)
            out.append(Outcome(w.job, result=("batch", vectors, copied, w.version["passage_version_id"], cursor)))
        return out

    def _encode(self, w: BackfillWork, todo: list[tuple[int, str | None, str]]) -> list[tuple[int, np.ndarray]]:
        """The vectors of ``todo`` in chunk id order, a forward pass at a time, until ``backfill_step_seconds`` have
        passed (at least one pass): a slow model (a large one, busy cores) takes shorter steps instead of running
        past the batch deadline with all ``backfill_batch`` chunks."""
        embedder = self.models.get(w.encoder)
        chunker = Chunker(embedder.tokenizer, min(self.settings.chunk_tokens, embedder.max_seq_length), 0)
        size, started = self.settings.encode_batch_size, time.monotonic()
        vectors: list[tuple[int, np.ndarray]] = []
        for start in range(0, len(todo), size):
            part = todo[start:start + size]
            vecs = embedder.encode([chunker.embed_text(title, text) for _, title, text in part], size)
            vectors += [(cid, vecs[i]) for i, (cid, _, _) in enumerate(part)]
            if time.monotonic() - started >= self.settings.backfill_step_seconds:
                break
        return vectors

    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        report = WriteReport()
        for o in outcomes:
            version = o.job.ref_id
            state, rows, copied, passage, after = o.result
            v = await (await conn.execute(q("lock_backfill_version", "learning.sql"), {"version": version})).fetchone()
            if v is None or v["status"] not in ("candidate", "active"):
                # retired (or rejected, or deleted) while the batch computed: nothing to write, no next step
                log.info("backfill_superseded", version=version, status=v["status"] if v else None)
                report.superseded.append(o.job.id)
                continue
            if state == "done":
                asked = float(o.job.payload.get("traffic_percent", self.settings.rollout_traffic_percent))
                got = await finish_backfill(conn, version, asked)
                await conn.execute(q("notify_backfilled", "learning.sql"), {"version": version})
                log.info("backfill_finished", version=version, traffic_percent=got, asked=asked)
            else:
                if copied:
                    await conn.execute(q("copy_passage_embeddings", "learning.sql"), {
                        "version": version, "passage": passage, "ids": copied})
                if rows:
                    await conn.execute(q("insert_backfill_embeddings", "learning.sql"),
                                       {"version": version, **columns(rows, "chunks", "embeddings")})
                # chunks deleted meanwhile fail the FK above only if gone; the next batch continues after these
                await conn.execute(q("enqueue_backfill", "learning.sql"), {
                    "version": version, "payload": Jsonb({**o.job.payload, "after": after}),
                    "delay": self.settings.backfill_throttle_seconds})
                log.info("backfill_progress", version=version, embedded=len(rows), copied=len(copied))
            report.written.append(o.job.id)
        return report


async def finish_backfill(conn: psycopg.AsyncConnection, version: int, asked: float) -> float | None:
    """Mark ``version`` backfilled; a candidate takes its share of sessions, :func:`share_left` of ``asked``, or of
    the share ``pgsynapse traffic`` gave it meanwhile (that wins: ``asked`` is what its registration asked for). The
    share it took (less than asked: the other candidates hold the rest), or None: finished before (a resumed job)."""
    by_hand = await (await conn.execute(q("traffic_set_by_hand", "learning.sql"), {"version": version})).fetchone()
    if by_hand is not None:
        asked = by_hand["traffic_percent"]
    held = sum(r["traffic_percent"] for r in await (await conn.execute(
        q("other_candidates_traffic", "learning.sql"), {"version": version})).fetchall())
    got = await (await conn.execute(q("finish_backfill", "learning.sql"), {
        "version": version, "traffic": share_left(asked, held)})).fetchone()
    return got["traffic_percent"] if got else None
