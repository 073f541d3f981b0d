"""The chunker with the model's real tokenizer (tokenizer files only, no weights)."""

from __future__ import annotations

import json

import pytest

from pgsynapse.chunking import Chunker, distinct
from pgsynapse.errors import InputError
from pgsynapse.export.sample import sample_texts
from pgsynapse.models import default_model_path
from pgsynapse.tokens import load_tokenizer


def test_short_text_is_one_chunk_with_title_prefix(tokenizer):
    ch = Chunker(tokenizer, 256, 32)
    [c] = ch.split("Title", "A short body.")
    assert c.text == "A short body." and c.embed_text == "Title\nA short body." and c.char_start == 0


def test_empty_and_whitespace_bodies_give_no_chunks(tokenizer):
    ch = Chunker(tokenizer, 256, 32)
    assert ch.split("t", "") == [] and ch.split("t", None) == [] and ch.split("t", " \n\t ") == []


def test_windows_respect_the_limit_overlap_and_prefer_sentence_breaks(tokenizer):
    body = " ".join(f"This is sentence number {i} of a long text." for i in range(200))
    ch = Chunker(tokenizer, 64, 8)
    chunks = ch.split("A title", body)
    assert len(chunks) > 10
    for c in chunks:
        assert len(tokenizer(c.embed_text)["input_ids"]) <= 64
        assert body[c.char_start:c.char_end] == c.text
    # most chunks end on a sentence
    assert sum(c.text.endswith(".") for c in chunks) >= len(chunks) - 2
    # neighbours overlap
    assert all(b.char_start < a.char_end for a, b in zip(chunks, chunks[1:]))


def test_distinct_keeps_the_first_of_each_repeated_text_numbered_again(tokenizer):
    body = "Intro sentence.\n\n" + "The same paragraph, said again and again.\n\n" * 40 + "A closing line."
    chunks = Chunker(tokenizer, 24, 0).split("T", body)
    unique = distinct(chunks)
    texts = [c.text for c in chunks]
    assert len(texts) > len(set(texts)) and [c.text for c in unique] == list(dict.fromkeys(texts))
    assert [c.ord for c in unique] == list(range(len(unique)))
    assert all(body[c.char_start:c.char_end] == c.text for c in unique)
    assert unique[0].text.startswith("Intro") and unique[-1].text.endswith("A closing line.")
    plain = Chunker(tokenizer, 24, 0).split("T", " ".join(f"Sentence {i} is new." for i in range(40)))
    assert distinct(plain) == plain


def test_a_long_title_is_capped_so_the_body_still_fits(tokenizer):
    ch = Chunker(tokenizer, 64, 8)
    chunks = ch.split("word " * 200, "body text " * 50)
    assert chunks and all(c.token_count <= 64 for c in chunks)


def test_text_without_spaces_or_in_other_scripts(tokenizer):
    ch = Chunker(tokenizer, 48, 4)
    for body in ["x" * 90, "数据库索引可以加快查询速度。" * 100, "Ελληνικά κείμενα " * 100, "🙂" * 60]:
        chunks = ch.split("t", body)
        assert chunks and all(c.token_count <= 48 for c in chunks)
        assert chunks[-1].char_end == len(body.rstrip())


def test_a_run_the_tokenizer_reads_as_one_unknown_token_is_in_no_chunk(tokenizer):
    """A hex dump in a page: over 100 characters without a space or punctuation is one [UNK] to WordPiece, and the
    chunk holding it held all of it (a 1.2 MB body was one chunk of 6 tokens). Chunks break around it."""
    ch = Chunker(tokenizer, 48, 4)
    before, blob, after = "Bytea values print in hex. " * 10, "deadbeef" * 50_000, " The output above is one value." * 10
    chunks = ch.split("t", before + blob + after)
    assert chunks and all(len(c.text) < 1_000 and "deadbeefdeadbeef" not in c.text for c in chunks)
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(before + blob + after)
    starts = [c.char_start for c in chunks]
    assert len(before) + len(blob) + 1 in starts  # the text after it starts a chunk of its own
    # nothing but such runs: nothing for the model to read, said so (the document fails with this error)
    for body in ["x" * 5000, "🙂" * 300, "QUJDRE" * 200_000 + "\n" + "ab" * 60]:
        with pytest.raises(InputError, match="the body has no text the model reads: [12] run"):
            ch.split("t", body)


def test_counts_known_from_the_body_tokens_equal_a_fresh_tokenization(tokenizer):
    """The default model's tokenizer as the ONNX runtimes load it (BERT WordPiece through ``tokenizers``) takes
    the fast path: a chunk on word boundaries is counted from the body's tokens, not tokenized again. Every
    chunk, fast or not, must equal the chunk of the always-retokenizing path, count included, on text that cuts
    words (no spaces, long words), accents, CJK and punctuation."""
    fast_tokenizer = load_tokenizer(default_model_path())
    body = "\n\n".join([
        " ".join(f"Sentence {i} talks about café, naïve façades and résumés (é/è/ê)." for i in range(40)),
        "x" * 3000,  # one unknown token: in no chunk, the chunks break around it
        "y" * 90,  # one long word of several tokens: windows may cut it mid-word
        "超長の日本語テキストが続きます。" * 60,
        " ".join("hyper-parameter/pg_stat_statements::regclass" for _ in range(80)),
        "Antidisestablishmentarianism " * 90,
    ])
    for limit, overlap in ((48, 4), (64, 8), (256, 0)):
        fast, slow = Chunker(fast_tokenizer, limit, overlap), Chunker(fast_tokenizer, limit, overlap)
        assert fast._words is not None  # the default tokenizer is word-local: the fast path is under test
        slow._words = None
        assert Chunker(tokenizer, limit, overlap)._words is None  # transformers' tokenizer: always tokenized again
        chunks = fast.split("Título: ünïcode", body)
        assert chunks == slow.split("Título: ünïcode", body)
        for c in chunks:
            assert c.token_count == len(tokenizer(c.embed_text)["input_ids"]) <= limit


def test_the_export_sample_leaves_out_a_page_the_worker_would_fail(tokenizer, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"title": "Dump", "text": "x" * 3000}) + "\n"
                      + json.dumps({"title": "Page", "text": "Real text here."}) + "\n")
    assert sample_texts(tokenizer, corpus=corpus, n_chunks=4) == (["Page\nReal text here."], ["Dump", "Page"])
