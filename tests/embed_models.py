"""Tiny sentence-transformers models built in the test, of any dimension: the real default model's tokenizer over a
randomly initialised small BERT (2 layers unless told), mean pooled and normalised, as `pgsynapse model add` gets a model. (Random
weights: these tests check what happens to versions and vectors, not how well the model retrieves.)"""

from __future__ import annotations

from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

from pgsynapse.models import default_model_path


def tiny_embedding_model(path: Path, dim: int, *, max_seq_length: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A ``dim``-dimensional sentence-transformers model saved at ``path`` (about 7 MB, seconds to build)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * dim, max_position_embeddings=max(max_seq_length, 128))
    bert_dir = path.with_name(path.name + "-bert")  # the transformer's own files: the model's first module
    BertModel(config).save_pretrained(str(bert_dir))
    tokenizer.save_pretrained(str(bert_dir))
    word = Transformer(str(bert_dir), max_seq_length=max_seq_length)
    model = SentenceTransformer(modules=[word, Pooling(dim, pooling_mode="mean"), Normalize()])
    model.save(str(path))
    return path


def tiny_cross_encoder(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised one-logit BERT sequence classifier (a cross-encoder) with the default model's
    tokenizer, saved at ``path`` as `pgsynapse ranker add` gets one (a few MB, a second to build)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=256, num_labels=1,
                        initializer_range=0.3)  # a spread of scores (the default 0.02 gives near-equal logits)
    BertForSequenceClassification(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
