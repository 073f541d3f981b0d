"""The distillation trainer: a student embedding model from a teacher version, in its own process.

Run by :func:`pgsynapse.learning.distill.distill` (``pgsynapse model distill``) as
``python -m pgsynapse.learning.distill_train`` with the JSON spec on stdin (it holds the database URL: a pipe,
never argv or the environment), watched by :func:`pgsynapse.learning.trainer_process.run_trainer` (memory and
time), like the retrain job's trainer.

- **Student**: the model at ``student_path`` (by default the active version's weights) with only ``layers`` of its
  transformer layers kept, evenly spaced and ending with the last one (6 -> 3 keeps layers 1, 3, 5). When the
  teacher's dimension differs (``projection``): "pca" (default) projects the teacher's vectors onto the student's
  dimension (the directions that keep most of their inner products), turned (Procrustes) towards the untrained
  student's own vectors of the same chunks so that training starts near them, and the student keeps its shape and
  its ONNX INT8 runtime; "dense" appends a linear layer to the teacher's dimension to the student (torch only: the
  ONNX export has no place for it).
- **Targets**: the teacher's own vectors of the corpus, read from the database (its stored chunk vectors: no
  corpus is encoded by the teacher), and of the questions users asked (encoded by the teacher's model). The
  feedback questions are left out of training: they are the gate's.
- **Loss**: squared distance between the student's unit vector and the teacher's (2 - 2 cos), AdamW with warm-up
  and linear decay, epochs until the wall-clock budget.
- **Evaluation for the gate** (learning/gate.py): the feedback questions (relevant page: the helpful passage's;
  groups: that page) and the canary set, the student searching its own vectors of the whole corpus, against the
  teacher searching its stored ones. The caller decides (non-inferiority: ``distill_margin``).
"""

from __future__ import annotations

import json
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import torch
from pgvector.psycopg import register_vector
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize
from sentence_transformers.util import batch_to_device

from pgsynapse.chunking import Chunker
from pgsynapse.learning.distill import DistillSpec
from pgsynapse.learning.gate import gate_metrics
from pgsynapse.learning.trainer_process import progress, read_spec
from pgsynapse.models import embedding_dimension, tokenized
from pgsynapse.queries import q


ROTATION_SAMPLE = 1000  # chunks the untrained student encodes to turn the PCA basis towards its own space


def kept_layers(n: int, k: int) -> list[int]:
    """``k`` of ``n`` layers, evenly spaced, the last one included: (6, 3) -> [1, 3, 5], (12, 4) -> [2, 5, 8, 11]."""
    if not 1 <= k <= n:
        raise ValueError(f"a student keeps between 1 and {n} layers of its {n}, not {k}")
    return sorted({n - 1 - round(i * n / k) for i in range(k)})


def build_student(path: str, layers: int, teacher_dim: int, projection: str, device: str = "cpu") -> SentenceTransformer:
    """The model at ``path`` with ``layers`` of its transformer layers; with ``projection`` "dense" and another
    dimension than the teacher's, a linear layer to ``teacher_dim`` is appended (and kept)."""
    model = SentenceTransformer(path, device=device, local_files_only=True)
    auto = model[0].auto_model
    stack = auto.encoder.layer
    keep = kept_layers(len(stack), layers)
    auto.encoder.layer = torch.nn.ModuleList([stack[i] for i in keep])
    auto.config.num_hidden_layers = len(keep)
    dim = embedding_dimension(model)
    if dim != teacher_dim and projection == "dense":
        mods = [m for m in model if not isinstance(m, Normalize)]
        proj = Dense(dim, teacher_dim, bias=False, activation_function=torch.nn.Identity())
        model = SentenceTransformer(modules=[*mods, proj, Normalize()], device=device)
    return model


def pca_projection(vectors: np.ndarray, dim: int) -> tuple[np.ndarray, float]:
    """The ``dim`` directions that keep the most of the teacher's inner products (uncentred SVD of its unit vectors,
    so cosine similarities survive the projection as well as ``dim`` dimensions allow), and the share of the
    squared norm they keep."""
    _, sing, vt = np.linalg.svd(vectors.astype(np.float64), full_matrices=False)
    energy = sing ** 2
    return vt[:dim].astype(np.float32), float(energy[:dim].sum() / energy.sum())


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation ``R`` (orthogonal) that brings ``source`` rows closest to ``target`` rows (``source @ R``).
    A PCA basis is arbitrary up to a rotation: turned towards the student's own vectors of the same texts, the
    teacher's projected vectors become targets the student starts near, instead of anywhere on the sphere."""
    u, _, vt = np.linalg.svd(source.T.astype(np.float64) @ target.astype(np.float64))
    return (u @ vt).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def load_data(spec: DistillSpec) -> dict[str, Any]:
    """What the trainer learns from and is judged on, from the database: ``chunks`` (id, document id, title, text)
    with ``vectors``, the teacher's stored vector of each (a float32 array), ``feedback`` (question, document id),
    ``questions`` (texts) and ``canary`` (question, document id)."""
    with psycopg.connect(spec.url, autocommit=True, prepare_threshold=None) as conn:  # db.NO_PREPARE
        register_vector(conn)
        chunks = conn.execute(q("distill_chunks", "learning.sql"), {"version": spec.teacher_version}).fetchall()
        feedback = conn.execute(q("distill_feedback", "learning.sql")).fetchall()
        questions = [r[0] for r in conn.execute(q("distill_questions", "learning.sql"), {"limit": spec.max_questions})]
        canary = conn.execute(q("canary_questions", "canary.sql")).fetchall()
    if not chunks:
        raise SystemExit(f"model version {spec.teacher_version} has no stored chunk vectors to distil from")
    if len(chunks) > spec.max_chunks:
        chunks = sorted(random.Random(spec.seed).sample(chunks, spec.max_chunks))
    return {"chunks": [tuple(r[:4]) for r in chunks],
            "vectors": np.stack([r[4].to_numpy().astype(np.float32) for r in chunks]),
            "feedback": feedback, "questions": questions, "canary": canary}


def _encode(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False).astype(np.float32)


def fit(spec: DistillSpec, student: SentenceTransformer, texts: list[str], targets: np.ndarray,
        deadline: float) -> dict[str, Any]:
    """Train ``student`` to give ``targets`` for ``texts``; stops at the last epoch or at ``deadline``."""
    rng = random.Random(spec.seed)
    steps_per_epoch = max(1, -(-len(texts) // spec.batch_size))
    total = steps_per_epoch * spec.epochs
    opt = torch.optim.AdamW(student.parameters(), lr=spec.lr)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / (total - warm + 1))))
    student.train()
    step, losses, stopped = 0, [], False
    for epoch in range(spec.epochs):
        order = list(range(len(texts)))
        rng.shuffle(order)
        for start in range(0, len(order), spec.batch_size):
            idx = order[start:start + spec.batch_size]
            features = batch_to_device(tokenized(student, [texts[i] for i in idx]), student.device)
            out = student(features)["sentence_embedding"]
            loss = ((out - torch.from_numpy(targets[idx]).to(out.device)) ** 2).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            progress("distill_step", step=step, steps=total, epoch=epoch, loss=round(float(np.mean(losses[-20:])), 5))
            if time.monotonic() > deadline:
                stopped = True
                break
        if stopped:
            break
    student.eval()
    return {"steps": step, "planned_steps": total, "stopped_at_budget": stopped,
            "first_loss": round(losses[0], 5) if losses else None,
            "final_loss": round(float(np.mean(losses[-20:])), 5) if losses else None}


def main(spec: DistillSpec, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluate and save the student; ``data`` as :func:`load_data` returns it, read from the database
    when None."""
    started = time.monotonic()
    if spec.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"distill_device is {spec.device!r} but torch {torch.__version__} sees no GPU on this host: "
                         "set distill_device = 'cpu' (or install a CUDA build of torch where there is one)")
    torch.manual_seed(spec.seed)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    data = load_data(spec) if data is None else data
    teacher = SentenceTransformer(spec.teacher_path, device=spec.device, local_files_only=True)
    chunker = Chunker(teacher.tokenizer, min(spec.chunk_tokens, teacher.max_seq_length), 0)
    rows = data["chunks"]
    texts = [chunker.embed_text(r[2], r[3]) for r in rows]
    chunk_docs = [r[1] for r in rows]
    teacher_chunks = data["vectors"]
    student = build_student(spec.student_path, spec.layers, teacher_chunks.shape[1], spec.projection, spec.device)
    order = list(range(len(texts)))
    random.Random(spec.seed).shuffle(order)
    held = sorted(order[:max(int(len(order) * spec.heldout_fraction), 1 if len(order) > 1 else 0)])
    train = sorted(order[len(held):])
    question_vecs = _encode(teacher, data["questions"]) if data["questions"] else \
        np.zeros((0, teacher_chunks.shape[1]), dtype=np.float32)
    # the student's targets: the teacher's vectors, or their projection to the student's dimension ("pca"): the
    # student then keeps its own shape and runtimes (ONNX INT8 has no place for an extra layer)
    student_dim = embedding_dimension(student)
    projection: dict[str, Any] = {"kind": "none"}
    chunk_targets = teacher_chunks
    if student_dim != teacher_chunks.shape[1]:
        projection = {"kind": spec.projection, "from_dim": int(teacher_chunks.shape[1]), "to_dim": student_dim}
        if spec.projection == "pca":
            if len(train) < student_dim:
                raise SystemExit(f"a PCA projection to {student_dim} dimensions needs at least {student_dim} chunks, "
                                 f"the corpus has {len(train)} to train on: use projection 'dense'")
            basis, kept = pca_projection(teacher_chunks[train], student_dim)
            # turned to where the untrained student already puts a sample of the chunks (Procrustes)
            sample = train[:: max(1, len(train) // ROTATION_SAMPLE)]
            own = _encode(student, [texts[i] for i in sample])
            rotation = procrustes(_unit(teacher_chunks[sample] @ basis.T), own)
            chunk_targets = _unit(teacher_chunks @ basis.T @ rotation)
            question_vecs = _unit(question_vecs @ basis.T @ rotation)
            projection["norm_kept"] = round(kept, 4)
            projection["start_cosine"] = round(float((own * chunk_targets[sample]).sum(axis=1).mean()), 4)
    train_texts = [texts[i] for i in train] + data["questions"]
    targets = np.concatenate([chunk_targets[train], question_vecs])
    progress("distill_data_loaded", chunks=len(texts), heldout_chunks=len(held), questions=len(data["questions"]),
             feedback=len(data["feedback"]), canary=len(data["canary"]), layers=spec.layers)
    # the budget covers training; encoding the corpus for the evaluation comes after it
    trained = fit(spec, student, train_texts, targets, started + spec.budget_seconds)

    progress("distill_evaluating", chunks=len(texts))
    student_chunks = _encode(student, texts)
    cos = (student_chunks[held] * chunk_targets[held]).sum(axis=1) if held else np.zeros(0)  # to its targets
    asked = [r[0] for r in data["feedback"]] + [r[0] for r in data["canary"]]
    relevant = [{r[1]} for r in data["feedback"]]
    metrics: dict[str, Any] = {
        "recipe": "distilled", "teacher_version": spec.teacher_version, "student_from": spec.student_path,
        "layers": spec.layers, "dim": int(student_chunks.shape[1]), "teacher_projection": projection,
        "device": spec.device,
        "train_texts": len(train_texts),
        **trained, "train_seconds": round(time.monotonic() - started, 1),
        "heldout_chunks": len(held), "heldout_cosine_mean": round(float(cos.mean()), 4) if held else None,
        "heldout_cosine_p05": round(float(np.percentile(cos, 5)), 4) if held else None,
    }
    if asked:
        metrics.update(gate_metrics(_encode(teacher, asked), _encode(student, asked), teacher_chunks, student_chunks,
                                    chunk_docs, heldout=(relevant, [next(iter(r)) for r in relevant]),
                                    canary=[r[1] for r in data["canary"]], k=spec.eval_k))
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save(str(out))
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    metrics["total_seconds"] = round(time.monotonic() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics))
    progress("distill_finished", **{k: v for k, v in metrics.items() if k != "gate_scores"})
    return metrics


if __name__ == "__main__":
    main(DistillSpec(**read_spec()))
