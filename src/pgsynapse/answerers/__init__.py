"""Answerers: turn retrieved passages (and a session's history) into an answer with citations.

- ``extractive`` (default): no generative model; picks the sentences of the retrieved passages closest to
  the question, each cited ``[n]``; says so plainly when nothing relevant was retrieved.
- ``transformers``: a local causal or seq2seq model directory.
- ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint, by base URL and key.
"""

from pgsynapse.answerers.base import (
    NOT_FOUND,
    Answer,
    Answerer,
    AnswerStopped,
    Passage,
    Request,
    Turn,
    split_sentences,
)
from pgsynapse.answerers.extractive import ExtractiveAnswerer
from pgsynapse.answerers.generative import OpenAIAnswerer, TransformersAnswerer, build_prompt

__all__ = ["NOT_FOUND", "Answer", "Answerer", "AnswerStopped", "ExtractiveAnswerer", "OpenAIAnswerer", "Passage",
           "Request", "TransformersAnswerer", "Turn", "build_prompt", "split_sentences"]
