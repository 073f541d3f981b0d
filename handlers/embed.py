"""The ``embed`` job: chunk a document with the model's tokenizer and embed its chunks for every serving version."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import psycopg

from pgsynapse.chunking import Chunk, Chunker, distinct
from pgsynapse.config import Settings
from pgsynapse.db import columns
from pgsynapse.errors import InputError
from pgsynapse.handlers.base import Handler, Job, Outcome, WriteReport, describe, input_error, isolate
from pgsynapse.logs import get_logger
from pgsynapse.models import Embedder, ModelCache
from pgsynapse.queries import q

log = get_logger(__name__)

# a blank body is embedded as no chunk (its old passages, if any, are removed); the job says so
EMPTY_BODY = "the body is empty: the document has no passage to search (a title alone is not embedded)"
# a body of control or invisible characters alone (\x01, ESC, zero-width spaces) is not empty: no tokenizer reads it
NO_PRINTABLE = ("no text to embed: the body has only control or invisible characters (no printable text): the document "
                "has no passage to search (a title alone is not embedded)")
NOTHING_READ = ("no text to embed: the model's tokenizer reads nothing in the body: the document has no passage to "
                "search (a title alone is not embedded)")


def no_passage_reason(body: str | None) -> str:
    """Why a body was cut into no chunk, in the job's skip_reason: empty, or what it is instead."""
    body = body or ""
    if not body.strip():
        return EMPTY_BODY
    if not any(ch.isprintable() and not ch.isspace() for ch in body):
        return NO_PRINTABLE
    return NOTHING_READ


@dataclass
class EmbedWork:
    job: Job
    title: str | None
    body: str | None
    content_hash: str
    chunks: list[Chunk] | None = None


@dataclass
class EmbedResult:
    content_hash: str
    chunks: list[Chunk]
    vectors: dict[int, np.ndarray]  # model version id -> (n_chunks, dim)
    no_chunk_reason: str | None = None  # with no chunk: why (the job's skip_reason)


class EmbedHandler(Handler[EmbedWork]):
    kind = "embed"
    lock_rows_query = ("lock_document_rows", "queries.sql")
    changed_since_query = ("document_changed_since", "queries.sql")
    requeue_changed_query = ("requeue_changed_documents", "queries.sql")

    def __init__(self, settings: Settings, models: ModelCache) -> None:
        self.settings = settings
        self.models = models
        self.versions: list[dict[str, Any]] = []
        self.passages: dict[int, dict[str, Any]] = {}  # passage version rows of the serving query encoders
        self._chunker: Chunker | None = None
        self._chunker_version: int | None = None  # the version whose tokenizer cut with it

    # -- versions and models ------------------------------------------------------------------
    async def refresh_versions(self, conn: psycopg.AsyncConnection) -> None:
        cur = await conn.execute(q("serving_versions"))
        self.versions = list(await cur.fetchall())
        self.passages = {r["id"]: r for r in await (await conn.execute(q("passage_versions"))).fetchall()}

    async def warm_up(self, conn: psycopg.AsyncConnection) -> None:
        """The serving versions' document encoders load before the worker says it started."""
        await self.refresh_versions(conn)
        await anyio.to_thread.run_sync(self.embedders)

    def served_by(self, work: list[EmbedWork]) -> list[dict[str, Any]] | None:
        """Each serving version; None when nothing was computed (every document refused at its load, or no version
        loaded yet): no series with an empty model_version."""
        return list(self.versions) if work and self.versions else None

    def document_row(self, version: dict[str, Any]) -> dict[str, Any]:
        """The version whose model encodes this version's chunks: its passage version (a query encoder trained
        by the retrain job, migration 0014), else itself."""
        pid = version.get("passage_version_id")
        return self.passages.get(pid, version) if pid else version

    def embedders(self) -> list[Embedder]:
        """One document encoder per distinct model: query encoders share their passage version's."""
        rows = {r["id"]: r for r in map(self.document_row, self.versions)}
        return [self.models.get(r) for r in rows.values()]

    @property
    def chunker(self) -> Chunker:
        """Chunks are shared by every version (docs/architecture.md): cut with the active version's tokenizer
        (its document encoder's), and cut anew with the next one's once another version is promoted."""
        active = next((v for v in self.versions if v["status"] == "active"), self.versions[0])
        key = self.document_row(active)["id"]
        if self._chunker is None or self._chunker_version != key:
            primary = self.models.get(self.document_row(active))
            limit = min(self.settings.chunk_tokens, primary.max_seq_length)
            self._chunker = Chunker(primary.tokenizer, limit, self.settings.chunk_overlap)
            self._chunker_version = key
        return self._chunker

    # -- the three steps ----------------------------------------------------------------------
    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[EmbedWork], list[Outcome]]:
        await self.refresh_versions(conn)
        s = self.settings
        cur = await conn.execute(q("load_documents"), {"ids": [j.ref_id for j in jobs],
                                                       "max_document_chars": s.max_document_chars,
                                                       "max_title_chars": s.max_title_chars})
        rows = {r["id"]: r for r in await cur.fetchall()}
        work, known = [], []
        for job in jobs:
            row = rows.get(job.ref_id)
            if row is None:
                known.append(Outcome(job, skip_reason="document deleted"))
            elif row["already_embedded"]:
                known.append(Outcome(job, skip_reason="already embedded: an earlier job read this content"))
            elif not row["fits"]:  # refused from its lengths: its text was not fetched
                known.append(input_error(job, InputError(self._too_long(row)), row["content_hash"]))
            else:
                work.append(EmbedWork(job, row["title"], row["body"], row["content_hash"]))
        return work, known

    def _too_long(self, row: dict[str, Any]) -> str:
        s = self.settings
        if (row["body_chars"] or 0) > s.max_document_chars:
            return f"body has {row['body_chars']:,} characters, over max_document_chars={s.max_document_chars:,}"
        return f"title has {row['title_chars']:,} characters, over max_title_chars={s.max_title_chars:,}"

    def compute(self, work: list[EmbedWork]) -> list[Outcome]:
        if not self.versions:
            raise RuntimeError("no active model version")
        outcomes: dict[int, Outcome] = {}
        to_embed: list[EmbedWork] = []
        for item in work:
            try:
                item.chunks = self._chunk(item)
                to_embed.append(item)
            except InputError as exc:
                outcomes[item.job.id] = input_error(item.job, exc, item.content_hash)
            except Exception as exc:  # noqa: BLE001 - one row's error is that row's error
                outcomes[item.job.id] = Outcome(item.job, error=describe(exc), read_hash=item.content_hash)
        embedders = self.embedders()
        results = isolate(lambda items: self._encode(items, embedders), to_embed)
        for item, res in zip(to_embed, results, strict=True):
            if isinstance(res, BaseException):
                retry = not isinstance(res, InputError)
                outcomes[item.job.id] = Outcome(item.job, error=describe(res), retry=retry, read_hash=item.content_hash)
            else:
                outcomes[item.job.id] = Outcome(item.job, result=res)
        return [outcomes[item.job.id] for item in work]

    def _chunk(self, item: EmbedWork) -> list[Chunk]:
        # lengths were checked at load (load_documents): an oversized row never gets here
        chunks = self.chunker.split(item.title, item.body or "")
        unique = distinct(chunks)  # a repeated text is stored (and embedded, and backfilled) once
        if len(unique) < len(chunks):
            log.info("duplicate_chunks_dropped", document=item.job.ref_id, chunks=len(unique),
                     dropped=len(chunks) - len(unique))
        return unique

    def _encode(self, items: list[EmbedWork], embedders: list[Embedder]) -> list[EmbedResult]:
        texts = [c.embed_text for item in items for c in item.chunks or []]
        by_model = {e.spec.version_id: e.encode(texts, self.settings.encode_batch_size) for e in embedders}
        by_version = {v["id"]: by_model[self.document_row(v)["id"]] for v in self.versions}
        out, start = [], 0
        for item in items:
            n = len(item.chunks or [])
            vectors = {v: arr[start : start + n] for v, arr in by_version.items()}
            for v, arr in vectors.items():
                if n and not np.isfinite(arr).all():
                    raise ValueError(f"model version {v} produced non-finite values")
            out.append(EmbedResult(item.content_hash, list(item.chunks or []), vectors,
                                   None if n else no_passage_reason(item.body)))
            start += n
        return out

    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        report = WriteReport()
        if not outcomes:
            return report
        # first, before any lock on pgsynapse.embeddings: the versions still there to write to, held (FOR SHARE) so
        # that a retire, which drops the version's partition (migration 0019), waits for this commit; one retired
        # meanwhile is skipped. (Taken after the chunk delete, whose cascade locks the embeddings, this would
        # deadlock with a retire: it holds the version row and waits for that lock to drop the partition.)
        computed = sorted({v for o in outcomes if o.ok for v in o.result.vectors})
        live = {r["id"] for r in await (await conn.execute(q("lock_live_versions"), {"ids": computed})).fetchall()}
        doc_ids = [o.job.ref_id for o in outcomes]
        cur = await conn.execute(q("lock_documents"), {"ids": doc_ids})
        rows = {r["id"]: r for r in await cur.fetchall()}
        fresh: list[Outcome] = []
        for o in outcomes:
            row = rows.get(o.job.ref_id)
            if row is None or row["content_hash"] != o.result.content_hash:
                # the row changed (or vanished) while we computed: a newer job has the new text
                report.superseded.append(o.job.id)
            elif row["already_embedded"]:
                # a job of the same content wrote it first (both loaded it after an edit): nothing to do twice
                report.already_written.append(o.job.id)
            else:
                fresh.append(o)
        if not fresh:
            return report
        ids = [o.job.ref_id for o in fresh]
        kept = await self._kept_chunk_ids(conn, fresh)
        keep = list(kept.values())
        await conn.execute(q("delete_chunks"), {"ids": ids, "keep": keep})
        if keep:
            await conn.execute(q("delete_kept_embeddings"), {"keep": keep})
        n_chunks = sum(len(o.result.chunks) for o in fresh)
        if n_chunks:
            cur = await conn.execute(q("next_chunk_ids"), {"n": n_chunks - len(keep)})
            new_ids = iter([r["id"] for r in await cur.fetchall()])
            rows: list[tuple[Any, ...]] = []
            vectors: list[tuple[int, int, np.ndarray]] = []
            for o in fresh:
                res: EmbedResult = o.result
                for k, ch in enumerate(res.chunks):
                    cid = kept.get((o.job.ref_id, ch.ord)) or next(new_ids)
                    rows.append((cid, o.job.ref_id, ch.ord, ch.text, ch.token_count, ch.char_start, ch.char_end,
                                 res.content_hash))
                    vectors += [(cid, version, arr[k]) for version, arr in res.vectors.items() if version in live]
            # whole statements, never COPY: see insert_chunks in queries.sql
            await conn.execute(q("insert_chunks"), columns(rows, "ids", "documents", "ords", "texts", "tokens",
                                                           "starts", "ends", "hashes"))
            if vectors:
                await conn.execute(q("insert_embeddings"), columns(vectors, "chunks", "versions", "embeddings"))
        await conn.execute(q("mark_documents_embedded"), {"ids": ids})
        report.written.extend(o.job.id for o in fresh)
        report.notes.update((o.job.id, o.result.no_chunk_reason or EMPTY_BODY) for o in fresh if not o.result.chunks)
        return report

    async def _kept_chunk_ids(self, conn: psycopg.AsyncConnection, fresh: list[Outcome]) -> dict[tuple[int, int], int]:
        """The stored passages cut again unchanged (the same text at the same place and rank), by (document, ord):
        they keep their ids, which answers' sources, feedback and training examples name. A re-embed of the same
        content (docs/sql.md, "Re-embed everything") or an edit of the title alone then loses none of them."""
        cur = await conn.execute(q("stored_chunks"), {"ids": [o.job.ref_id for o in fresh]})
        stored = {(r["document_id"], r["ord"]): r for r in await cur.fetchall()}
        kept = {}
        for o in fresh:
            for ch in o.result.chunks:
                row = stored.get((o.job.ref_id, ch.ord))
                if row and (row["char_start"], row["char_end"], row["text_md5"]) == (
                        ch.char_start, ch.char_end, hashlib.md5(ch.text.encode()).hexdigest()):
                    kept[(o.job.ref_id, ch.ord)] = row["id"]
        return kept

    @classmethod
    async def record_failure(cls, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        cur = await conn.execute(q("mark_document_failed"), {"id": job.ref_id, "error": error})
        if cur.rowcount:
            await conn.execute(q("notify_documents"), {"ids": [job.ref_id], "status": "failed"})

    async def notify_written(self, conn: psycopg.AsyncConnection, report: WriteReport, jobs: dict[int, Job]) -> None:
        ids = [jobs[j].ref_id for j in report.written]
        if ids:
            await conn.execute(q("notify_documents"), {"ids": ids, "status": "embedded"})
