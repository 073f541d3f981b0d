"""The exactly-once invariants every chaos scenario ends with, checked in SQL against the real tables.

``check(conn)`` returns a dict of violation counts (all must be 0) and ``totals`` (what was checked).
Adding a kind of work is one entry in ``VIOLATIONS`` (and a total); every scenario then checks it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

AUDIT = Path(__file__).with_name("audit.sql")
# the violations that count work done more than once (reported as `duplicated`); the others count lost work
DUPLICATES = ("jobs_done_twice", "chunks_written_twice", "embeddings_written_twice", "answers_written_twice",
              "image_embeddings_written_twice")

# each query counts rows that break "every job done exactly once, every row exactly one current result"
VIOLATIONS: dict[str, str] = {
    # a document whose latest text has no result (lost work), except those failed on purpose
    "documents_not_current": """
        SELECT count(*) FROM pgsynapse.documents d
        WHERE d.status <> 'failed' AND (d.status <> 'embedded' OR d.embedded_hash IS DISTINCT FROM d.content_hash)""",
    # chunks left from an older text of the document (a stale or second set)
    "stale_chunks": """
        SELECT count(*) FROM pgsynapse.chunks c JOIN pgsynapse.documents d ON d.id = c.document_id
        WHERE c.content_hash <> d.content_hash""",
    # one set means ords 0..n-1 with no gap (a duplicate (document, ord) is refused by a unique constraint)
    "broken_chunk_sets": """
        SELECT count(*) FROM (SELECT document_id FROM pgsynapse.chunks GROUP BY document_id
                              HAVING max(ord) + 1 <> count(*) OR min(ord) <> 0) x""",
    # an embedded document with a non-blank body but no chunks (a blank body gives none, by design)
    "embedded_without_chunks": """
        SELECT count(*) FROM pgsynapse.documents d
        WHERE d.status = 'embedded' AND btrim(coalesce(d.body, ''), E' \\t\\n\\r\\f\\v' || chr(160)) <> ''
          AND NOT EXISTS (SELECT 1 FROM pgsynapse.chunks c WHERE c.document_id = d.id)""",
    # every chunk has exactly one embedding per serving version (the primary key forbids two)
    "chunks_missing_embeddings": """
        SELECT count(*) FROM pgsynapse.chunks c CROSS JOIN pgsynapse.model_versions v
        WHERE v.status IN ('active', 'candidate')
          AND NOT EXISTS (SELECT 1 FROM pgsynapse.embeddings e WHERE e.chunk_id = c.id AND e.model_version_id = v.id)""",
    # a question without its one answer (blocked and failed questions carry their reason instead)
    "questions_not_answered": """
        SELECT count(*) FROM pgsynapse.questions
        WHERE status = 'pending' OR (status = 'answered' AND (answer IS NULL OR answered_at IS NULL))
           OR (status IN ('failed', 'blocked') AND error IS NULL AND guardrail IS NULL)""",
    # a question answered by more than one job, or a pending one with no job to answer it
    "questions_without_one_job": """
        SELECT count(*) FROM pgsynapse.questions qu
        WHERE (SELECT count(*) FROM pgsynapse.jobs j WHERE j.kind = 'answer' AND j.ref_id = qu.id AND j.completions > 0)
              <> CASE WHEN qu.status = 'answered' THEN 1 ELSE 0 END
          AND qu.status IN ('answered', 'pending')""",
    # an image whose latest content has no result while an image model serves (without one, images wait)
    "images_not_current": """
        SELECT count(*) FROM pgsynapse.images i
        WHERE i.status <> 'failed' AND (i.status <> 'embedded' OR i.embedded_hash IS DISTINCT FROM i.content_hash)
          AND EXISTS (SELECT 1 FROM pgsynapse.image_models m WHERE m.status IN ('active', 'candidate'))""",
    # every embedded image has exactly one vector per serving image model (the primary key forbids two)
    "images_missing_embeddings": """
        SELECT count(*) FROM pgsynapse.images i CROSS JOIN pgsynapse.image_models m
        WHERE i.status = 'embedded' AND m.status IN ('active', 'candidate')
          AND NOT EXISTS (SELECT 1 FROM pgsynapse.image_embeddings e WHERE e.image_id = i.id AND e.model_id = m.id)""",
    # an image marked embedded that no job completed (a write outside the queue)
    "images_embedded_without_a_job": """
        SELECT count(*) FROM pgsynapse.images i
        WHERE i.status = 'embedded'
          AND (SELECT count(*) FROM pgsynapse.jobs j WHERE j.kind = 'embed_image' AND j.ref_id = i.id
               AND j.completions > 0) < 1""",
    "jobs_running": "SELECT count(*) FROM pgsynapse.jobs WHERE status = 'running'",
    "jobs_pending": "SELECT count(*) FROM pgsynapse.jobs WHERE status = 'pending'",
    # completions is incremented in the transaction that completes the job: more than 1 = done twice
    "jobs_done_twice": "SELECT count(*) FROM pgsynapse.jobs WHERE completions > 1",
    # duplicates per row, from the write audit (audit.sql): the same chunk of the same text written twice (a set
    # deleted and written again by a second run of a job), an embedding per (chunk, version) twice, a question
    # answered twice
    "chunks_written_twice": """
        SELECT count(*) FROM (SELECT key FROM public.chaos_writes WHERE what = 'chunk'
                              GROUP BY key HAVING count(*) > 1) x""",
    "embeddings_written_twice": """
        SELECT count(*) FROM (SELECT key FROM public.chaos_writes WHERE what = 'embedding'
                              GROUP BY key HAVING count(*) > 1) x""",
    "answers_written_twice": """
        SELECT count(*) FROM (SELECT key FROM public.chaos_writes WHERE what = 'answer'
                              GROUP BY key HAVING count(*) > 1) x""",
    "image_embeddings_written_twice": """
        SELECT count(*) FROM (SELECT key FROM public.chaos_writes WHERE what = 'image_embedding'
                              GROUP BY key HAVING count(*) > 1) x""",
    # a done job that was neither completed nor superseded/skipped on purpose
    "jobs_done_without_completion": """
        SELECT count(*) FROM pgsynapse.jobs WHERE status = 'done' AND completions = 0
          AND coalesce(skip_reason, '') NOT LIKE 'superseded%'""",
}

TOTALS = """
SELECT (SELECT count(*) FROM public.chaos_writes) AS writes_audited, (SELECT count(*) FROM pgsynapse.documents) AS documents,
       (SELECT count(*) FROM pgsynapse.documents WHERE status = 'failed') AS documents_failed,
       (SELECT count(*) FROM pgsynapse.chunks) AS chunks,
       (SELECT count(*) FROM pgsynapse.embeddings) AS embeddings,
       (SELECT count(*) FROM pgsynapse.questions) AS questions,
       (SELECT count(*) FROM pgsynapse.questions WHERE status = 'answered') AS questions_answered,
       (SELECT count(*) FROM pgsynapse.jobs) AS jobs,
       (SELECT count(*) FROM pgsynapse.jobs WHERE completions = 1) AS jobs_completed_once,
       (SELECT count(*) FROM pgsynapse.jobs WHERE status = 'failed') AS jobs_failed,
       (SELECT count(*) FROM pgsynapse.images) AS images,
       (SELECT count(*) FROM pgsynapse.images WHERE status = 'failed') AS images_failed,
       (SELECT count(*) FROM pgsynapse.image_embeddings) AS image_embeddings
"""

# the condition a scenario waits for before checking: nothing queued, nothing in flight
QUIET = """
SELECT NOT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE status IN ('pending', 'running'))
   AND NOT EXISTS (SELECT 1 FROM pgsynapse.documents WHERE status = 'pending')
   AND NOT EXISTS (SELECT 1 FROM pgsynapse.questions WHERE status = 'pending')
   AND NOT EXISTS (SELECT 1 FROM pgsynapse.images WHERE status = 'pending'
                   AND EXISTS (SELECT 1 FROM pgsynapse.image_models WHERE status IN ('active', 'candidate')))"""


def _scalar(conn: psycopg.Connection | Any, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    return int(list(row.values())[0] if isinstance(row, dict) else row[0])


def install_audit(url: str) -> None:
    """Log every chunk, embedding and answer written in this database (see audit.sql)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(AUDIT.read_text().encode())


def check(url: str) -> dict[str, Any]:
    """Violation counts (each must be 0) and the totals that were checked."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        violations = {name: _scalar(conn, sql) for name, sql in VIOLATIONS.items()}
        totals = dict(conn.execute(TOTALS).fetchone() or {})
    duplicated = sum(violations[k] for k in DUPLICATES)
    return {"violations": violations, "totals": totals, "duplicated": duplicated,
            "lost": sum(v for k, v in violations.items() if k not in DUPLICATES)}


def assert_exactly_once(url: str) -> dict[str, Any]:
    result = check(url)
    bad = {k: v for k, v in result["violations"].items() if v}
    assert not bad, f"exactly-once violated: {bad} (totals {result['totals']})"
    return result
