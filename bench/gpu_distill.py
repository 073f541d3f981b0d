"""Issue 20's teacher and student runs with the torch work on a GPU: all-mpnet-base-v2's vectors of the whole docs
corpus, and the two students the goals name, trained by the product's own trainer
(:func:`pgsynapse.learning.distill_train.main`, ``device="cuda"``) on a machine that cannot reach the database.

On these 2 cores mpnet encodes about 1 chunk/s (the corpus's 7,087 chunks: about 2 hours) and a full 3-epoch
distillation takes an hour or more; a GPU does both in minutes. Nothing here is a dependency of pgsynapse: the
product's own paths (``model add`` + the worker's backfill, ``model distill``) are the same code on the CPU.

1. ``dump`` (here): a clone of the corpus template with the train file's feedback put in as rows (bench/learning.py,
   as bench/models.py does), read by the trainer's own :func:`load_data` (teacher = version 1) into ``DIR``:
   ``data.json.gz`` (chunks, feedback, canary) and ``v1.npy`` (version 1's stored vectors), plus the torch weights
   of MiniLM (v1) and mpnet as float16 safetensors cut into pieces (``--piece-mb``), so that they travel in
   several calls.
2. ``run`` (on the GPU machine, from the pieces): mpnet's vector of every chunk (the text the backfill gives it:
   :meth:`pgsynapse.chunking.Chunker.embed_text` with mpnet's tokenizer; float32 weights, float32 arithmetic), then
   ``distill_train.main`` twice: a 3-layer student of MiniLM with v1's vectors as targets, a 6-layer one with
   mpnet's (PCA + Procrustes to 384-d). Each student is saved as a sentence-transformers directory with float16
   weights, with its ``metrics.json``.
3. ``load`` (here): the students back to float32 directories (``bench.models --student DIR`` registers, exports
   and measures them) and mpnet's vectors into a teacher version (``bench.teacher``'s ``--vectors``).

    python -m bench.gpu_distill dump --out .xfer
    python -m bench.gpu_distill run --src .xfer --out $OUT              # where a GPU is
    python -m bench.gpu_distill load --src DIR_OF_RETURNED_FILES --out /tmp/pgsynapse-bench-models/gpu
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from sentence_transformers import SentenceTransformer

from pgsynapse.chunking import Chunker
from pgsynapse.learning.distill import DistillSpec
from pgsynapse.learning.distill_train import main as train

# ``dump``, ``check`` and their database and corpus modules are imported where they run: the GPU machine has
# none of the database's packages (only the wheels carried for pgsynapse's own imports)

PIECE_MB = 15  # a returned file is at most 16 MiB
MODELS = ("minilm", "mpnet")


def _split(path: Path, out: Path, piece_mb: int) -> list[str]:
    """``path`` cut into ``out/NAME.partNN`` files of ``piece_mb`` MB."""
    names, size = [], piece_mb * 1_000_000
    with path.open("rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(size), b"")):
            name = f"{out.name}.part{i:02d}"
            (out.parent / name).write_bytes(chunk)
            names.append(name)
    return names


def _join(src: Path, prefix: str, dest: Path) -> None:
    parts = sorted(src.glob(f"{prefix}.part*"))
    if not parts:
        raise SystemExit(f"no {prefix}.part* in {src}")
    with dest.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())


def _half_weights(model_dir: Path, dest: Path) -> None:
    """A copy of a sentence-transformers directory whose safetensors weights are float16 (half the bytes)."""
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.onnx", "*.bin", "onnx", "openvino", "*.h5"),
                    dirs_exist_ok=True)
    weights = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    safetensors.torch.save_file({k: (v.half() if v.is_floating_point() else v).contiguous()
                                 for k, v in weights.items()}, str(dest / "model.safetensors"))


def _full_weights(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    weights = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file({k: (v.float() if v.is_floating_point() else v).contiguous()
                                 for k, v in weights.items()}, str(path))


def _pack(model_dir: Path, out: Path, name: str, piece_mb: int) -> list[str]:
    """``model_dir`` as ``name.tar`` pieces in ``out``."""
    archive = shutil.make_archive(str(out / name), "tar", root_dir=model_dir)
    names = _split(Path(archive), out / f"{name}.tar", piece_mb)
    Path(archive).unlink()
    return names


def _unpack(src: Path, name: str, dest: Path) -> Path:
    tar = dest.parent / f"{name}.tar"
    dest.parent.mkdir(parents=True, exist_ok=True)
    _join(src, f"{name}.tar", tar)
    shutil.unpack_archive(str(tar), str(dest), "tar")
    tar.unlink()
    return dest


def dump(args: argparse.Namespace) -> None:
    import psycopg
    from psycopg.rows import dict_row

    from bench.common import questions
    from bench.corpusdb import corpus_clone, on_corpus_server
    from bench.learning import _feedback
    from bench.mpnet import mpnet_path
    from pgsynapse.export import source_model_path
    from pgsynapse.learning.distill_train import load_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def go() -> None:
        with corpus_clone(limit=args.pages) as (url, info):
            with psycopg.connect(url, autocommit=True) as conn:  # bench.learning reads tuples
                _feedback(conn, questions("pg_docs_train.jsonl"))
                v1 = conn.cursor(row_factory=dict_row).execute(
                    "SELECT * FROM pgsynapse.model_versions WHERE id = 1").fetchone()
            data = load_data(DistillSpec(url=url, teacher_version=1, teacher_path="", student_path="", out_dir=""))
            np.save(out / "v1.npy", data.pop("vectors"))
            with gzip.open(out / "data.json.gz", "wt") as f:
                json.dump({k: [list(r) if isinstance(r, tuple) else r for r in v] for k, v in data.items()}
                          | {"corpus": info}, f, default=str)
            minilm = Path(source_model_path(v1, None))
        tmp = out / "tmp"
        for name, path in (("minilm", minilm), ("mpnet", mpnet_path())):
            _half_weights(path, tmp / name)
            print(name, path, _pack(tmp / name, out, name, args.piece_mb))
        shutil.rmtree(tmp)

    on_corpus_server(args.database_url, go)


def run(args: argparse.Namespace) -> None:
    src, out, work = Path(args.src), Path(args.out), Path(args.work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 arithmetic, as on the CPU
    torch.backends.cudnn.allow_tf32 = False
    paths = {}
    for name in MODELS:
        paths[name] = _unpack(src, name, work / name)
        _full_weights(paths[name])
    with gzip.open(src / "data.json.gz", "rt") as f:
        data = json.load(f)
    data.pop("corpus", None)
    data = {k: [tuple(r) if isinstance(r, list) else r for r in v] for k, v in data.items()}
    v1 = np.load(src / "v1.npy")
    if args.limit:
        data["chunks"], v1 = data["chunks"][:args.limit], v1[:args.limit]
    print(json.dumps({"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                      "chunks": len(data["chunks"]), "feedback": len(data["feedback"]), "canary": len(data["canary"])}))

    started = time.perf_counter()
    mpnet = SentenceTransformer(str(paths["mpnet"]), device=device, local_files_only=True)
    chunker = Chunker(mpnet.tokenizer, min(args.chunk_tokens, mpnet.max_seq_length), 0)
    texts = [chunker.embed_text(title, text) for _, _, title, text in data["chunks"]]
    vectors = mpnet.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False).astype(np.float32)
    half = len(vectors) // 2
    np.save(out / "mpnet_ids.npy", np.array([c[0] for c in data["chunks"]], dtype=np.int64))
    np.save(out / "mpnet_a.npy", vectors[:half])
    np.save(out / "mpnet_b.npy", vectors[half:])
    print(json.dumps({"mpnet_vectors": vectors.shape, "seconds": round(time.perf_counter() - started, 1)}))
    del mpnet
    students = {"s3": (1, paths["minilm"], 3, v1), "s6mpnet": (2, paths["mpnet"], 6, vectors)}
    for name, (teacher_version, teacher_path, layers, targets) in students.items():
        if args.only and name not in args.only:
            continue
        spec = DistillSpec(url="", teacher_version=teacher_version, teacher_path=str(teacher_path),
                           student_path=str(paths["minilm"]), out_dir=str(work / name), layers=layers,
                           chunk_tokens=args.chunk_tokens, epochs=args.epochs, budget_seconds=args.budget_seconds,
                           device=device)
        metrics = train(spec, {**data, "vectors": targets})
        print(json.dumps({"student": name, **{k: v for k, v in metrics.items() if k != "gate_scores"}}))
        _half_weights(work / name, work / f"{name}-half")
        shutil.copy(work / name / "metrics.json", work / f"{name}-half" / "metrics.json")
        print(name, _pack(work / f"{name}-half", work, name, args.piece_mb))


def load(args: argparse.Namespace) -> None:
    src, out = Path(args.src), Path(args.out)
    for name in ("s3", "s6mpnet"):
        if any(src.glob(f"{name}.tar.part*")):
            dest = _unpack(src, name, out / name)
            _full_weights(dest)
            print(name, dest)
    if (src / "mpnet_a.npy").exists():
        vectors = np.concatenate([np.load(src / "mpnet_a.npy"), np.load(src / "mpnet_b.npy")])
        np.save(out / "mpnet_vectors.npy", vectors)
        shutil.copy(src / "mpnet_ids.npy", out / "mpnet_ids.npy")
        print("mpnet vectors", vectors.shape, out / "mpnet_vectors.npy")
        if args.check and args.data:
            check(vectors, Path(args.data), args.check)


def check(vectors: np.ndarray, data_file: Path, n: int) -> None:
    """The GPU's vectors of ``n`` random chunks against the product's torch embedder's on this CPU (cosine)."""
    from bench.mpnet import mpnet_path
    from pgsynapse.models import ModelSpec, load_embedder

    with gzip.open(data_file, "rt") as f:
        chunks = json.load(f)["chunks"]
    pick = sorted(random.Random(0).sample(range(len(chunks)), n))
    path = mpnet_path()
    embedder = load_embedder(ModelSpec(2, "mpnet", path, "torch", 768))
    chunker = Chunker(embedder.tokenizer, min(256, embedder.max_seq_length), 0)
    cpu = embedder.encode([chunker.embed_text(chunks[i][2], chunks[i][3]) for i in pick], 8)
    cos = (cpu * vectors[pick]).sum(axis=1)
    print(json.dumps({"check_chunks": n, "cosine_min": round(float(cos.min()), 6),
                      "cosine_mean": round(float(cos.mean()), 6)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--out", required=True)
    d.add_argument("--pages", type=int, help="a smaller corpus (checks the code path)")
    d.add_argument("--piece-mb", type=int, default=60)
    d.add_argument("--database-url")
    r = sub.add_parser("run")
    r.add_argument("--src", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/pgsynapse-gpu")
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--budget-seconds", type=float, default=1800.0)
    r.add_argument("--chunk-tokens", type=int, default=256)
    r.add_argument("--limit", type=int, help="the first N chunks only (checks the code path)")
    r.add_argument("--only", nargs="*", help="students to train (s3, s6mpnet)")
    r.add_argument("--piece-mb", type=int, default=PIECE_MB)
    lo = sub.add_parser("load")
    lo.add_argument("--src", required=True)
    lo.add_argument("--out", required=True)
    lo.add_argument("--data", help="dump's data.json.gz: with --check, compares mpnet's vectors with this CPU's")
    lo.add_argument("--check", type=int, default=0, help="chunks to compare")
    args = p.parse_args()
    {"dump": dump, "run": run, "load": load}[args.command](args)


if __name__ == "__main__":
    main()
