"""Job handlers, one module per job kind. ``registry()`` maps a kind to its handler class."""

from __future__ import annotations

from pgsynapse.handlers.base import Handler


def registry() -> dict[str, type[Handler]]:
    from pgsynapse.handlers.answer import AnswerHandler
    from pgsynapse.handlers.backfill import BackfillHandler
    from pgsynapse.handlers.embed import EmbedHandler
    from pgsynapse.handlers.embed_image import EmbedImageHandler
    from pgsynapse.handlers.retrain import RetrainHandler
    from pgsynapse.handlers.sql_answer import SqlAnswerHandler
    from pgsynapse.handlers.sql_retrain import SqlRetrainHandler

    return {h.kind: h for h in (EmbedHandler, AnswerHandler, RetrainHandler, BackfillHandler, EmbedImageHandler,
                                SqlAnswerHandler, SqlRetrainHandler)}
