"""Search over one model version's embeddings (the active one by default): kNN, fused with full text as the answers
retrieve (unless ``hybrid=False``), then the ranker's order when one is given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from pgvector.psycopg import register_vector_async

from pgsynapse.config import Settings
from pgsynapse.db import EXPORT_COMMAND, command_exporting, starting_export, worker_takes
from pgsynapse.errors import DatabaseError, InputError, RegistryError
from pgsynapse.models import ModelCache
from pgsynapse.queries import q
from pgsynapse.ranking.rescore import rescore
from pgsynapse.ranking.scorer import Ranker, passage_text, rerank
from pgsynapse.replica import ReadReplica, reading
from pgsynapse.results import require_storable
from pgsynapse.retrieval import CANDIDATES_FACTOR, fuse_full_text, knn


HIT_FIELDS = ("chunk_id", "document_id", "title", "source", "ord", "text", "score")


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    document_id: int
    title: str | None
    source: str | None
    ord: int
    text: str
    score: float


def search_order(hybrid: bool, ranked: bool = False) -> str:
    """How :func:`search`'s hits are ordered, in words (their scores stay cosines, so a fused or ranked order
    need not sort them)."""
    if ranked:
        return "the ranker's"
    return "the fused (vector and full-text) rank" if hybrid else "cosine"


async def version_row(conn: psycopg.AsyncConnection, version: int | None = None) -> dict[str, Any]:
    if version is None:
        cur = await conn.execute(q("active_version"))
    else:
        cur = await conn.execute(q("version_by_id", "learning.sql"), {"version": version})
    row = await cur.fetchone()
    if row is None and version is not None:  # no retry makes one (exit 1, as promote or retire of it)
        raise RegistryError(f"no model version {version}: `pgsynapse model list` shows the versions")
    if row is None:  # a worker's first start registers one
        raise DatabaseError("no active model version")
    if row["status"] == "retired":
        raise RegistryError(f"model version {version} is retired: its vectors are gone")
    if row["status"] == "rejected" and row.get("backfilled_at") is None:
        raise RegistryError(f"model version {version} was rejected by its gate: it has no vectors of its own (its "
                            "metrics say why; pgsynapse retire it)")
    if row["status"] != "active" and row.get("backfilled_at") is None:
        # a search over some of the chunks would look like bad recall: never show a half-built version
        raise RegistryError(f"model version {version} is still backfilling (pgsynapse status shows its progress)")
    return row


def check_search_text(text: str | None, max_chars: int) -> None:
    """Refuse a search text that is empty, or over ``max_chars`` characters (the setting ``max_question_chars``: a
    search is what an answer retrieves) before any model or query work: a text of a megabyte was tokenized and
    embedded whole, and then its full-text query went past PostgreSQL's limit."""
    if not text or not text.strip():
        raise InputError("the search text is empty: search for something")
    if len(text) > max_chars:
        raise InputError(f"the search text has {len(text):,} characters, over max_question_chars={max_chars:,}: "
                         "shorten it, or raise max_question_chars (PGSYNAPSE_MAX_QUESTION_CHARS)")
    require_storable(text, "the search text")  # a byte of argv that is not UTF-8 reached the tokenizer: a traceback


def unsearched(conn: psycopg.Connection, waiting: int) -> str:
    """What :func:`search` says of ``waiting`` documents not embedded yet: who embeds them, as ``ingest --follow``
    and ``status`` say it (a worker starting exports a model version first, before it registers:
    :func:`~pgsynapse.db.worker_starting`), or `pgsynapse model export --switch` exporting one meanwhile."""
    if worker_takes(conn, "embed"):
        why = "a running worker embeds them: `pgsynapse status` shows its queue"
    elif (export := starting_export(conn)) is None:
        why = "no running worker takes embed jobs: they are embedded once `pgsynapse run` starts"
    elif export["by"] == "worker":
        why = ("a worker is starting: it exports a model version to its runtime first, minutes on a small host: "
               "`pgsynapse status`; it embeds them once started if it runs embed jobs")
    elif export["workers_waiting"]:
        why = (f"a worker is starting: it waits for {EXPORT_COMMAND} to export a model version to its runtime first, "
               "minutes on a small host: `pgsynapse status`; it embeds them once started if it runs embed jobs")
    else:
        why = (f"no running worker takes embed jobs, and {command_exporting(export)}: they are embedded once "
               "`pgsynapse run` starts, which waits for that export first")
    return f"{waiting} document(s) waiting to be embedded were not searched ({why})"


async def search(
    conn: psycopg.AsyncConnection, models: ModelCache, text: str, *, k: int = 5,
    version: int | dict[str, Any] | None = None,
    replica: ReadReplica | None = None, ranker: Ranker | dict[str, Any] | None = None, candidates: int = 20,
    hybrid: bool = Settings.model_fields["hybrid"].default,
    text_weight: float = Settings.model_fields["hybrid_text_weight"].default,
    text_max_rows: int = Settings.model_fields["hybrid_text_max_rows"].default,
    max_chars: int = Settings.model_fields["max_question_chars"].default,
) -> list[Hit]:
    """The ``k`` chunks nearest to ``text`` among ``version``'s (an id, or the row :func:`version_row` read; None:
    the active version's); the reads go to ``replica`` once it has caught up with ``conn``. With
    ``hybrid`` (the setting's default, so on unless turned off), the kNN is fused with the full-text matches of
    ``text`` (a full-text rank weighing ``text_weight`` of a vector rank, about ``text_max_rows`` chunks ranked at
    most; the settings' defaults unless given), as the answer handler retrieves (settings ``hybrid``,
    ``hybrid_text_weight``, ``hybrid_text_max_rows``); ``hybrid=False`` is the kNN alone, by cosine. With a
    ``ranker``, the first ``max(k, candidates)`` are ordered by it and its first ``k`` returned (their ``score``
    stays the cosine similarity); a ``version`` ranker's registry row rescores with its teacher's stored vectors.
    A ``text`` over ``max_chars`` characters (``max_question_chars``'s default unless given) is an InputError."""
    check_search_text(text, max_chars)
    await register_vector_async(conn)
    row = version if isinstance(version, dict) else await version_row(conn, version)
    embedder = await anyio.to_thread.run_sync(models.get, row)
    vector = (await anyio.to_thread.run_sync(embedder.encode, [text]))[0]
    sql = q("search_chunks").replace("{dim}", str(int(row["dim"])))
    wanted = max(k, candidates) if ranker else k
    async with reading(replica, conn) as reads:
        rows = await knn(reads, sql, vector, row["id"], wanted * (CANDIDATES_FACTOR if hybrid else 1))
        if hybrid:
            fused, fused_rows = await fuse_full_text(reads, row["id"], vector, text, rows, wanted * CANDIDATES_FACTOR,
                                                     text_weight, text_max_rows)
            rows = [fused_rows[c] for c in fused]
        hits = [Hit(**{f: r[f] for f in HIT_FIELDS}) for r in rows[:wanted]]
        if isinstance(ranker, dict):  # a teacher version (ranking/rescore.py)
            order = await rescore(reads, models, ranker, text, [h.chunk_id for h in hits], row["id"])
            by_id = {h.chunk_id: h for h in hits}
            return [by_id[c] for c in order][:k]
    if ranker is not None:
        hits = await anyio.to_thread.run_sync(rerank, ranker, text, hits, lambda h: passage_text(h.title, h.text),
                                             lambda h: h.score)
    return hits[:k]
