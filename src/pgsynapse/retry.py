"""``pgsynapse retry-failed``: put failed jobs (and their rows) back in the queue after the cause is fixed.

A failed job has used all its attempts, or failed on bad input (never retried by itself). Requeueing
gives it a fresh set of attempts, due now, sets its row back to ``pending`` and wakes the workers. One that failed on
its input (``InputError: ...``) fails the same way again unless its row or a limit changed: it is counted apart, and
left failed when asked (``skip_input_errors``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import psycopg

from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

# per job kind, the named query that sets its rows back to pending (kinds without one only requeue the job)
ROW_RESET_QUERIES: dict[str, str] = {"embed": "retry_failed_documents", "answer": "retry_failed_questions",
                                     "embed_image": "retry_failed_images", "sql_answer": "retry_failed_data_questions"}


@dataclass
class Retried:
    requeued: dict[str, int]  # jobs back in the queue, per kind
    superseded: int  # failed jobs closed instead: their row has a newer job (or changed and was processed since)
    gone: int = 0  # failed jobs closed because their row was deleted
    input_errors: dict[str, int] = field(default_factory=dict)  # of them, per kind, those that failed on their input
    input_error: str | None = None  # the commonest of their errors
    skipped_input_errors: bool = False  # those were left failed, not requeued


def retry_failed(conn: psycopg.Connection, kind: str | None = None, *, skip_input_errors: bool = False) -> Retried:
    """Requeue the failed jobs of ``kind`` (all kinds when None), in one transaction; with ``skip_input_errors``
    those that failed on their input stay failed (counted in ``input_errors``, as are the ones requeued without it).

    At most one pending job may exist per (kind, row): of several failed jobs of one row only the newest
    is requeued, and none when the row already has a pending job or a newer running or done one (its
    text changed and was processed since); the others are closed as superseded. A failed job whose row was deleted
    is closed, not requeued.
    """
    with conn.transaction():
        rows = conn.execute(q("lock_failed_jobs"), {"kind": kind}).fetchall()
        requeue: dict[str, list[int]] = defaultdict(list)
        refs: dict[str, list[int]] = defaultdict(list)
        closed: list[int] = []
        gone: list[int] = []
        seen: set[tuple[str, int]] = set()
        inputs: dict[str, int] = defaultdict(int)
        errors: Counter[str] = Counter()
        for r in rows:
            key = (r["kind"], r["ref_id"])
            if r["gone"]:
                gone.append(r["id"])
                continue
            if r["superseded"] or key in seen:
                closed.append(r["id"])
                continue
            seen.add(key)
            if r["input_error"]:
                inputs[r["kind"]] += 1
                errors[r["last_error"]] += 1
                if skip_input_errors:
                    continue
            requeue[r["kind"]].append(r["id"])
            refs[r["kind"]].append(r["ref_id"])
        if closed:
            conn.execute(q("close_failed_duplicates"), {"ids": closed})
        if gone:
            conn.execute(q("close_failed_of_deleted_rows"), {"ids": gone})
        for k, ids in requeue.items():
            conn.execute(q("requeue_failed_jobs"), {"ids": ids})
            if k in ROW_RESET_QUERIES:
                conn.execute(q(ROW_RESET_QUERIES[k]), {"ids": refs[k]})
            conn.execute(q("notify_jobs"), {"kind": k, "n": len(ids)})
    counts = {k: len(v) for k, v in requeue.items()}
    log.info("failed_jobs_requeued", kind=kind, requeued=counts, superseded=len(closed), row_deleted=len(gone),
             input_errors=dict(inputs), input_errors_skipped=skip_input_errors)
    return Retried(counts, len(closed), len(gone), dict(inputs), errors.most_common(1)[0][0] if errors else None,
                   skip_input_errors)
