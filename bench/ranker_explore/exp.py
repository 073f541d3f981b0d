"""Exploration behind BENCHMARKS.md "ranker (issue 20 part 3)", kept to make its figures reproducible (a helper's
script, standalone: it does not go through the product's ranker code; bench/ranker.py does).

Second-stage ranker experiment (issue 20 part 3): a cross-encoder from the MiniLM weights, trained on the train
feedback (+ optional corpus pairs), reranking v1's top-N chunks of the docs corpus; page recall@5 / MRR@10 on the
dev halves (tune: choose, report: headline); ONNX INT8 export, agreement and 2-thread latency.

Data: cache.npz / cache.json from dump.py (python -m bench.ranker_explore.dump) (the corpus template's chunks, pages and stored v1 vectors; the train and
dev questions encoded by v1 as served: onnx-int8). Run from the repository root as python -m bench.ranker_explore.<name>.

    python -m bench.ranker_explore.exp baseline
    python exp.py train --name A --max-length 256 --negatives 7 --epochs 1 --lr 3e-5 [--corpus 600] [--loss bce]
    python exp.py eval                 # every trained config x N x fusion, chosen on tune
    python exp.py onnx --name A --n 30 # export, INT8, agreement, latency, INT8 quality
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.devsplit import split  # noqa: E402
from bench.retrieval import score  # noqa: E402
from pgsynapse.models import default_model_path  # noqa: E402

HERE = Path(os.environ.get("RANKER_EXP_DIR", "/tmp/pgsynapse-ranker-exp"))  # caches, models, logs
MINILM = str(default_model_path())
DEPTH = 30  # candidates scored per dev question (every N <= this is evaluated from the same scores)
NS = (10, 20, 30)


def passage_text(title: str | None, text: str) -> str:  # as pgsynapse.ranking.scorer.passage_text
    return f"{title.strip()}\n{text}" if title and title.strip() else text


class Data:
    def __init__(self) -> None:
        z = np.load(HERE / "cache.npz")
        meta = json.loads((HERE / "cache.json").read_text())
        self.vecs, self.qv_train, self.qv_dev = z["vecs"], z["qv_train"], z["qv_dev"]
        self.chunks = meta["chunks"]
        self.docs = meta["docs"]
        self.train, self.dev = meta["train"], meta["dev"]
        self.v1 = meta["v1"]
        self.texts = [passage_text(c["title"], c["text"]) for c in self.chunks]
        self.pages = [c["source"] for c in self.chunks]
        self.page_chunks: dict[str, list[int]] = {}
        for i, p in enumerate(self.pages):
            self.page_chunks.setdefault(p, []).append(i)
        halves = split(self.dev)
        self.half_idx = {h: [self.dev.index(q) for q in qs] for h, qs in halves.items()}

    def top(self, qv: np.ndarray, k: int) -> list[int]:
        s = self.vecs @ qv
        idx = np.argpartition(-s, k)[:k]
        return [int(i) for i in idx[np.argsort(-s[idx])]]


def pages_of(order: list[int], pages: list[str], n: int = 10) -> list[str]:
    out: list[str] = []
    for i in order:
        if pages[i] not in out:
            out.append(pages[i])
            if len(out) == n:
                break
    return out


def metrics(d: Data, orders: dict[int, list[int]]) -> dict[str, dict[str, float]]:
    out = {}
    for h, idx in d.half_idx.items():
        out[h] = score([pages_of(orders[i], d.pages) for i in idx], [set(d.dev[i]["relevant"]) for i in idx])
    out["all"] = score([pages_of(orders[i], d.pages) for i in range(len(d.dev))], [set(q["relevant"]) for q in d.dev])
    return out


def dev_candidates(d: Data) -> dict[int, list[int]]:
    # 200 chunks deep so that the vector order's top 10 pages exist past N
    return {i: d.top(d.qv_dev[i], 200) for i in range(len(d.dev))}


def cmd_baseline(args: argparse.Namespace) -> None:
    d = Data()
    cands = dev_candidates(d)
    m = metrics(d, cands)
    print(json.dumps({"baseline": m}))
    # recall of the relevant page within the first N chunks (the ceiling a reranker of N can reach)
    for n in NS:
        hit = {h: round(100 * np.mean([any(d.pages[c] in d.dev[i]["relevant"] for c in cands[i][:n]) for i in idx]), 1)
               for h, idx in d.half_idx.items()}
        print(f"page in top {n} chunks: {hit}")
    (HERE / "baseline.json").write_text(json.dumps(m))


# ---- training ---------------------------------------------------------------------------------------------------

def corpus_pairs(d: Data, n: int, seed: int) -> list[tuple[str, str]]:
    """(query, page) corpus pairs as src/pgsynapse/learning/train.py's synthetic_pairs builds them."""
    from pgsynapse.learning.train import synthetic_pairs

    doc_ids = {doc["id"]: doc for doc in d.docs}
    doc_chunks: dict[int, list[int]] = {}
    for i, c in enumerate(d.chunks):
        doc_chunks.setdefault(c["doc"], []).append(i)
    docs = {k: (v["title"], v["body"]) for k, v in doc_ids.items() if k in doc_chunks}
    dev_pages = {p for q in d.dev for p in q["relevant"]}
    exclude = {k for k, v in doc_ids.items() if v["source"] in dev_pages}  # no dev page's pairs (held out)
    out = synthetic_pairs(docs, doc_chunks, [c["text"] for c in d.chunks], n, seed, exclude)
    return [(q, doc_ids[doc]["source"]) for q, doc, _ in out]


def groups_for(d: Data, qs: list[str], pages: list[str], qvs: np.ndarray, negatives: int, pool: int,
               rng: random.Random) -> list[tuple[str, int, list[int]]]:
    """(question, positive chunk, hard negative chunks): the positive is the helpful page's best passage by v1;
    negatives: ``negatives`` drawn from the first ``pool`` chunks of other pages (the first ones when pool ==
    negatives)."""
    out = []
    for q, page, qv in zip(qs, pages, qvs, strict=True):
        own = d.page_chunks.get(page)
        if not own:
            continue
        s = d.vecs @ qv
        pos = own[int(np.argmax(s[own]))]
        order = np.argsort(-s)[: pool + len(own) + 5]
        negs = [int(i) for i in order if d.pages[i] != page][:pool]
        if pool > negatives:
            negs = sorted(rng.sample(negs, negatives), key=negs.index)
        out.append((q, pos, negs[:negatives]))
    return out


def cmd_train(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    d = Data()
    qs = [q["q"] for q in d.train]
    pages = [q["page"] for q in d.train]
    qvs = d.qv_train
    missing = sum(p not in d.page_chunks for p in pages)
    if args.corpus:
        from pgsynapse.models import ModelCache

        cp = corpus_pairs(d, args.corpus, args.seed + 1)
        emb = ModelCache(threads=args.threads).get({**d.v1, "id": 1, "dim": 384})
        cv = np.asarray(emb.encode([c[0] for c in cp]), dtype=np.float32)
        qs, pages, qvs = qs + [c[0] for c in cp], pages + [c[1] for c in cp], np.concatenate([qvs, cv])
    groups = groups_for(d, qs, pages, qvs, args.negatives, args.pool or args.negatives, rng)
    print(json.dumps({"groups": len(groups), "train_missing_pages": missing, "corpus": args.corpus}), flush=True)

    tok = AutoTokenizer.from_pretrained(MINILM)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=1)
    if args.layers:
        enc = model.base_model.encoder
        n = len(enc.layer)
        keep = sorted({round(i * (n - 1) / (args.layers - 1)) for i in range(args.layers)}) if args.layers > 1 else [n - 1]
        enc.layer = torch.nn.ModuleList([enc.layer[i] for i in keep])
        model.config.num_hidden_layers = len(keep)

    def logits(q: str, ps: list[str]) -> torch.Tensor:
        f = tok([q] * len(ps), ps, truncation="only_second", max_length=args.max_length, padding=True,
                return_tensors="pt")
        return model(**f).logits[:, 0]

    head = [p for n, p in model.named_parameters() if n.startswith("classifier") or ".pooler." in n or n.startswith("pooler")]
    hid = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in hid]
    opt = torch.optim.AdamW([{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr or args.lr}],
                            weight_decay=0.01)
    steps = args.epochs * ((len(groups) + args.batch - 1) // args.batch)
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        order = list(range(len(groups)))
        rng.shuffle(order)
        for b in range(0, len(order), args.batch):
            losses = []
            for gi in order[b: b + args.batch]:
                q, pos, negs = groups[gi]
                lg = logits(q, [d.texts[pos]] + [d.texts[i] for i in negs])
                if args.loss == "listwise":
                    losses.append(torch.nn.functional.cross_entropy(lg[None, :], torch.zeros(1, dtype=torch.long)))
                else:
                    y = torch.zeros_like(lg)
                    y[0] = 1.0
                    losses.append(torch.nn.functional.binary_cross_entropy_with_logits(lg, y))
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 10 == 0:
                print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s load {os.getloadavg()[0]:.2f}",
                      flush=True)
    train_s = time.time() - t0
    model.eval()
    out = HERE / "models" / args.name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # score the dev candidates (first DEPTH chunks by v1) once; eval combines them
    cands = dev_candidates(d)
    t1 = time.time()
    scores = {}
    with torch.no_grad():
        for i in range(len(d.dev)):
            c = cands[i][:DEPTH]
            scores[i] = logits(d.dev[i]["q"], [d.texts[j] for j in c]).numpy().tolist()
    score_s = time.time() - t1
    info = {"name": args.name, "args": vars(args), "groups": len(groups), "steps": step, "train_seconds": round(train_s, 1),
            "dev_score_seconds": round(score_s, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "load": os.getloadavg()}
    (out / "dev_scores.json").write_text(json.dumps({"info": info, "scores": scores}))
    (out / "exp.json").write_text(json.dumps(info))
    print(json.dumps(info))
    print(json.dumps(summarise(d, cands, scores, args.name)))


# ---- evaluation -------------------------------------------------------------------------------------------------

def rerank_orders(d: Data, cands: dict[int, list[int]], scores: dict, n: int, w: float, k: int = 60) -> dict[int, list[int]]:
    """The first ``n`` chunks ordered by the ranker (w = 0) or by RRF of ranker rank and vector rank (weight w on
    the vector's), then the rest in vector order."""
    out = {}
    for i, c in cands.items():
        s = np.asarray(scores[i][:n] if isinstance(scores, dict) and i in scores else scores[str(i)][:n])
        ce_rank = np.empty(n, dtype=int)
        ce_rank[np.argsort(-s, kind="stable")] = np.arange(n)
        fused = 1 / (k + ce_rank) + w / (k + np.arange(n))
        head = [c[j] for j in sorted(range(n), key=lambda j: (-fused[j], j))]
        out[i] = head + c[n:]
    return out


def summarise(d: Data, cands: dict, scores: dict, name: str) -> dict:
    res = {}
    for n in NS:
        for w in (0.0, 0.5, 1.0, 2.0, 4.0):
            m = metrics(d, rerank_orders(d, cands, scores, n, w))
            res[f"N{n}_w{w}"] = {h: (m[h]["recall@5"], m[h]["mrr@10"]) for h in ("tune", "report", "all")}
    return {"name": name, "variants": res}


def cmd_eval(args: argparse.Namespace) -> None:
    d = Data()
    cands = dev_candidates(d)
    base = metrics(d, cands)
    print(f"{'variant':34s} {'tune R@5':>8s} {'tune MRR':>8s} {'rep R@5':>8s} {'rep MRR':>8s} {'all R@5':>8s} {'all MRR':>8s}")
    print(f"{'vector-only (v1 exact kNN)':34s} " + " ".join(f"{base[h]['recall@5']:8.1f} {base[h]['mrr@10']:8.3f}" for h in ("tune", "report", "all")))
    best = []
    for p in sorted((HERE / "models").glob("*/dev_scores.json")):
        data = json.loads(p.read_text())
        info = data["info"]
        s = summarise(d, cands, data["scores"], info["name"])
        a = info["args"]
        tag = (f"ml{a['max_length']} neg{a['negatives']} pool{a.get('pool')} ep{a['epochs']} lr{a['lr']} head{a.get('head_lr')}"
               f" c{a['corpus']} {a['loss']} layers{a.get('layers')}")
        print(f"# {info['name']}: {tag} train {info['train_seconds']}s rss {info['peak_rss_mb']}MB")
        for v, m in s["variants"].items():
            print(f"  {info['name'] + ' ' + v:32s} " + " ".join(f"{m[h][0]:8.1f} {m[h][1]:8.3f}" for h in ("tune", "report", "all")))
            best.append((m["tune"][1], m["tune"][0], info["name"], v, m))
    best.sort(reverse=True)
    print("best on tune (MRR, then R@5):")
    for b in best[:8]:
        print("  ", b[2], b[3], b[4])


# ---- ONNX INT8 ----------------------------------------------------------------------------------------------------

def cmd_onnx(args: argparse.Namespace) -> None:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from scipy.stats import spearmanr
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    d = Data()
    mdir = HERE / "models" / args.name
    info = json.loads((mdir / "exp.json").read_text())
    max_length = info["args"]["max_length"]
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForSequenceClassification.from_pretrained(mdir).eval()
    fp32, int8 = mdir / "model.onnx", mdir / f"model_int8{'_pc' if args.per_channel else ''}.onnx"
    t0 = time.time()
    if not fp32.exists():
        f = tok(["q"], ["passage"], return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        torch.onnx.export(model, tuple(f[k] for k in names), str(fp32), input_names=names, output_names=["logits"],
                          dynamic_axes={**{k: {0: "batch", 1: "seq"} for k in names}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=args.per_channel)
    export_s = time.time() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
    from tokenizers import Tokenizer

    ftok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    ftok.enable_truncation(max_length, strategy="only_second")
    ftok.enable_padding(pad_id=ftok.token_to_id("[PAD]") or 0)

    def onnx_scores(q: str, ps: list[str]) -> np.ndarray:
        encs = ftok.encode_batch([(q, p) for p in ps])
        feeds = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
        return sess.run(None, feeds)[0][:, 0]

    cands = dev_candidates(d)
    torch_scores = json.loads((mdir / "dev_scores.json").read_text())["scores"]
    n = args.n
    int8_scores, lat, rho, tokens = {}, [], [], []
    onnx_scores(d.dev[0]["q"], [d.texts[j] for j in cands[0][:n]])  # warm-up
    onnx_scores(d.dev[1]["q"], [d.texts[j] for j in cands[1][:n]])
    loads = [os.getloadavg()[0]]
    for rep in range(args.reps):
        for i in range(len(d.dev)):
            ps = [d.texts[j] for j in cands[i][:DEPTH if rep == 0 else n]]
            if rep == 0:  # quality: every DEPTH candidate; latency from the first n only
                int8_scores[i] = onnx_scores(d.dev[i]["q"], ps).tolist()
                ps = ps[:n]
            s = time.perf_counter()
            out = onnx_scores(d.dev[i]["q"], ps)
            lat.append((time.perf_counter() - s) * 1000)
            if rep == 0:
                rho.append(spearmanr(out, torch_scores[str(i)][:n]).statistic)
                tokens.append(np.mean([len(e.ids) for e in ftok.encode_batch([(d.dev[i]["q"], p) for p in ps])]))
        loads.append(os.getloadavg()[0])
    p = lambda x, q: round(float(np.percentile(x, q)), 1)  # noqa: E731
    res = {"name": args.name, "n": n, "max_length": max_length, "per_channel": args.per_channel,
           "export_quantise_s": round(export_s, 1), "int8_mb": round(int8.stat().st_size / 2**20, 1),
           "latency_ms_p50": p(lat, 50), "latency_ms_p95": p(lat, 95), "latency_samples": len(lat),
           "tokens_per_pair_mean": round(float(np.mean(tokens)), 1),
           "spearman_median": round(float(np.median(rho)), 3), "spearman_min": round(float(np.min(rho)), 3),
           "load1_during": loads}
    for w in (0.0, 0.5, 1.0):
        m = metrics(d, rerank_orders(d, cands, int8_scores, n, w))
        t = metrics(d, rerank_orders(d, cands, torch_scores, n, w))
        res[f"int8_w{w}"] = {h: (m[h]["recall@5"], m[h]["mrr@10"]) for h in ("tune", "report", "all")}
        res[f"torch_w{w}"] = {h: (t[h]["recall@5"], t[h]["mrr@10"]) for h in ("tune", "report", "all")}
    (mdir / f"onnx_{n}{'_pc' if args.per_channel else ''}.json").write_text(json.dumps(res))
    print(json.dumps(res, indent=1))


def cmd_teacher(args: argparse.Namespace) -> None:
    """mpnet rescoring v1's first N chunks: question and candidate chunks encoded by mpnet (only the candidates)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from pgsynapse.chunking import Chunker

    torch.set_num_threads(args.threads)
    d = Data()
    cands = dev_candidates(d)
    n = args.n
    st = SentenceTransformer(args.model, device="cpu")
    st.max_seq_length = 256
    chunker = Chunker(st.tokenizer, 256, 0)
    need = sorted({j for i in cands for j in cands[i][:n]})
    cache = HERE / f"mpnet_vecs_{n}.npz"
    t0 = time.time()
    qv = st.encode([q["q"] for q in d.dev], normalize_embeddings=True, batch_size=16)
    q_s = (time.time() - t0) / len(d.dev)
    vec: dict[int, np.ndarray] = {}
    if cache.exists():
        z = np.load(cache)
        vec = dict(zip(z["ids"].tolist(), z["vecs"], strict=True))
    todo = [j for j in need if j not in vec]
    print(json.dumps({"unique_candidates": len(need), "todo": len(todo), "question_encode_s": round(q_s, 3)}), flush=True)
    t1 = time.time()
    for b in range(0, len(todo), 32):
        part = todo[b: b + 32]
        v = st.encode([chunker.embed_text(d.chunks[j]["title"], d.chunks[j]["text"]) for j in part],
                      normalize_embeddings=True, batch_size=16)
        vec.update(zip(part, v, strict=True))
        ids = np.array(list(vec)); np.savez(cache, ids=ids, vecs=np.stack([vec[k] for k in ids]))
        print(f"{b + len(part)}/{len(todo)} {time.time() - t1:.0f}s load {os.getloadavg()[0]:.2f}", flush=True)
    scores = {i: [float(vec[j] @ qv[i]) for j in cands[i][:n]] for i in cands}
    res = {"n": n, "chunks_per_s": round(len(todo) / max(1e-9, time.time() - t1), 2) if todo else None,
           "question_encode_s": round(q_s, 3)}
    for w in (0.0, 0.5, 1.0, 2.0):
        m = metrics(d, rerank_orders(d, cands, scores, n, w))
        res[f"mpnet_N{n}_w{w}"] = {h: (m[h]["recall@5"], m[h]["mrr@10"]) for h in ("tune", "report", "all")}
    (HERE / f"teacher_{n}.json").write_text(json.dumps(res))
    print(json.dumps(res, indent=1))


def cmd_teacher_int8(args: argparse.Namespace) -> None:
    """mpnet's question encoder on torch (2 threads) and as ONNX INT8 (dynamic, per-channel, 2 intra-op threads):
    single-question latency p50/p95 over the dev questions, and the teacher's quality with INT8 question vectors
    against the fp32 candidate vectors of cmd_teacher."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer
    from transformers import AutoModel

    torch.set_num_threads(2)
    d = Data()
    cands = dev_candidates(d)
    n = args.n
    z = np.load(HERE / f"mpnet_vecs_{n}.npz")
    vec = dict(zip(z["ids"].tolist(), z["vecs"], strict=True))
    st = SentenceTransformer(args.model, device="cpu")
    qs = [q["q"] for q in d.dev]
    st.encode(qs[:2], normalize_embeddings=True)
    lat_t = []
    for q in qs:
        s0 = time.perf_counter()
        st.encode([q], normalize_embeddings=True)
        lat_t.append((time.perf_counter() - s0) * 1000)
    out = HERE / "mpnet_onnx"
    out.mkdir(exist_ok=True)
    fp32, int8 = out / "model.onnx", out / "model_int8.onnx"
    if not int8.exists():
        m = AutoModel.from_pretrained(args.model).eval()
        f = st.tokenizer(["a question"], return_tensors="pt")
        torch.onnx.export(m, (f["input_ids"], f["attention_mask"]), str(fp32), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamic_axes={"input_ids": {0: "b", 1: "s"},
                          "attention_mask": {0: "b", 1: "s"}, "last_hidden_state": {0: "b", 1: "s"}},
                          opset_version=17, dynamo=False)
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    tok.enable_truncation(256)

    def enc(q: str) -> np.ndarray:
        e = tok.encode(q)
        ids = np.array([e.ids], dtype=np.int64)
        am = np.array([e.attention_mask], dtype=np.int64)
        h = sess.run(None, {"input_ids": ids, "attention_mask": am})[0][0]
        v = (h * am[0][:, None]).sum(0) / am[0].sum()
        return v / np.linalg.norm(v)

    enc(qs[0])
    lat_o, qv = [], []
    for q in qs:
        s0 = time.perf_counter()
        qv.append(enc(q))
        lat_o.append((time.perf_counter() - s0) * 1000)
    ref = st.encode(qs, normalize_embeddings=True)
    cos = [float(a @ b) for a, b in zip(qv, ref, strict=True)]
    scores = {i: [float(vec[j] @ qv[i]) for j in cands[i][:n]] for i in cands}
    p = lambda x, q: round(float(np.percentile(x, q)), 1)  # noqa: E731
    res = {"n": n, "torch_q_ms_p50": p(lat_t, 50), "torch_q_ms_p95": p(lat_t, 95), "int8_q_ms_p50": p(lat_o, 50),
           "int8_q_ms_p95": p(lat_o, 95), "int8_vs_fp32_cos_min": round(min(cos), 4), "int8_vs_fp32_cos_mean": round(float(np.mean(cos)), 4),
           "int8_mb": round(int8.stat().st_size / 2**20, 1), "load1": os.getloadavg()}
    for w in (0.0, 0.5, 1.0):
        m = metrics(d, rerank_orders(d, cands, scores, n, w))
        res[f"mpnet_int8q_N{n}_w{w}"] = {h: (m[h]["recall@5"], m[h]["mrr@10"]) for h in ("tune", "report", "all")}
    (HERE / f"teacher_int8_{n}.json").write_text(json.dumps(res))
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("baseline")
    sub.add_parser("eval")
    t = sub.add_parser("train")
    t.add_argument("--name", required=True)
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--negatives", type=int, default=7)
    t.add_argument("--pool", type=int, default=0, help="draw negatives from the first POOL other-page chunks")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--lr", type=float, default=3e-5)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--head-lr", type=float, default=0.0, help="lr of the pooler and the fresh head (0: --lr)")
    t.add_argument("--corpus", type=int, default=0)
    t.add_argument("--layers", type=int, default=0)
    t.add_argument("--loss", choices=("listwise", "bce"), default="listwise")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    o = sub.add_parser("onnx")
    o.add_argument("--name", required=True)
    o.add_argument("--n", type=int, default=30)
    o.add_argument("--reps", type=int, default=1)
    o.add_argument("--per-channel", action="store_true", default=True)
    o.add_argument("--per-tensor", dest="per_channel", action="store_false")
    o.add_argument("--threads", type=int, default=2)
    te = sub.add_parser("teacher")
    te.add_argument("--n", type=int, default=10)
    te.add_argument("--model", default="/tmp/pgsynapse-bench-models/mpnet/all-mpnet-base-v2")
    te.add_argument("--threads", type=int, default=2)
    ti = sub.add_parser("teacher-int8")
    ti.add_argument("--n", type=int, default=10)
    ti.add_argument("--model", default="/tmp/pgsynapse-bench-models/mpnet/all-mpnet-base-v2")
    args = ap.parse_args()
    {"teacher-int8": cmd_teacher_int8, "teacher": cmd_teacher, "baseline": cmd_baseline, "train": cmd_train, "eval": cmd_eval, "onnx": cmd_onnx}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
