"""The SQL trainer's parts that need no database (textsql/train.py): the held-out split by normalised question,
the ordered comparison's test, micro-batches, and the loss of a left-padded micro-batch."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pgsynapse.textsql.train import Pair, _micro_batches, _micro_loss, normalise_question, ordered_target, split_pairs


def _pair(q: str, sql: str = "select 1") -> Pair:
    return Pair(q, "CREATE TABLE t (a int);", sql)


def test_the_split_keeps_each_normalised_question_on_one_side():
    assert normalise_question("  How MANY orders?! ") == normalise_question("how many orders") == "how many orders"
    assert normalise_question("how many orders") != normalise_question("how many order lines")
    texts = [f"question number {i}" for i in range(20)]
    pairs = [_pair(t) for t in texts] + [_pair(t.upper() + " ?") for t in texts[:10]]  # each asked twice
    for seed in range(5):
        train, held = split_pairs(pairs, 0.25, seed)
        assert len(train) + len(held) == len(pairs) and held and train
        tk = {normalise_question(p.question) for p in train}
        hk = {normalise_question(p.question) for p in held}
        assert not tk & hk
        assert 0.2 * len(pairs) <= len(held) <= 0.4 * len(pairs)
    assert split_pairs(pairs, 0.25, 3) == split_pairs(pairs, 0.25, 3)  # reproducible
    # one group only: nothing can be held out; two groups: one of each side
    assert split_pairs([_pair("a"), _pair("A")], 0.5)[1] == []
    train, held = split_pairs([_pair("a"), _pair("b")], 0.1)
    assert len(train) == len(held) == 1


def test_row_order_counts_only_when_the_target_orders_at_the_top_level():
    assert ordered_target("SELECT a FROM t ORDER BY a")
    assert ordered_target("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1 LIMIT 3")
    assert not ordered_target("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3) s")
    assert not ordered_target("SELECT count(*) FROM t")
    assert not ordered_target("not sql at all")


def test_micro_batches_stay_within_their_token_budget():
    batch = [([1] * n, [1] * n, False) for n in (10, 300, 20, 290, 5)]
    pieces = _micro_batches(batch, 600)
    assert sorted(len(e[0]) for p in pieces for e in p) == [5, 10, 20, 290, 300]
    for p in pieces:
        assert len(p) == 1 or len(p) * max(len(e[0]) for e in p) <= 600
    assert [len(p) for p in _micro_batches(batch, 10)] == [1] * 5  # an example longer than the budget runs alone


def test_a_left_padded_micro_batch_has_the_loss_of_its_examples_run_alone():
    """Padding on the left, positions from each example's first token and logits of the last positions only: the
    same loss as each example alone without padding, for learned positions (GPT-2) and rotary ones (Llama)."""
    torch.manual_seed(0)
    models = [GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                         bos_token_id=1, eos_token_id=2)),
              LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0))]
    examples = [(list(range(1, 20)), [-100] * 15 + list(range(16, 20)), False),
                (list(range(3, 9)), [-100] * 3 + list(range(6, 9)), False),
                (list(range(5, 35)), [-100] * 20 + list(range(25, 35)), False)]
    for model in models:
        model.eval()
        with torch.no_grad():
            alone = 0.0
            for ids, labels, _ in examples:
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
                alone += torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100,
                                                           reduction="sum").item()
            batched = _micro_loss(model, examples, pad=0).item()
        assert abs(batched - alone) < 1e-3 * alone, (type(model).__name__, batched, alone)
