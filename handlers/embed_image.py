"""The ``embed_image`` job: decode an image row (limits checked before decoding) and embed it with every image
model being served (the active one of each kind and the candidates being built)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import psycopg

from pgsynapse.config import Settings
from pgsynapse.db import columns
from pgsynapse.errors import InputError, ModelError
from pgsynapse.handlers.base import Handler, Job, Outcome, WriteReport, describe, input_error, isolate
from pgsynapse.images.decode import Decoded, ImageLimits, decode, read_image_file
from pgsynapse.images.encoders import ImageModelCache
from pgsynapse.logs import get_logger
from pgsynapse.models import ModelCache
from pgsynapse.queries import q

log = get_logger(__name__)


def sql(name: str) -> str:
    return q(name, "images.sql")


@dataclass
class ImageWork:
    job: Job
    content_hash: str
    data: bytes | None
    path: str | None
    decoded: Decoded | None = None


@dataclass
class ImageResult:
    content_hash: str
    width: int
    height: int
    mime_type: str
    vectors: dict[int, np.ndarray]  # image model id -> (dim,)


class EmbedImageHandler(Handler[ImageWork]):
    kind = "embed_image"
    lock_rows_query = ("lock_image_rows", "images.sql")
    changed_since_query = ("image_changed_since", "images.sql")
    requeue_changed_query = ("requeue_changed_images", "images.sql")

    def __init__(self, settings: Settings, models: ModelCache) -> None:
        self.settings = settings
        self.limits = ImageLimits.of(settings)
        self.image_models = ImageModelCache(threads=settings.torch_threads, data_dir=settings.data_dir)
        self.serving: list[dict[str, Any]] = []

    async def refresh_versions(self, conn: psycopg.AsyncConnection) -> None:
        self.serving = list(await (await conn.execute(sql("image_models_serving"))).fetchall())
        self.image_models.evict_except(self.serving)

    async def warm_up(self, conn: psycopg.AsyncConnection) -> None:
        """Every served image model loads before the worker says it started, so the first image waits for nothing
        (one that cannot load stops the start, naming it: :meth:`embedders`)."""
        await self.refresh_versions(conn)
        await anyio.to_thread.run_sync(self.embedders)

    def embedders(self) -> list[Any]:
        """Load every served image model."""
        loaded = []
        for row in self.serving:
            try:
                loaded.append(self.image_models.get(row))
            except ModelError as exc:  # which registered model, and what the operator can do about it
                fix = (f"retire it (pgsynapse image-model retire {row['id']})" if row["status"] == "candidate" else
                       f"add and promote another {row['kind']} model, then retire this one")
                raise ModelError(f"image model {row['id']} ({row['name']}, {row['status']}): {exc}: restore its "
                                 f"files, or {fix}") from exc
        return loaded

    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[ImageWork], list[Outcome]]:
        await self.refresh_versions(conn)
        if not self.serving:
            # the rows stay pending, their bytes unread: registering a model queues every image again
            log.warning("images_waiting_for_model", n=len(jobs), hint="pgsynapse image-model add PATH")
            return [], [Outcome(j, skip_reason="no image model (none added, or all retired): pgsynapse image-model add PATH") for j in jobs]
        cur = await conn.execute(sql("load_images"), {"ids": [j.ref_id for j in jobs],
                                                      "max_bytes": self.settings.max_image_bytes})
        rows = {r["id"]: r for r in await cur.fetchall()}
        work, known = [], []
        for job in jobs:
            row = rows.get(job.ref_id)
            if row is None:
                known.append(Outcome(job, skip_reason="image deleted"))
            elif {m["id"] for m in self.serving} <= set(row["embedded_by"]):
                known.append(Outcome(job, skip_reason="already embedded: an earlier job read this content"))
            elif row["path"] is None and row["data"] is None:
                known.append(input_error(job, InputError(
                    f"image has {row['bytes']:,} bytes, over max_image_bytes={self.settings.max_image_bytes:,}"),
                    row["content_hash"]))
            else:
                work.append(ImageWork(job, row["content_hash"], row["data"], row["path"]))
        return work, known

    def compute(self, work: list[ImageWork]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        decoded: list[ImageWork] = []
        for item in work:
            try:
                data = item.data if item.data is not None else read_image_file(
                    item.path or "", self.settings.image_roots, self.limits)
                item.decoded = decode(bytes(data), self.limits)
                decoded.append(item)
            except InputError as exc:
                outcomes[item.job.id] = input_error(item.job, exc, item.content_hash)
            except Exception as exc:  # noqa: BLE001 - one row's error is that row's error
                outcomes[item.job.id] = Outcome(item.job, error=describe(exc), read_hash=item.content_hash)
        models = self.embedders()
        for item, res in zip(decoded, isolate(lambda items: self._encode(items, models), decoded), strict=True):
            if isinstance(res, BaseException):
                outcomes[item.job.id] = Outcome(item.job, error=describe(res), retry=not isinstance(res, InputError),
                                                read_hash=item.content_hash)
            else:
                outcomes[item.job.id] = Outcome(item.job, result=res)
            item.decoded = None  # the pixels are not needed past here
        return [outcomes[item.job.id] for item in work]

    def _encode(self, items: list[ImageWork], models: list[Any]) -> list[ImageResult]:
        images = [item.decoded.image for item in items if item.decoded]
        by_model = {m.spec.id: m.encode_images(images, self.settings.image_batch_size) for m in models}
        out = []
        for i, item in enumerate(items):
            d = item.decoded
            assert d is not None
            vectors = {mid: arr[i] for mid, arr in by_model.items()}
            for mid, v in vectors.items():
                if not np.isfinite(v).all():
                    raise ValueError(f"image model {mid} produced non-finite values")
            out.append(ImageResult(item.content_hash, d.width, d.height, d.mime_type, vectors))
        return out

    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        report = WriteReport()
        if not outcomes:
            return report
        cur = await conn.execute(sql("lock_images"), {"ids": [o.job.ref_id for o in outcomes]})
        rows = {r["id"]: r for r in await cur.fetchall()}
        computed = sorted({mid for o in outcomes for mid in o.result.vectors})
        cur = await conn.execute(sql("lock_image_models_written"), {"ids": computed})
        live = {r["id"] for r in await cur.fetchall()}
        fresh = []
        for o in outcomes:
            o.result.vectors = {mid: v for mid, v in o.result.vectors.items() if mid in live}  # none of a retired one
            row = rows.get(o.job.ref_id)
            if row is None or row["content_hash"] != o.result.content_hash:
                # changed or deleted while we computed: a newer job has the new content
                report.superseded.append(o.job.id)
            elif set(o.result.vectors) <= set(row["embedded_by"]):
                # a job of the same content wrote every one of these vectors first: nothing to do twice
                report.already_written.append(o.job.id)
            else:
                fresh.append(o)
        if not fresh:
            return report
        ids = [o.job.ref_id for o in fresh]
        await conn.execute(sql("delete_image_embeddings"), {"ids": ids})
        vectors = [(o.job.ref_id, mid, vec) for o in fresh for mid, vec in o.result.vectors.items()]
        if vectors:
            await conn.execute(sql("insert_image_embeddings"), columns(vectors, "images", "models", "embeddings"))
        res = [o.result for o in fresh]
        await conn.execute(sql("mark_images_embedded"), {
            "ids": ids, "widths": [r.width for r in res], "heights": [r.height for r in res],
            "mimes": [r.mime_type for r in res]})
        report.written.extend(o.job.id for o in fresh)
        return report

    @classmethod
    async def record_failure(cls, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        cur = await conn.execute(sql("mark_image_failed"), {"id": job.ref_id, "error": error})
        if cur.rowcount:
            await conn.execute(sql("notify_images"), {"ids": [job.ref_id], "status": "failed"})

    async def notify_written(self, conn: psycopg.AsyncConnection, report: WriteReport, jobs: dict[int, Job]) -> None:
        ids = [jobs[j].ref_id for j in report.written]
        if ids:
            await conn.execute(sql("notify_images"), {"ids": ids, "status": "embedded"})
