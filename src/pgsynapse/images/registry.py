"""The image model registry (``pgsynapse.image_models``): add a model by path, promote, retire, list.

A model's lifecycle: ``add`` registers it (active at once when no active model serves its searches: the first
CLIP, or the first image encoder while no CLIP is active; otherwise a candidate)
and queues every image for it; the worker embeds each image with every active and candidate model; ``promote``
switches searches to a candidate only once it has a vector for every image that can have one, so a search never
sees a half-built model; ``retire`` drops a model's vectors and index (an active one only while no candidate of its
kind waits: retiring every model stops the embedding of images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgsynapse.errors import ModelError, PgsynapseError
from pgsynapse.images.encoders import probe
from pgsynapse.queries import q
from pgsynapse.table_locks import lock_table


# the most dimensions pgvector's HNSW index takes for a vector (each image model has one: ensure_image_index)
HNSW_MAX_DIM = 2000


def sql(name: str) -> str:
    return q(name, "images.sql")


def _run(conn: psycopg.Connection, query: str, params: Any = None) -> psycopg.Cursor:
    """Execute with rows as dicts, whatever the connection's own row factory."""
    return conn.cursor(row_factory=dict_row).execute(query, params)


def add(conn: psycopg.Connection, path: str | Path, *, name: str | None = None, kind: str | None = None) -> dict[str, Any]:
    """Register the model at ``path`` (loaded once here to learn its kind and dimension) and queue every image for
    it. Returns its row, with ``queued``: the images queued. A model already registered (not retired) is refused."""
    path = Path(path).expanduser().resolve()
    found, runtime, dim = probe(path)
    if kind is not None and kind != found:
        raise ModelError(f"{path} holds a {found!r} model, not {kind!r}")
    if dim > HNSW_MAX_DIM:
        raise ModelError(f"image model {path} gives {dim}-dimensional vectors: the vector index (pgvector HNSW) takes "
                         f"at most {HNSW_MAX_DIM}; choose a model of at most {HNSW_MAX_DIM} dimensions (a smaller "
                         "variant, or one with a projection head: a CLIP's image tower)")
    with conn.transaction():
        lock_table(conn, sql("lock_image_models"), "pgsynapse.image_models")
        same = _run(conn, sql("image_model_by_path"), {"path": str(path)}).fetchone()
        if same is not None:  # every image would be embedded twice, for the same vectors
            raise PgsynapseError(f"{path} is already image model {same['id']} ({same['status']}): retire it first to "
                                 "add it again")
        row = _run(conn, sql("insert_image_model"), {"name": name or path.name, "kind": found, "path": str(path),
                                                       "runtime": runtime, "dim": dim, "metrics": Jsonb({})}).fetchone()
        _run(conn, sql("ensure_image_index"), {"model": row["id"]})
        queued = _run(conn, sql("enqueue_all_images"), {"model": row["id"]}).fetchone()["n"]
    return {**row, "queued": queued}


def get(conn: psycopg.Connection, model: int) -> dict[str, Any]:
    row = _run(conn, sql("image_model_by_id"), {"id": model}).fetchone()
    if row is None:
        raise PgsynapseError(f"no image model {model} (pgsynapse image-model list)")
    return row


def progress(conn: psycopg.Connection, model: int) -> tuple[int, int]:
    row = _run(conn, sql("image_model_progress"), {"model": model}).fetchone()
    return row["embedded"], row["total"]


def promote(conn: psycopg.Connection, model: int) -> dict[str, Any]:
    """Make a candidate the active model of its kind, once its vectors are complete."""
    row = get(conn, model)
    if row["status"] != "candidate":
        raise PgsynapseError(f"image model {model} is {row['status']}, only a candidate can be promoted")
    with conn.transaction():
        lock_table(conn, sql("lock_image_models"), "pgsynapse.image_models")
        done, total = progress(conn, model)
        if done < total:
            raise PgsynapseError(f"image model {model} has vectors for {done:,} of {total:,} images: wait until the "
                                 "worker has embedded them all (pgsynapse status), then promote")
        prev = _run(conn, sql("demote_active_image_model"), {"kind": row["kind"]}).fetchone()
        _run(conn, sql("activate_image_model"), {"model": model})
    return {"active": model, "previous": prev["id"] if prev else None, "kind": row["kind"]}


def retire(conn: psycopg.Connection, model: int) -> int:
    """Retire a model: its vectors and its index are dropped. An active model is retired only while no candidate of
    its kind waits (promote that one instead); retired, the last model of a kind leaves that kind's searches without
    a model, and the last of all stops the embedding of new images (they wait, pending, until a model is added).
    Returns the vectors deleted."""
    with conn.transaction():
        lock_table(conn, sql("lock_image_models"), "pgsynapse.image_models")  # no promote or add in between
        row = get(conn, model)
        if row["status"] == "retired":
            raise PgsynapseError(f"image model {model} is already retired: nothing to do")
        waiting = [m["id"] for m in serving(conn) if m["kind"] == row["kind"] and m["status"] == "candidate"]
        if row["status"] == "active" and waiting:
            raise PgsynapseError(f"image model {model} is active: promote another {row['kind']} model first "
                                 f"(pgsynapse image-model promote {waiting[0]}), or retire the candidates first to "
                                 f"stop {row['kind']} models altogether")
        _run(conn, sql("retire_image_model"), {"id": model})
        n = _run(conn, sql("delete_image_model_vectors"), {"id": model}).rowcount  # its index: a trigger drops it
    return n


def serving(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """The models images are embedded with: the active one of each kind and the candidates."""
    return list(_run(conn, sql("image_models_serving")).fetchall())


def list_models(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return list(_run(conn, sql("list_image_models")).fetchall())
