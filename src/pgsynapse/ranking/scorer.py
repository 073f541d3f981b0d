"""A loaded ranker: scores (question, passage) pairs with a cross-encoder (a transformers sequence classifier with
one label; higher is more relevant).

Two runtimes, as for the embedding models: ``onnx-int8`` (``model_int8.onnx`` beside the weights, ONNX Runtime,
the ``tokenizers`` library: no torch in the worker) and ``torch`` (transformers). Pairs are truncated on the
passage's side only (the question is never cut) to the ranker's ``max_length``, written by the trainer in
``pgsynapse_ranker.json``.

A ranker trained here is **residual**: its score of a passage is ``cosine_scale`` x the first stage's cosine
similarity plus the cross-encoder's logit (``cosine_scale`` in ``pgsynapse_ranker.json``; 0 for a plain
cross-encoder added by path). A fresh head gives near-equal logits, so training starts from the vector order and the
cross-encoder learns only where it should differ from it: with a few hundred feedback questions a plain
cross-encoder from MiniLM's weights stayed at chance (listwise loss ln 8 after 65 steps), a residual one starts
where the vector search is.

Each runtime's libraries are imported when a ranker on it is loaded: a worker on
``onnx-int8`` never imports torch (~1 s and ~300 MB).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pgsynapse.artifacts import local_artifact
from pgsynapse.errors import InputError, ModelError, RegistryError
from pgsynapse.logs import get_logger
from pgsynapse.ranking.registry import REGISTRY

log = get_logger(__name__)

META = "pgsynapse_ranker.json"
INT8_FILE = "model_int8.onnx"
DEFAULT_MAX_LENGTH = 256


def ranker_meta(path: Path) -> dict[str, Any]:
    """What the trainer wrote beside a ranker's weights (``max_length``, the recipe); {} when nothing."""
    meta = path / META
    return json.loads(meta.read_text()) if meta.exists() else {}


def check_ranker_dir(path: Path, runtime: str, what: str = "ranker") -> None:
    """A ranker directory as ``runtime`` loads it: a cross-encoder's (config.json), with ``model_int8.onnx`` for
    onnx-int8 (``pgsynapse ranker train`` writes both); raises :class:`ModelError` saying what is missing."""
    if not path.exists():
        raise ModelError(f"{what}: path does not exist: {path}")
    if not (path / "config.json").exists():
        raise ModelError(f"{what}: {path} is not a cross-encoder directory (no config.json)")
    if runtime == "onnx-int8" and not (path / INT8_FILE).exists():
        raise ModelError(f"{what}: no {INT8_FILE} in {path} for runtime onnx-int8: add it with --runtime torch, "
                         "or train one with `pgsynapse ranker train` (it exports INT8 when the two runtimes agree)")


class Ranker:
    """One ranker model; ``score`` is thread-safe and never touches the database. A recorded path that is not on
    this host is looked for under ``data_dir``'s models folder (:func:`~pgsynapse.artifacts.local_artifact`)."""

    def __init__(self, row: dict[str, Any], *, threads: int = 0, data_dir: str | Path | None = None) -> None:
        self.row = row
        self.path = local_artifact(row["path"], data_dir)
        self.runtime = row["runtime"]
        what = f"ranker {row['id']}" if row["id"] else "ranker"  # id 0: one being added (probe_ranker)
        if self.runtime not in ("onnx-int8", "torch"):
            raise ModelError(f"unknown ranker runtime {self.runtime!r} of {what}")
        check_ranker_dir(self.path, self.runtime, what)
        meta = ranker_meta(self.path)
        self.max_length = int(meta.get("max_length") or DEFAULT_MAX_LENGTH)
        self.cosine_scale = float(meta.get("cosine_scale") or 0.0)
        self._lock = threading.Lock()
        started = time.perf_counter()
        try:
            if self.runtime == "onnx-int8":
                self._load_onnx(threads)
            elif self.runtime == "torch":
                self._load_torch(threads, what)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the libraries raise on files that are not a ranker's
            text = " ".join(str(exc).split())[:300]
            raise ModelError(f"{what}: cannot load {self.path} as a cross-encoder ({self.runtime}): "
                             f"{type(exc).__name__}: {text}") from None
        log.info("ranker_loaded", ranker=row["id"], name=row.get("name"), runtime=self.runtime,
                 max_length=self.max_length, seconds=round(time.perf_counter() - started, 2))

    def _load_onnx(self, threads: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        graph = self.path / INT8_FILE
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # its threads sleep after a run instead of spinning: in a worker the embedding model's session runs right
        # before and after it on the same cores, and spinning threads of one session slow the other's run
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        tok.enable_truncation(self.max_length, strategy="only_second")
        pad = tok.token_to_id("[PAD]")
        tok.enable_padding(pad_id=pad if pad is not None else 0)
        self._tok = tok

    def _load_torch(self, threads: int, what: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        model, info = AutoModelForSequenceClassification.from_pretrained(str(self.path), local_files_only=True,
                                                                          output_loading_info=True)
        if info["missing_keys"]:  # transformers made them up at random: its scores would be noise
            missing = ", ".join(sorted(info["missing_keys"]))
            raise ModelError(f"{what}: {self.path} has no trained classification head ({missing} missing): is it a "
                             "cross-encoder (a sequence classifier of one label)? An embedding model is added with "
                             "`pgsynapse model add`, then as a ranker with `ranker add version:N`")
        self._model = model.eval()
        self._hf_tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)

    def score(self, question: str, passages: list[str]) -> np.ndarray:
        """One relevance score per passage (a logit: higher first)."""
        if not passages:
            return np.zeros(0, dtype=np.float32)
        return self.logits(question, passages)[:, 0]

    def logits(self, question: str, passages: list[str]) -> np.ndarray:
        """The model's outputs per passage, (len(passages), labels): one label for a ranker."""
        with self._lock:
            if self.runtime == "onnx-int8":
                encs = self._tok.encode_batch([(question, p) for p in passages])
                feeds = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                         "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                         "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
                logits = self._session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
            else:
                feats = self._hf_tok([question] * len(passages), passages, truncation="only_second",
                                     max_length=self.max_length, padding=True, return_tensors="pt")
                with self._torch.no_grad():
                    logits = self._model(**feats).logits.numpy()
        return np.asarray(logits, dtype=np.float32).reshape(len(passages), -1)


def probe_ranker(path: Path, runtime: str) -> None:
    """Load the ranker at ``path`` on ``runtime`` as the worker would and score one pair: raises
    :class:`ModelError` unless it is a cross-encoder giving one finite score per pair (`ranker add`)."""
    check_ranker_dir(path, runtime)
    ranker = Ranker({"id": 0, "name": path.name, "path": str(path), "runtime": runtime})
    out = ranker.logits("How do I make lookups by a column faster?",
                        ["An index on the column finds its rows without reading the whole table."])
    if out.shape[1] != 1:
        raise ModelError(f"ranker: {path} gives {out.shape[1]} scores per pair: a ranker gives one (a sequence "
                         "classifier with num_labels = 1, as `pgsynapse ranker train` writes)")
    if not np.isfinite(out).all():
        raise ModelError(f"ranker: {path} gives a non-finite score")


class RankerCache:
    """Rankers loaded once per process, by id, path and runtime (a re-exported ranker is loaded again)."""

    def __init__(self, threads: int = 0, *, data_dir: str | Path | None = None) -> None:
        self.threads = threads
        self.data_dir = data_dir
        self._loaded: dict[tuple[int, str, str], Ranker] = {}
        self._lock = threading.Lock()

    def get(self, row: dict[str, Any]) -> Ranker:
        key = (int(row["id"]), str(row["path"]), str(row["runtime"]))
        with self._lock:
            if key not in self._loaded:
                self._loaded = {k: v for k, v in self._loaded.items() if k[0] != key[0]}
                self._loaded[key] = Ranker(row, threads=self.threads, data_dir=self.data_dir)
            return self._loaded[key]


async def ranker_row(conn: Any, which: str | int | None) -> dict[str, Any] | None:
    """The registry row of ``which``: ``active`` (the active ranker, or None), ``none``, or a ranker id (any
    status but retired: a person may try a candidate or a rejected one)."""
    if which in (None, "none"):
        return None
    if which == "active":
        cur = await conn.execute(REGISTRY.sql("active_model"))
    else:
        try:
            cur = await conn.execute(REGISTRY.sql("model_by_id"), {"id": int(which)})
        except ValueError:
            raise InputError(f"--ranker must be active, none or a ranker id, not {which!r}") from None
    row = await cur.fetchone()
    if row is not None and not isinstance(row, dict):
        row = dict(zip([d.name for d in cur.description], row))
    if row is None and which != "active":
        raise RegistryError(f"no ranker {which}")
    if row is not None and row["status"] == "retired":
        raise RegistryError(f"ranker {which} is retired")
    return row


def passage_text(title: str | None, text: str) -> str:
    """What a ranker reads of a passage: its document's title, a newline, the passage (training and serving)."""
    return f"{title.strip()}\n{text}" if title and title.strip() else text


def rerank(ranker: Ranker, question: str, candidates: list[Any], text_of: Any, cosine_of: Any) -> list[Any]:
    """``candidates`` in the order of ``ranker`` (a :class:`Ranker`, or the trainer's model: anything with ``score`` and
    ``cosine_scale``; stable: equal scores keep the candidate order): its logit plus
    ``cosine_scale`` x the first stage's cosine similarity (``cosine_of``)."""
    scores = ranker.score(question, [text_of(c) for c in candidates])
    if ranker.cosine_scale:
        scores = scores + ranker.cosine_scale * np.array([float(cosine_of(c)) for c in candidates], dtype=np.float32)
    order = sorted(range(len(candidates)), key=lambda i: (-float(scores[i]), i))
    return [candidates[i] for i in order]
