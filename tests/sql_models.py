"""A tiny SQL model the tests build themselves in seconds: a 1-layer GPT-2 with the default embedding model's
tokenizer, taught to emit given statements for given prompts (memorised), saved as a plain transformers directory
that :class:`~pgsynapse.textsql.generate.TransformersSqlGenerator` loads like a user's model.

The tokenizer lower-cases and splits punctuation, so the model says ``select count ( * ) from orders`` for
``SELECT count(*) FROM orders``: :func:`as_generated` gives the statement as the model will emit it. Choose SQL that
survives it: no ``_`` in names (``order _ id``), no two-character operators (``> =``), no decimals (``3. 5``); a
string literal comes back lower-cased with spaces inside its quotes (``' paris '``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from pgsynapse.config import Settings
from pgsynapse.models import default_model_path
from pgsynapse.textsql.context import SchemaContext, schema_context
from pgsynapse.textsql.generate import SqlPrompt, encode_example, extract_sql, training_example
from tests.helpers import drop_database, fast_settings, with_db

STATS: dict[str, int] = {}  # of the last build: steps taken and the size of its training vocabulary
MARGIN = 1.0  # logits of each target token above any other, so that greedy decoding is exact and stable
LR = 1e-2
SIZE = dict(n_embd=64, n_layer=1, n_head=4, n_inner=128)  # one layer learns ~10 pairs in ~50 steps, two in ~100
MAX_NEW_TOKENS = 160  # the setting sql_max_new_tokens' default: the positions leave room for it beside the prompt


@contextmanager
def sql_database(pg_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory, tag: str, tables: str,
                 schema: str = "public") -> Iterator[tuple[str, Settings, SchemaContext]]:
    """A database cloned from the migrated template with ``tables`` (SQL) run in it: its name, its settings
    (``fast_settings``) and the schema context the sql_answer handler builds for ``schema`` with them, which is
    what a tiny SQL model is taught its prompts from. Dropped on exit."""
    name = f"pgsynapse_{tag}_{tmp_path_factory.getbasetemp().name[-6:].replace('-', '_')}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        settings = fast_settings(with_db(pg_url, name))
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(tables)
            ctx = schema_context(conn, schema, None, samples=settings.sql_sample_values,
                                 max_tables=settings.sql_max_tables, role=settings.sql_reader_role)
        yield name, settings, ctx
    finally:
        drop_database(pg_url, name)


def sql_tokenizer():
    """The default model's tokenizer, its [SEP] also the end token (what the tiny model emits after ``;``)."""
    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    tok.eos_token = tok.sep_token
    return tok


def as_generated(sql: str, tokenizer=None) -> str:
    """``sql`` as the tiny model emits it (through the tokenizer and back, then :func:`extract_sql`)."""
    tok = tokenizer or sql_tokenizer()
    return extract_sql(tok.decode(tok(sql.strip().rstrip(";") + " ;", add_special_tokens=False)["input_ids"],
                                  skip_special_tokens=True))


def _margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        right = logits.gather(1, targets[:, None])[:, 0]
        return right - logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values


def _batch(examples: list[tuple[list[int], int]], compact: dict[int, int] | None, pad: int):
    """One padded batch of every example, and the (row, position, target) of each target token: the output at
    ``position`` predicts ``target``."""
    longest = max(len(seq) for seq, _ in examples)
    ids = torch.full((len(examples), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, targets = [], [], []
    for r, (seq, start) in enumerate(examples):
        seq = [compact[t] for t in seq] if compact is not None else seq
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        rows += [r] * (len(seq) - start)
        cols += range(start - 1, len(seq) - 1)
        targets += seq[start:]
    return ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)


def tiny_sql_model(path: Path, pairs: list[tuple[SqlPrompt, str]], steps: int = 400, *,
                   max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0) -> Path:
    """A tiny GPT-2 trained on ``pairs`` (prompt, SQL) until greedy decoding of every prompt gives its statement:
    trained on :func:`training_example`'s texts (the prompt exactly as inference renders it) and checked by teacher
    forcing, where greedy decoding is exact (every target token is the arg-max after the ones before it, with a
    margin). Raises when ``steps`` were not enough. Saved with its tokenizer at ``path``."""
    if not pairs:
        raise ValueError("tiny_sql_model needs at least one (prompt, sql) pair")
    tok = sql_tokenizer()
    examples = [encode_example(*training_example(p, sql, tok), tok) for p, sql in pairs]
    longest_prompt = max(start for _, start in examples)
    longest = max(len(ids) for ids, _ in examples)
    positions = -(-(longest_prompt + max(max_new_tokens, longest - longest_prompt) + 8) // 64) * 64
    config = dict(n_positions=positions, resid_pdrop=0.0, **SIZE,
                  embd_pdrop=0.0, attn_pdrop=0.0)
    ends = dict(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    # trained on a compact vocabulary (the examples' tokens, and one zero row standing for all the others), then
    # written into a model of the tokenizer's whole vocabulary whose other rows are zero: the same logits, at a
    # fraction of the cost of a step over ~30k output rows
    vocab = sorted({t for seq, _ in examples for t in seq} | {tok.sep_token_id, tok.pad_token_id})
    other = len(vocab)
    compact = {t: i for i, t in enumerate(vocab)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a busy machine
    try:
        torch.manual_seed(seed)
        small = GPT2LMHeadModel(GPT2Config(vocab_size=other + 1, bos_token_id=None, eos_token_id=None, **config))
        with torch.no_grad():
            small.transformer.wte.weight[other].zero_()
        ids, mask, rows, cols, targets = _batch(examples, compact, compact[tok.pad_token_id])
        opt = torch.optim.AdamW(small.parameters(), lr=LR, weight_decay=0.0)
        small.train()
        for step in range(steps):
            logits = small(input_ids=ids, attention_mask=mask).logits[rows, cols]
            if _margins(logits, targets).min() > MARGIN:
                break
            loss = torch.nn.functional.cross_entropy(logits, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                small.transformer.wte.weight[other].zero_()
        else:
            raise RuntimeError(f"tiny_sql_model: {steps} steps did not teach the {len(pairs)} pairs "
                               f"(loss {loss.item():.3f})")
        model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, **config, **ends))
        state = small.state_dict()
        wte = torch.zeros(tok.vocab_size, config["n_embd"])
        wte[torch.tensor(vocab)] = state["transformer.wte.weight"][:other]
        state["transformer.wte.weight"] = state["lm_head.weight"] = wte
        model.load_state_dict(state)
        model.eval()
        # the whole vocabulary now: greedy decoding gives every target token, by the margin
        full_ids, full_mask, rows, cols, targets = _batch(examples, None, tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=full_ids, attention_mask=full_mask).logits[rows, cols]
        if not _margins(logits, targets).min() > MARGIN / 2:
            raise RuntimeError("tiny_sql_model: the whole-vocabulary model does not give the statements")
    finally:
        torch.set_num_threads(threads)
    STATS.update(steps=step, vocab=len(vocab))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
