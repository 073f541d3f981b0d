"""Tokens for the embedding runtimes: the model's tokenizer without transformers where it can (:class:`FastTokenizer`),
the int64 inputs of an exported ONNX graph (:func:`pad_feeds`, :func:`onnx_feeds`), and the batching of texts by
token count so that little of each forward pass is padding (:func:`length_batches`). Used by
:class:`pgsynapse.models.OnnxEmbedder` and the INT8 export's calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pgsynapse.errors import ModelError


class FastTokenizer:
    """The model's ``tokenizer.json`` run by the ``tokenizers`` library, with the call interface of a transformers
    fast tokenizer for what pgsynapse uses (``__call__`` with special tokens, offsets, truncation, padding, numpy
    tensors). It keeps the ONNX runtimes free of transformers and torch (load in ~0.1 s instead of ~3 s); any other
    attribute is served by the transformers tokenizer, loaded on first use."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.model_max_length = int(cfg.get("model_max_length", 512)) if str(cfg.get("model_max_length", "")).isdigit() else 512
        self.pad_token_id = self._tok.token_to_id(cfg.get("pad_token") or "[PAD]") or 0
        self._hf: Any = None

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = True, return_offsets_mapping: bool = False,
                 truncation: bool = False, max_length: int | None = None, padding: bool = False,
                 return_tensors: str | None = None, **_: Any) -> dict[str, Any]:
        batch = [text] if isinstance(text, str) else list(text)
        encs = self._tok.encode_batch(batch, add_special_tokens=add_special_tokens)
        limit = (max_length or self.model_max_length) if truncation else None
        rows: dict[str, list[list[Any]]] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        if return_offsets_mapping:
            rows["offset_mapping"] = []
        for e in encs:
            ids, types, mask, offs = list(e.ids), list(e.type_ids), list(e.attention_mask), list(e.offsets)
            if limit is not None and len(ids) > limit:
                # keep the final special token (e.g. [SEP]) as transformers does
                keep_last = add_special_tokens and len(ids) > 0
                ids = ids[: limit - 1] + ids[-1:] if keep_last else ids[:limit]
                types = types[: limit - 1] + types[-1:] if keep_last else types[:limit]
                mask, offs = mask[:limit], offs[: limit - 1] + offs[-1:] if keep_last else offs[:limit]
            rows["input_ids"].append(ids)
            rows["token_type_ids"].append(types)
            rows["attention_mask"].append(mask)
            if return_offsets_mapping:
                rows["offset_mapping"].append([tuple(o) for o in offs])
        if padding:
            width = max((len(r) for r in rows["input_ids"]), default=0)
            for key, fill in (("input_ids", self.pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)):
                rows[key] = [r + [fill] * (width - len(r)) for r in rows[key]]
        if return_tensors == "np":
            return {k: np.asarray(v, dtype=np.int64) for k, v in rows.items() if k != "offset_mapping"}
        if isinstance(text, str):
            return {k: v[0] for k, v in rows.items()}
        return rows

    @property
    def backend(self) -> Any:
        """The ``tokenizers.Tokenizer`` (no truncation, no padding)."""
        return self._tok

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._hf is None:
            self._hf = _hf_tokenizer(self.path)
        return getattr(self._hf, name)


def _hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the tokenizer of {path}: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc


def load_tokenizer(path: Path) -> Any:
    """The model's fast tokenizer, without importing torch or transformers when ``tokenizer.json`` exists."""
    if (path / "tokenizer.json").exists():
        return FastTokenizer(path)
    return _hf_tokenizer(path)


def pad_feeds(rows: list[list[int]], pad_id: int, inputs: set[str]) -> dict[str, np.ndarray]:
    """The int64 ``inputs`` of an exported BERT-like graph for the token ids ``rows``, padded to the longest."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in feeds.items() if k in inputs}


def onnx_feeds(tokenizer: Any, texts: list[str], max_length: int, inputs: set[str]) -> dict[str, np.ndarray]:
    """:func:`pad_feeds` for ``texts`` (truncated to ``max_length`` tokens)."""
    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return pad_feeds(rows, int(getattr(tokenizer, "pad_token_id", None) or 0), inputs)


# a batch takes texts down to this fraction shorter than its longest (padding is work: sorting by characters
# instead of tokens padded the docs' chunks by 12-13 %, this by 1-2 %; batch sizes 4-32 run alike)
PAD_TOLERANCE = 0.1


def length_batches(lengths: list[int], batch_size: int, tolerance: float = PAD_TOLERANCE) -> list[list[int]]:
    """Indices of ``lengths`` (token counts) in batches of at most ``batch_size``, longest first, each batch's
    texts within ``tolerance`` of its longest, so little of each forward pass is padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]
        end = start + 1
        while end < len(order) and end - start < batch_size and longest - lengths[order[end]] <= tolerance * longest:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches
