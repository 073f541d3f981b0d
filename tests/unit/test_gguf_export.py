"""The GGUF export of a fine-tuned model (pgsynapse.textsql.gguf_export) on tiny synthetic GGUF files: the base's
metadata and unchanged tensors' bytes are kept, changed tensors come from the tuned weights, llama's q/k
permutation is undone and redone, and what cannot be exported is refused clearly."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

from pgsynapse.config import load_settings
from pgsynapse.handlers.base import Job
from pgsynapse.handlers.sql_retrain import SqlRetrainHandler, SqlRetrainWork
from pgsynapse.textsql.gguf_export import GgufExportError, _permute, export_gguf, main
from pgsynapse.textsql.train import export_candidate

HIDDEN, VOCAB, HEADS, KV_HEADS = 64, 16, 4, 2
HEAD_DIM = HIDDEN // HEADS
# GGUF name -> (transformers name, shape, base type)
TENSORS = {  # the head first, as in the Qwen file: its tied source (the embedding) is compared before its turn
    "output.weight": ("lm_head.weight", (VOCAB, HIDDEN), Q.Q8_0),
    "token_embd.weight": ("model.embed_tokens.weight", (VOCAB, HIDDEN), Q.Q8_0),
    "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", (HIDDEN,), Q.F32),
    "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN), Q.Q5_0),
    "blk.0.attn_q.bias": ("model.layers.0.self_attn.q_proj.bias", (HIDDEN,), Q.F32),
    "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q5_0),
    "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", (HIDDEN, 2 * HIDDEN), Q.Q8_0),
    "output_norm.weight": ("model.norm.weight", (HIDDEN,), Q.F32),
}


def write_base(path: Path, arch: str = "qwen2", seed: int = 0) -> dict[str, np.ndarray]:
    """A one-block GGUF with real-looking metadata (hyper-parameters, tokenizer, chat template); returns each
    tensor's dequantised value by GGUF name."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    values = {}
    for name, (_, shape, qtype) in TENSORS.items():
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
            values[name] = x
        else:
            raw = quantize(x, qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
            values[name] = dequantize(raw, qtype).reshape(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def write_tuned(directory: Path, values: dict[str, np.ndarray], *, llama: bool = False,
                drop: tuple[str, ...] = (), extra: dict[str, np.ndarray] | None = None) -> None:
    """A transformers-style directory holding ``values`` (GGUF names) under their transformers names; with
    ``llama`` the q/k rows are un-permuted, as transformers' GGUF loader does."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, v in values.items():
        if name in drop:
            continue
        if llama and name == "blk.0.attn_q.weight":
            v = _unpermute(v, HEADS, HEADS)
        if llama and name == "blk.0.attn_k.weight":
            v = _unpermute(v, HEADS, KV_HEADS)
        state[TENSORS[name][0]] = torch.from_numpy(np.ascontiguousarray(v))
    state.update({k: torch.from_numpy(v) for k, v in (extra or {}).items()})
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2"}))


def _unpermute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    n = n_head_kv if n_head != n_head_kv else n_head
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def fields(reader: GGUFReader) -> dict[str, object]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_an_unchanged_model_exports_byte_identical_to_its_base(tmp_path, arch):
    values = write_base(tmp_path / "base.gguf", arch)
    write_tuned(tmp_path / "tuned", values, llama=arch == "llama")
    report = export_gguf(tmp_path / "base.gguf", tmp_path / "tuned", tmp_path / "out.gguf")
    assert (report.replaced, report.kept, report.unmapped_kept) == ([], len(TENSORS), [])
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "base.gguf").read_bytes()


@pytest.mark.parametrize("quant,qtype", [("q8_0", Q.Q8_0), ("f16", Q.F16)])
def test_changed_tensors_come_from_the_tuned_weights_the_rest_keep_their_bytes(tmp_path, quant, qtype):
    values = write_base(tmp_path / "base.gguf")
    tuned = dict(values)
    rng = np.random.default_rng(1)
    tuned["blk.0.attn_q.weight"] = values["blk.0.attn_q.weight"] + 0.01 * rng.standard_normal((HIDDEN, HIDDEN),
                                                                                              dtype=np.float32)
    tuned["blk.0.attn_norm.weight"] = values["blk.0.attn_norm.weight"] * 1.5
    write_tuned(tmp_path / "tuned", tuned)
    report = export_gguf(tmp_path / "base.gguf", tmp_path / "tuned", tmp_path / "out.gguf", quant=quant)
    assert sorted(report.replaced) == ["blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
    assert report.replaced_as == {"F32": 1, qtype.name: 1}

    base, out = GGUFReader(str(tmp_path / "base.gguf")), GGUFReader(str(tmp_path / "out.gguf"))
    assert fields(out) == fields(base)  # architecture, hyper-parameters, tokenizer, chat template
    assert [t.name for t in out.tensors] == [t.name for t in base.tensors]
    old = {t.name: t for t in base.tensors}
    for t in out.tensors:
        if t.name in report.replaced:
            continue
        assert t.tensor_type == old[t.name].tensor_type and t.data.tobytes() == old[t.name].data.tobytes(), t.name
    new = {t.name: t for t in out.tensors}
    q = new["blk.0.attn_q.weight"]
    assert q.tensor_type == qtype
    back = dequantize(q.data, q.tensor_type).reshape(HIDDEN, HIDDEN)
    assert np.abs(back - tuned["blk.0.attn_q.weight"]).max() < (2e-3 if quant == "q8_0" else 1e-4)
    assert np.array_equal(new["blk.0.attn_norm.weight"].data, tuned["blk.0.attn_norm.weight"])  # F32 exactly


def test_llama_q_and_k_are_permuted_back_before_they_are_written(tmp_path):
    values = write_base(tmp_path / "base.gguf", "llama")
    tuned = dict(values)
    tuned["blk.0.attn_k.weight"] = values["blk.0.attn_k.weight"] + 0.01
    write_tuned(tmp_path / "tuned", tuned, llama=True)
    report = export_gguf(tmp_path / "base.gguf", tmp_path / "tuned", tmp_path / "out.gguf", quant="f16")
    assert report.replaced == ["blk.0.attn_k.weight"]  # q: unchanged once permuted back
    k = {t.name: t for t in GGUFReader(str(tmp_path / "out.gguf")).tensors}["blk.0.attn_k.weight"]
    assert np.abs(k.data.astype(np.float32) - tuned["blk.0.attn_k.weight"]).max() < 1e-4
    # the helper is llama.cpp's converter's permutation: the inverse of transformers' reverse permutation
    x = np.arange(HIDDEN * 4, dtype=np.float32).reshape(HIDDEN, 4)
    assert np.array_equal(_permute(_unpermute(x, HEADS, KV_HEADS), HEADS, KV_HEADS), x)


def test_tied_embeddings_give_the_head_the_tuned_embedding(tmp_path):
    values = write_base(tmp_path / "base.gguf")
    write_tuned(tmp_path / "same", values, drop=("output.weight",))
    report = export_gguf(tmp_path / "base.gguf", tmp_path / "same", tmp_path / "same.gguf")
    assert report.replaced == []  # the embedding did not change: the head keeps its own bytes
    tuned = dict(values, **{"token_embd.weight": values["token_embd.weight"] + 0.02})
    write_tuned(tmp_path / "tuned", tuned, drop=("output.weight",))
    report = export_gguf(tmp_path / "base.gguf", tmp_path / "tuned", tmp_path / "out.gguf")
    assert report.replaced == ["output.weight", "token_embd.weight"]
    head = {t.name: t for t in GGUFReader(str(tmp_path / "out.gguf")).tensors}["output.weight"]
    assert np.abs(dequantize(head.data, head.tensor_type) - tuned["token_embd.weight"]).max() < 2e-3


def test_an_unsupported_architecture_is_refused(tmp_path, capsys):
    values = write_base(tmp_path / "base.gguf", "gemma")
    write_tuned(tmp_path / "tuned", values)
    with pytest.raises(GgufExportError, match="architecture 'gemma' is not supported"):
        export_gguf(tmp_path / "base.gguf", tmp_path / "tuned", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    assert main(["--base", str(tmp_path / "base.gguf"), "--tuned", str(tmp_path / "tuned"),
                 "--out", str(tmp_path / "out.gguf")]) == 2
    assert "not supported" in capsys.readouterr().err


def test_a_shape_mismatch_or_a_foreign_tensor_is_refused(tmp_path):
    values = write_base(tmp_path / "base.gguf")
    write_tuned(tmp_path / "wide", dict(values, **{"blk.0.attn_q.bias": np.zeros(HIDDEN + 1, np.float32)}))
    with pytest.raises(GgufExportError, match=r"shape mismatch: tuned model.layers.0.self_attn.q_proj.bias"):
        export_gguf(tmp_path / "base.gguf", tmp_path / "wide", tmp_path / "out.gguf")
    write_tuned(tmp_path / "foreign", values, extra={"vision.patch.weight": np.zeros(4, np.float32)})
    with pytest.raises(GgufExportError, match="no qwen2 GGUF name"):
        export_gguf(tmp_path / "base.gguf", tmp_path / "foreign", tmp_path / "out.gguf")
    with pytest.raises(GgufExportError, match="no .safetensors file"):
        export_gguf(tmp_path / "base.gguf", tmp_path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_the_cli_prints_its_report(tmp_path, capsys):
    values = write_base(tmp_path / "base.gguf")
    write_tuned(tmp_path / "tuned", values)
    assert main(["--base", str(tmp_path / "base.gguf"), "--tuned", str(tmp_path / "tuned"),
                 "--out", str(tmp_path / "out.gguf")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["arch"], report["replaced"], report["kept"]) == ("qwen2", 0, len(TENSORS))


# -- the retrain's use of it (pgsynapse.textsql.train.export_candidate, handlers/sql_retrain.py) -------------------

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def test_the_retrain_registers_the_export_of_a_gguf_base_on_llama_cpp(tmp_path):
    values = write_base(tmp_path / "base.gguf")
    write_tuned(tmp_path / "cand", values)
    runtime, path, record = export_candidate(str(tmp_path / "base.gguf"), tmp_path / "cand", tmp_path, "q8_0")
    if not LLAMA_CPP:  # auto would not serve a GGUF on llama.cpp here: the directory serves
        assert (runtime, record) == ("transformers", {"skipped": "llama-cpp-python is not installed"})
        return
    assert (runtime, path) == ("llama-cpp", str(tmp_path / "cand" / "model.gguf"))
    assert (record["replaced"], record["kept"], record["type"]) == (0, len(TENSORS), "q8_0")
    assert (tmp_path / "cand" / "model.gguf").read_bytes() == (tmp_path / "base.gguf").read_bytes()


def test_the_retrain_keeps_the_directory_when_there_is_nothing_to_export_or_the_export_fails(tmp_path, capsys):
    values = write_base(tmp_path / "base.gguf")
    write_tuned(tmp_path / "cand", values)
    assert export_candidate(str(tmp_path / "cand"), tmp_path / "cand", tmp_path, "q8_0") == (
        "transformers", str(tmp_path / "cand"), {"skipped": "the base is not a GGUF model"})
    assert export_candidate(str(tmp_path / "base.gguf"), tmp_path / "cand", tmp_path, "off") == (
        "transformers", str(tmp_path / "cand"), {"skipped": "sql_retrain_gguf = off"})
    if not LLAMA_CPP:
        return
    write_base(tmp_path / "gemma.gguf", "gemma")
    runtime, path, record = export_candidate(str(tmp_path / "gemma.gguf"), tmp_path / "cand", tmp_path, "q8_0")
    assert (runtime, path) == ("transformers", str(tmp_path / "cand"))
    assert "GgufExportError: GGUF architecture 'gemma' is not supported" in record["error"]
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # relayed to the log by the parent
    assert event["event"] == "sql_gguf_export_failed" and event["error"] == record["error"]
    assert not (tmp_path / "cand" / "model.gguf").exists()


def test_the_handler_registers_what_the_trainer_says_serves(tmp_path):
    handler = SqlRetrainHandler(load_settings(environ={}))
    job = Job(1, "sql_retrain", 0, {}, 1, dt.datetime.now(dt.timezone.utc))
    work = SqlRetrainWork(job, None, None, 60, False)
    gguf = {"runtime": "llama-cpp", "path": str(tmp_path / "model.gguf"), "directory": str(tmp_path)}
    res = handler.judge(work, {"gate_outcomes": {"candidate": [True], "active": [False]}, "candidate_model": gguf},
                        tmp_path)
    assert (res["runtime"], res["path"]) == ("llama-cpp", gguf["path"])
    res = handler.judge(work, {"gate_outcomes": {"candidate": [True], "active": [False]}}, tmp_path)
    assert (res["runtime"], res["path"]) == ("transformers", str(tmp_path))  # metrics of an older trainer
