"""The ONNX runtimes' tokenizer (``tokenizers`` without transformers) gives exactly what the transformers one does."""

from __future__ import annotations

import numpy as np

from pgsynapse.chunking import Chunker
from pgsynapse.models import default_model_path
from pgsynapse.tokens import FastTokenizer, _hf_tokenizer

TEXTS = [
    "VACUUM reclaims storage occupied by dead tuples.\n\nIn normal PostgreSQL operation, tuples that are deleted "
    "or obsoleted by an update are not physically removed from their table.",
    "Ünïcödé — naïve café; tabs\tand  spaces, <html> & SELECT * FROM t WHERE x > 1;",
    "",
    "word " * 700,
]


def test_fast_tokenizer_matches_transformers():
    path = default_model_path()
    fast, hf = FastTokenizer(path), _hf_tokenizer(path)
    for text in TEXTS:
        assert fast(text)["input_ids"] == hf(text)["input_ids"]
        a = fast(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        b = hf(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == [tuple(o) for o in b["offset_mapping"]]
    a = fast(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="np")
    b = hf(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(a[key], b[key])
    assert [c.embed_text for c in Chunker(fast, 64, 8).split("Title", TEXTS[0] * 5)] == [
        c.embed_text for c in Chunker(hf, 64, 8).split("Title", TEXTS[0] * 5)
    ]
    # anything else is served by the transformers tokenizer
    assert fast.decode(b["input_ids"][0][:5]) == hf.decode(b["input_ids"][0][:5])
