"""The agreement check: build the artifact of a runtime and measure how closely it reproduces the source model.

Agreement is measured on real text (:mod:`pgsynapse.export.sample`): for every question the top-10 chunks by
the source model and by the candidate are compared (mean overlap), and the cosine between both runtimes'
vectors of the same chunk is averaged. Below the threshold the artifact is refused with the figures.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgsynapse.config import DEFAULT_SAMPLE_CHUNKS, SAMPLE_CHUNKS_RANGE, SAMPLE_CHUNKS_WHY
from pgsynapse.errors import InputError, ModelError, SourceModelError
from pgsynapse.export.fp32 import export_fp32
from pgsynapse.export.quantize import SCHEMES, quantize_int8, scheme_error
from pgsynapse.export.sample import sample_texts
from pgsynapse.logs import get_logger
from pgsynapse.models import ONNX_FILES, Embedder, ModelSpec, load_embedder

log = get_logger(__name__)

DEFAULT_THRESHOLD = 0.95


@dataclass
class Agreement:
    """How closely a candidate runtime reproduces the source model on a sample."""

    overlap_at_10: float  # mean |top10_ref ∩ top10_cand| / 10 over the queries
    cosine_mean: float  # mean cosine(ref, cand) over the chunk vectors
    cosine_min: float
    query_cosine_mean: float
    n_chunks: int
    n_queries: int

    def passes(self, threshold: float) -> bool:
        return self.overlap_at_10 >= threshold


@dataclass
class ExportReport:
    runtime: str
    artifact_path: str
    agreement: Agreement
    threshold: float
    accepted: bool
    seconds: float
    size_bytes: int
    version_id: int | None = None
    source_version_id: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["agreement"] = asdict(self.agreement)
        return d


def agreement(ref: Embedder, cand: Embedder, chunks: list[str], queries: list[str], k: int = 10,
              ref_vectors: tuple[np.ndarray, np.ndarray] | None = None) -> Agreement:
    d_ref, q_ref = ref_vectors or (ref.encode(chunks, 32), ref.encode(queries, 32))
    d_c, q_c = cand.encode(chunks, 32), cand.encode(queries, 32)
    k = min(k, len(chunks))
    top_ref = np.argsort(-(q_ref @ d_ref.T), axis=1)[:, :k]
    top_c = np.argsort(-(q_c @ d_c.T), axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_c, strict=True)])
    cos = (d_ref * d_c).sum(axis=1)
    return Agreement(
        overlap_at_10=round(float(overlap), 4),
        cosine_mean=round(float(cos.mean()), 5),
        cosine_min=round(float(cos.min()), 5),
        query_cosine_mean=round(float((q_ref * q_c).sum(axis=1).mean()), 5),
        n_chunks=len(chunks),
        n_queries=len(queries),
    )


def export_and_check(
    source: ModelSpec,
    out_dir: Path,
    runtime: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    corpus: Path | None = None,
    questions: list[Path] | None = None,
    n_chunks: int = DEFAULT_SAMPLE_CHUNKS,
    threads: int = 0,
    scheme: str | None = None,
) -> ExportReport:
    """Build the artifact of ``runtime`` from the torch model ``source`` and measure its agreement.

    For ``onnx-int8`` without an explicit ``scheme`` the schemes are tried fastest first; the first one whose
    agreement passes is kept (every attempt's figures are in the report's options).
    """
    started = time.perf_counter()
    if runtime not in ONNX_FILES:
        raise ModelError(f"cannot export runtime {runtime!r}: choose one of {sorted(ONNX_FILES)}")
    if scheme is not None and scheme not in SCHEMES:
        raise scheme_error(scheme)  # before any work: a scheme recorded by an older release, say
    try:
        ref = load_embedder(source, threads=threads)
    except ModelError as exc:
        raise SourceModelError(str(exc)) from exc
    chunks, queries = sample_texts(ref.tokenizer, corpus=corpus, questions=questions, n_chunks=n_chunks + 96,
                                   chunk_tokens=min(256, ref.max_seq_length))
    # outlier channels and activation ranges are calibrated on text the agreement is not measured on: 96 more
    # chunks, and their first words as short, query-like inputs
    chunks, calibration = chunks[:n_chunks], chunks[n_chunks:]
    if len(chunks) < SAMPLE_CHUNKS_RANGE[0]:  # before the export: a check that cannot refuse is no check
        fix = (f"ask for {SAMPLE_CHUNKS_RANGE[0]} or more" if n_chunks < SAMPLE_CHUNKS_RANGE[0] else
               "give a corpus with more text, or leave --corpus out (the shipped docs)")
        raise InputError(f"{f'--corpus {corpus}' if corpus else 'the shipped docs'} gives {len(chunks)} chunks for "
                         f"the agreement check ({n_chunks} asked), fewer than {SAMPLE_CHUNKS_RANGE[0]} "
                         f"({SAMPLE_CHUNKS_WHY}): {fix}; nothing was exported")
    if not (out_dir / ONNX_FILES["onnx"]).exists():
        export_fp32(source.path, out_dir)
    calibration += [" ".join(c.split()[:12]) for c in calibration[:32]]
    ref_vectors = (ref.encode(chunks, 32), ref.encode(queries, 32))
    cand_spec = ModelSpec(source.version_id, source.name, out_dir, runtime, source.dim)
    tried: list[dict[str, Any]] = []
    schemes: list[str | None] = [None] if runtime == "onnx" else ([scheme] if scheme else list(SCHEMES))
    agr: Agreement | None = None
    for sch in schemes:
        if sch is not None:
            quantize_int8(out_dir, sch, calibration=calibration, threads=threads)
        cand = load_embedder(cand_spec, threads=threads, onnx_threads=threads)
        agr = agreement(ref, cand, chunks, queries, ref_vectors=ref_vectors)
        tried.append({"scheme": sch, "overlap_at_10": agr.overlap_at_10, "cosine_mean": agr.cosine_mean})
        log.info("export_scheme_checked", runtime=runtime, scheme=sch, overlap_at_10=agr.overlap_at_10,
                 cosine_mean=agr.cosine_mean)
        if agr.passes(threshold):
            break
    assert agr is not None
    graph = out_dir / ONNX_FILES[runtime]
    report = ExportReport(
        runtime=runtime, artifact_path=str(out_dir), agreement=agr, threshold=threshold,
        accepted=agr.passes(threshold), seconds=round(time.perf_counter() - started, 1),
        size_bytes=graph.stat().st_size, source_version_id=source.version_id,
        options={"scheme": tried[-1]["scheme"], "tried": tried},
    )
    log.info("model_exported", runtime=runtime, accepted=report.accepted, **asdict(agr))
    return report
