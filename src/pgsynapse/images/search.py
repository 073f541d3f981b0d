"""Image search: by text (a CLIP model's text tower) and by example image (any image model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async

from pgsynapse.config import Settings
from pgsynapse.errors import PgsynapseError
from pgsynapse.images.decode import ImageLimits, decode
from pgsynapse.images.encoders import ImageModelCache
from pgsynapse.queries import q
from pgsynapse.search import check_search_text


@dataclass(frozen=True)
class ImageHit:
    image_id: int
    score: float
    caption: str | None
    source: str | None  # its path, or where it was ingested from
    mime_type: str | None
    width: int | None
    height: int | None
    document_id: int | None
    document_title: str | None


async def model_row(conn: psycopg.AsyncConnection, kinds: list[str], model: int | None) -> dict[str, Any]:
    if model is not None:
        row = await (await conn.execute(q("image_model_by_id", "images.sql"), {"id": model})).fetchone()
        if row is None:
            raise PgsynapseError(f"no image model {model} (pgsynapse image-model list)")
        if row["kind"] not in kinds:
            raise PgsynapseError(f"image model {model} is an {row['kind']!r} model; this search needs {' or '.join(kinds)}")
        if row["status"] == "retired":
            raise PgsynapseError(f"image model {model} is retired: its vectors are gone")
        return row
    row = await (await conn.execute(q("active_image_model", "images.sql"), {"kinds": kinds})).fetchone()
    if row is None:
        if kinds == ["clip"]:  # an image-only model may be active: it cannot read a text
            raise PgsynapseError("no active CLIP model: a search by text needs one (text and image towers; an "
                                 "image-only model such as EfficientNet searches by example: --like-image PATH); "
                                 "register one with `pgsynapse image-model add PATH --kind clip`")
        raise PgsynapseError("no active image model: this search needs one; register one with "
                             "`pgsynapse image-model add PATH`")
    return row


async def _knn(conn: psycopg.AsyncConnection, row: dict[str, Any], vector: np.ndarray, k: int) -> list[ImageHit]:
    await register_vector_async(conn)
    sql = q("search_images", "images.sql").replace("{dim}", str(int(row["dim"])))
    cur = await conn.execute(sql, {"query": vector, "model": row["id"], "k": k})
    return [ImageHit(**r) for r in await cur.fetchall()]


async def search_by_text(conn: psycopg.AsyncConnection, models: ImageModelCache, text: str, *, k: int = 5,
                         model: int | None = None,
                         max_chars: int = Settings.model_fields["max_question_chars"].default) -> list[ImageHit]:
    """Images nearest to ``text`` in a CLIP model's shared space. An empty ``text``, or one over ``max_chars``
    characters (``max_question_chars``'s default unless given), is an InputError, as in
    :func:`pgsynapse.search.search`."""
    check_search_text(text, max_chars)
    row = await model_row(conn, ["clip"], model)
    encoder = await anyio.to_thread.run_sync(models.get, row)
    vector = (await anyio.to_thread.run_sync(encoder.encode_texts, [text]))[0]
    return await _knn(conn, row, vector, k)


async def search_by_image(conn: psycopg.AsyncConnection, models: ImageModelCache, data: bytes, *, k: int = 5,
                          model: int | None = None, limits: ImageLimits = ImageLimits()) -> list[ImageHit]:
    """Images most like the image ``data``: the active plain image encoder, else the active CLIP model."""
    row = await model_row(conn, ["image", "clip"], model)
    image = decode(data, limits).image
    encoder = await anyio.to_thread.run_sync(models.get, row)
    vector = (await anyio.to_thread.run_sync(encoder.encode_images, [image]))[0]
    return await _knn(conn, row, vector, k)
