"""A teacher model version as the ranker (runtime ``version``): the first stage's candidates ordered by the
cosine similarity of a slower, better embedding model's vectors (issue 20: "a slower, better bi-encoder (the
teacher) rescoring the candidates").

The teacher is a model version like any (``pgsynapse model add /models/all-mpnet-base-v2``): the worker backfills
its vectors for every chunk and keeps them current, so rescoring costs one question encoding by the teacher and a
lookup of its stored vectors of the candidates; no passage is encoded at query time. The ranker row's ``path`` is
``version:N``. The teacher never serves the kNN itself (its HNSW search would be as good, but its index and vectors
are what a smaller first stage saves at scale; and it can stay a candidate at 0 % traffic).
"""

from __future__ import annotations

from typing import Any

import anyio
import psycopg

from pgsynapse.errors import RegistryError
from pgsynapse.models import ModelCache
from pgsynapse.queries import q

PREFIX = "version:"


def teacher_path(version: int) -> str:
    return f"{PREFIX}{int(version)}"


def version_of(path: str) -> int | None:
    """N of a ranker path ``version:N``; None when it names no version."""
    return int(path[len(PREFIX):]) if path.startswith(PREFIX) and path[len(PREFIX):].isdigit() else None


def teacher_id(row: dict[str, Any]) -> int:
    """The teacher version of a ``version`` ranker row."""
    if (version := version_of(str(row["path"]))) is None:
        raise RegistryError(f"ranker {row['id']}: runtime version needs a path {PREFIX}N, not {str(row['path'])!r}")
    return version


def check_teacher(conn: psycopg.Connection, path: str) -> None:
    """Refuse a ``version:N`` ranker whose version does not exist, is retired or rejected, or is still
    backfilling (registered before its vectors are complete, it would rescore some candidates only)."""
    if (version := version_of(path)) is None:
        raise RegistryError(f"ranker add: {path!r} names no model version: write {PREFIX}N, N a version of "
                            "`pgsynapse model list`")
    row = conn.execute(q("version_by_id", "learning.sql"), {"version": version}).fetchone()
    _usable(row, version)


def check_not_first_stage(conn: psycopg.Connection, path: str) -> None:
    """Refuse a ``version:N`` ranker (``ranker add``, ``promote``, ``traffic``) whose version N is the active model
    version: its vectors found the candidates, so its order of them is the kNN's (and would undo the hybrid
    search's full-text share). Call after :func:`check_teacher`."""
    version = version_of(path)
    row = conn.execute(q("version_by_id", "learning.sql"), {"version": version}).fetchone()
    if row is not None and row["status"] == "active":
        raise RegistryError(f"model version {version} is the active model version: its own vectors found the "
                            "candidates, so it cannot rescore them; a teacher is another, larger version, added "
                            "with `pgsynapse model add DIR` and backfilled (docs/learning.md)")


def _usable(row: dict[str, Any] | None, version: int) -> dict[str, Any]:
    if row is None:
        raise RegistryError(f"no model version {version} to rescore with")
    if row["status"] in ("retired", "rejected"):
        raise RegistryError(f"model version {version} is {row['status']}: it cannot rescore")
    if row["status"] != "active" and row.get("backfilled_at") is None:
        raise RegistryError(f"model version {version} is still backfilling: it cannot rescore every chunk yet")
    return row


async def teacher_row(conn: psycopg.AsyncConnection, version: int) -> dict[str, Any]:
    """The teacher's version row; refused when it is gone, retired or still backfilling (it would miss chunks)."""
    row = await (await conn.execute(q("version_by_id", "learning.sql"), {"version": version})).fetchone()
    return _usable(row, version)


def rescores(ranker: dict[str, Any], first_stage: int) -> bool:
    """Whether ``ranker`` (a registry row) can change the order of the candidates model version ``first_stage``
    found: every ranker but a teacher that is that version (one promoted while it was the ranker), whose order of
    them is theirs already (:func:`rescore` leaves it)."""
    return ranker["runtime"] != "version" or version_of(str(ranker["path"])) != first_stage


async def rescore(conn: psycopg.AsyncConnection, models: ModelCache, ranker: dict[str, Any], question: str,
                  chunk_ids: list[int], first_stage: int | None = None) -> list[int]:
    """``chunk_ids`` ordered by the teacher's cosine similarity to ``question`` (stable; a chunk the teacher has no
    vector for goes last). When the teacher is ``first_stage``, the version that found them (one promoted while it
    was the ranker), they stay in their order."""
    if teacher_id(ranker) == first_stage:  # its own vectors found them: their order is already its order
        return chunk_ids
    version = await teacher_row(conn, teacher_id(ranker))
    embedder = await anyio.to_thread.run_sync(models.get, version)
    vector = (await anyio.to_thread.run_sync(embedder.encode, [question]))[0]
    rows = await (await conn.execute(q("chunk_scores", "answers.sql"), {
        "version": version["id"], "ids": chunk_ids, "query": vector})).fetchall()
    scores = {r["chunk_id"]: float(r["score"]) for r in rows}
    return [c for _, c in sorted(enumerate(chunk_ids), key=lambda p: (-scores.get(p[1], -2.0), p[0]))]
