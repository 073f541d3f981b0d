"""Images (issue 22): the real pretrained image encoder (EfficientNet-Lite0) on 2,000 textile images.

Data: ``conformal-clip-data``'s simulated textiles, 3 classes (nominal 1,000 / local defect 500 / global defect
500 images, 250x250 JPEG). Model: :func:`pgsynapse.images.efficientnet.build` (TorchScript) and its ONNX export
(:func:`pgsynapse.images.export.export_onnx`; its agreement with torch is a result too).

1. Quality: image -> image same-class precision@5, leave-one-out kNN (cosine) over all images, per runtime;
   beside it, in the same run, a floor (raw-pixel 32x32 thumbnails, and chance) and a ceiling: the same
   EfficientNet features once the labels are used (a logistic-regression probe fitted on 4 folds; each held-out
   image's 5 nearest training images in the probe's class-probability space), with the probe's accuracy.
2. Speed on this machine's cores: images/s at batch 1 and 16 (the worker's ``image_batch_size``) for torch,
   ONNX and two INT8 quantisations of the ONNX export (dynamic; static QDQ calibrated on 64 images, no labels),
   forward alone (pre-made pixels) and end to end (JPEG bytes -> decode -> preprocess -> forward). The runtimes
   take turns batch by batch, so load from other processes slows them alike.
3. INSERT -> embedding: image rows inserted one at a time into a running worker, time to the
   ``pgsynapse_images`` NOTIFY ``{"id": ..., "status": "embedded"}`` (p50 / p95, beside the model's own time for
   one image).

    python -m bench.images [--quick] [--per-class N] [--inserts N]   (or: pgsynapse bench images --quick)

Needs ``pip install 'pgsynapse[images-bench]'`` (the two EfficientNet packages, conformal-clip-data, scikit-learn).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import psycopg
import structlog.testing
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image
from psycopg.rows import dict_row

from bench.common import ARTIFACTS, database, emit, machine, parser, pct, run_benchmark, table
from pgsynapse.config import load_settings
from pgsynapse.images import registry
from pgsynapse.images.decode import ImageLimits, decode
from pgsynapse.images.efficientnet import build
from pgsynapse.images.encoders import ImageEncoder, ImageModelSpec, Preprocess
from pgsynapse.images.export import export_onnx
from pgsynapse.listener.worker import Worker

CLASSES = ("nominal", "local", "global")
K = 5
BATCHES = (1, 16)  # 16: the worker's image_batch_size default


def dataset(per_class: int) -> tuple[list[bytes], np.ndarray, list[str]]:
    """JPEG bytes, class labels and file names: the first ``per_class`` of each class (0 = all)."""
    try:
        import conformal_clip_data as ccd
    except ImportError as exc:
        raise SystemExit("bench.images needs conformal-clip-data: pip install 'pgsynapse[images-bench]'") from exc
    root = ccd.textile_simulated_root()
    blobs, labels, names = [], [], []
    for label, cls in enumerate(CLASSES):
        files = sorted((root / cls).glob("*.jpg"))
        for f in files[: per_class or None]:
            blobs.append(f.read_bytes())
            labels.append(label)
            names.append(f"{cls}/{f.name}")
    return blobs, np.asarray(labels), names


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, k: int = K) -> tuple[float, list[float]]:
    """Leave-one-out kNN: the share of each image's k nearest others (cosine) in its class; overall and per class."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    hits = (labels[top] == labels[:, None]).mean(axis=1)
    return float(hits.mean()), [float(hits[labels == c].mean()) for c in range(len(CLASSES))]


def chance(labels: np.ndarray) -> float:
    """Expected precision@k of random neighbours (leave-one-out)."""
    n = len(labels)
    counts = np.bincount(labels)
    return float(sum(c / n * (c - 1) / (n - 1) for c in counts))


def thumbnails(images: list[Image.Image], side: int = 32) -> np.ndarray:
    """Raw pixels: each image shrunk to side x side RGB, centred on its own mean (the floor)."""
    x = np.stack([np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), np.float32).ravel() for im in images])
    return x - x.mean(axis=1, keepdims=True)


def supervised_ceiling(vectors: np.ndarray, labels: np.ndarray, folds: int = 5) -> tuple[float, float]:
    """What the same features give once labels are used (a ceiling for the unsupervised kNN): a logistic
    regression fitted on 4 folds; each held-out image's k nearest training images in its class-probability space
    (precision@k), and the probe's accuracy. (scikit-learn: the images-bench extra, imported here so the other
    parts run without it.)"""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    hits, correct = [], []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(vectors, labels):
        probe = LogisticRegression(max_iter=2000).fit(vectors[train], labels[train])
        ztr, zte = probe.predict_proba(vectors[train]), probe.predict_proba(vectors[test])
        d = -((zte[:, None, :] - ztr[None, :, :]) ** 2).sum(-1)
        top = np.argpartition(-d, K, axis=1)[:, :K]
        hits.extend((labels[train][top] == labels[test][:, None]).mean(axis=1))
        correct.extend(probe.predict(vectors[test]) == labels[test])
    return float(np.mean(hits)), float(np.mean(correct))


def quantize(onnx_dir: Path, out: Path, calibration: np.ndarray | None = None) -> Path:
    """ONNX Runtime's INT8 quantisation of the export: dynamic (weights int8, activations quantised at run time;
    ``calibration`` None), else static QDQ, per-channel weights, activation ranges from ``calibration`` pixels."""
    class Feeds(CalibrationDataReader):
        def __init__(self, x: np.ndarray) -> None:
            self.batches = iter([{"pixel_values": x[i : i + 8]} for i in range(0, len(x), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out.mkdir(parents=True, exist_ok=True)
    for f in onnx_dir.iterdir():
        if f.suffix != ".onnx":
            shutil.copy2(f, out / f.name)
    src, dst = str(onnx_dir / "model.onnx"), str(out / "model.onnx")
    # the quantiser's shape inference prints every tensor it cannot type to stdout: silenced (fd level: it is C++)
    with _quiet():
        if calibration is None:
            quantize_dynamic(src, dst, weight_type=QuantType.QUInt8)
        else:
            quant_pre_process(src, str(out / "pre.onnx"))
            quantize_static(str(out / "pre.onnx"), dst, Feeds(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            (out / "pre.onnx").unlink()
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def models(threads: int) -> dict[str, ImageEncoder]:
    """torch, onnx and onnx-int8 encoders of EfficientNet-Lite0 (built and exported under ARTIFACTS)."""
    base = ARTIFACTS / "efficientnet-lite0"
    if not (base / "model.pt").exists():
        s = time.perf_counter()
        build(base)
        emit("images", "build", path=str(base), seconds=round(time.perf_counter() - s, 2))
    onnx_dir = ARTIFACTS / "efficientnet-lite0-onnx"
    sample_blobs, _, _ = dataset(10)
    sample = [decode(b, ImageLimits()).image for b in sample_blobs]
    report = export_onnx(base, onnx_dir, sample=sample)
    emit("images", "onnx_export", sample=report.sample, min_cosine=report.min_cosine,
         mean_cosine=report.mean_cosine, onnx_mb=report.onnx_mb, seconds=report.seconds)
    dynamic = quantize(onnx_dir, ARTIFACTS / "efficientnet-lite0-onnx-int8-dynamic")
    blobs, _, _ = dataset(0)
    pick = np.random.default_rng(1).permutation(len(blobs))[:64]  # no labels used: activation ranges only
    calibration = Preprocess.load(onnx_dir)([decode(blobs[i], ImageLimits()).image for i in pick])
    static = quantize(onnx_dir, ARTIFACTS / "efficientnet-lite0-onnx-int8-static", calibration)
    specs = {"torch": (base, "torch"), "onnx": (onnx_dir, "onnx"), "onnx-int8-dynamic": (dynamic, "onnx"),
             "onnx-int8-static": (static, "onnx")}
    return {name: ImageEncoder(ImageModelSpec(0, name, "image", path, runtime, 1280), threads=threads)
            for name, (path, runtime) in specs.items()}


def speed(encoders: dict[str, ImageEncoder], blobs: list[bytes], rounds: int) -> None:
    """images/s per runtime at batch 1 and 16: forward alone and end to end. The runtimes take turns batch by
    batch (each batch is run by every runtime before the next), so load from others slows them alike."""
    limits = ImageLimits()
    images = [decode(b, limits).image for b in blobs]
    pixels = next(iter(encoders.values())).preprocess(images)  # one preprocessing config for all three
    n1 = max(8, len(blobs) // 8)
    results: dict[tuple[str, str, int], list[float]] = {}

    def forward(enc: ImageEncoder, i: int, batch: int) -> None:
        enc._forward(pixels[i : i + batch])

    def end_to_end(enc: ImageEncoder, i: int, batch: int) -> None:
        enc.encode_images([decode(b, limits).image for b in blobs[i : i + batch]], batch_size=batch)

    for enc in encoders.values():  # warm each runtime at both batch sizes (TorchScript optimises after a few calls)
        for batch in BATCHES:
            for _ in range(3):
                enc._forward(pixels[:batch])
    for _ in range(rounds):
        for what, fn in (("forward", forward), ("end_to_end", end_to_end)):
            for batch in BATCHES:
                n = n1 if batch == 1 else len(blobs)
                spent = dict.fromkeys(encoders, 0.0)
                for i in range(0, n, batch):
                    for name, enc in encoders.items():
                        s = time.perf_counter()
                        fn(enc, i, batch)
                        spent[name] += time.perf_counter() - s
                for name, secs in spent.items():
                    results.setdefault((name, what, batch), []).append(n / secs)
    # decode and preprocess alone (CPU work every runtime shares)
    s = time.perf_counter()
    decoded = [decode(b, limits).image for b in blobs]
    decode_s = time.perf_counter() - s
    s = time.perf_counter()
    next(iter(encoders.values())).preprocess(decoded)
    pre_s = time.perf_counter() - s
    emit("images", "decode_preprocess", n=len(blobs), decode_ms_per_image=round(1000 * decode_s / len(blobs), 3),
         preprocess_ms_per_image=round(1000 * pre_s / len(blobs), 3))
    torch_rate = {(what, b): statistics.median(v) for (name, what, b), v in results.items() if name == "torch"}
    for (name, what, batch), rates in results.items():
        med = statistics.median(rates)
        emit("images", f"images_per_s_{what}", runtime=name, batch=batch, images_per_s=round(med, 2),
             ms_per_image=round(1000 / med, 2), x_torch=round(med / torch_rate[(what, batch)], 2),
             rounds=len(rates), n=n1 if batch == 1 else len(blobs))


def quality(encoders: dict[str, ImageEncoder], blobs: list[bytes], labels: np.ndarray) -> None:
    images = [decode(b, ImageLimits()).image for b in blobs]
    emit("images", "precision_at_5", method="chance (floor)", p_at_5=round(chance(labels), 4), n=len(labels))
    p, per = precision_at_k(thumbnails(images), labels)
    emit("images", "precision_at_5", method="raw pixels 32x32 (floor)", p_at_5=round(p, 4),
         **{c: round(x, 4) for c, x in zip(CLASSES, per, strict=True)}, n=len(labels))
    vectors = {}
    for name, enc in encoders.items():
        vectors[name] = enc.encode_images(images)
        p, per = precision_at_k(vectors[name], labels)
        cos = np.sum(vectors[name] * vectors["torch"], axis=1)
        same_top = _same_neighbours(vectors[name], vectors["torch"])
        emit("images", "precision_at_5", method=f"efficientnet-lite0 {name}", p_at_5=round(p, 4),
             **{c: round(x, 4) for c, x in zip(CLASSES, per, strict=True)}, n=len(labels),
             min_cosine_vs_torch=round(float(cos.min()), 5), top5_overlap_vs_torch=round(same_top, 4))
    ceiling, accuracy = supervised_ceiling(vectors["torch"], labels)
    emit("images", "precision_at_5", method="efficientnet-lite0 + linear probe on labels, 5-fold (ceiling)",
         p_at_5=round(ceiling, 4), probe_accuracy=round(accuracy, 4), n=len(labels))


def _same_neighbours(a: np.ndarray, b: np.ndarray, k: int = K) -> float:
    """Mean share of each image's k nearest neighbours that two embeddings agree on."""
    def top(v: np.ndarray) -> np.ndarray:
        s = v @ v.T
        np.fill_diagonal(s, -np.inf)
        return np.argpartition(-s, k, axis=1)[:, :k]

    ta, tb = top(a), top(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)]))


def insert_latency(args: argparse.Namespace, blobs: list[bytes], enc: ImageEncoder, runtime: str, n: int) -> None:
    """INSERT -> ``embedded`` NOTIFY through the real trigger and an in-process worker (needs migration 0015)."""
    model_ms = []
    for b in blobs[:n]:
        s = time.perf_counter()
        enc.encode_images([decode(b, ImageLimits()).image], batch_size=1)
        model_ms.append((time.perf_counter() - s) * 1000)
    with database(args.database_url) as url:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            row = registry.add(conn, enc.spec.path, name=f"efficientnet-lite0-{runtime}")
        assert row["status"] == "active", row  # the first image model of its kind is active at once
        # only this job kind, and the text model left on torch (no ONNX export of it at the worker's start)
        settings = load_settings(environ={}, database_url=url, runtime="torch", kinds=("embed_image",))
        lat: list[float] = []

        async def run() -> None:
            worker = Worker(settings, url)
            async with anyio.create_task_group() as tg:
                await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute("LISTEN pgsynapse_images")
                    for i, b in enumerate(blobs[: n + 5]):
                        s = time.perf_counter()
                        cur = await conn.execute(
                            "INSERT INTO pgsynapse.images (data, mime_type) VALUES (%s, 'image/jpeg') RETURNING id", (b,))
                        image_id = (await cur.fetchone())[0]
                        status = None
                        async for note in conn.notifies(timeout=120):
                            payload = json.loads(note.payload)
                            if payload.get("id") == image_id:
                                status = payload.get("status")
                                break
                        if status != "embedded":
                            raise RuntimeError(f"image {image_id}: {status or 'no NOTIFY within 120 s'}")
                        if i >= 5:  # the first five warm the worker's paths
                            lat.append((time.perf_counter() - s) * 1000)
                worker.request_stop()

        # the worker's own account of each batch (batch_processed: load + decode + encode, then + write)
        with structlog.testing.capture_logs() as logs:
            anyio.run(run)
    batches = [e for e in logs if e["event"] == "batch_processed" and e.get("kind") == "embed_image"][5:]
    emit("images", "insert_to_embedding", runtime=runtime, n=len(lat), p50_ms=round(pct(lat, 50), 2),
         p95_ms=round(pct(lat, 95), 2), model_p50_ms=round(pct(model_ms, 50), 2),
         p50_over_model_ms=round(pct(lat, 50) - pct(model_ms, 50), 2),
         worker_compute_p50_ms=round(pct([e["compute_ms"] for e in batches], 50), 2),
         worker_total_p50_ms=round(pct([e["total_ms"] for e in batches], 50), 2),
         worker_batches=len(batches))


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--per-class", type=int, default=0, help="images per class (default all: 1000/500/500; --quick 50)")
    p.add_argument("--speed-images", type=int, default=0, help="images of the speed runs (default 256, --quick 32)")
    p.add_argument("--rounds", type=int, default=0, help="speed rounds, median taken (default 3, --quick 1)")
    p.add_argument("--inserts", type=int, default=0, help="single-row INSERTs of the latency run (default 100, --quick 20; -1 skips it)")
    p.add_argument("--parts", type=lambda v: v.split(","), default=["quality", "speed", "latency"],
                   help="comma-separated parts to run (default quality,speed,latency)")
    args = p.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    per_class = args.per_class or (50 if args.quick else 0)
    emit("images", "machine", **machine(), threads=threads)
    blobs, labels, _ = dataset(per_class)
    encoders = models(threads)
    if "quality" in args.parts:
        quality(encoders, blobs, labels)
    rng = np.random.default_rng(0)
    if "speed" in args.parts:
        pick = rng.permutation(len(blobs))[: args.speed_images or (32 if args.quick else 256)]
        speed(encoders, [blobs[i] for i in pick], args.rounds or (1 if args.quick else 3))
    n_insert = args.inserts or (20 if args.quick else 100)
    if "latency" in args.parts and n_insert > 0:
        insert_latency(args, [blobs[i] for i in rng.permutation(len(blobs))], encoders["onnx"], "onnx", n_insert)
    table()


if __name__ == "__main__":
    run_benchmark(main)
