"""Every line on stderr is one event of the chosen format: pgsynapse's and the standard library's records alike."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from pgsynapse.logs import configure_logging, get_logger


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def test_a_library_record_is_a_json_event_too(capsys, restore_logging):
    configure_logging("json", "info")
    configure_logging("json", "info")  # again, as a SIGHUP reload does: still one line per record
    logging.getLogger("psycopg.pool").warning("error connecting in %r: %s", "pool-1", "connection failed\n\tIs the")
    logging.getLogger("psycopg.pool").info("connection requested from 'pool-1'")  # a quiet library's chatter
    get_logger("pgsynapse.test").info("batch_embedded", n=3)
    lines = capsys.readouterr().err.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["library_log", "batch_embedded"]
    assert {"logger": "psycopg.pool", "level": "warning",
            "message": "error connecting in 'pool-1': connection failed\n\tIs the"}.items() <= events[0].items()


def test_the_log_level_holds_for_libraries(capsys, restore_logging):
    configure_logging("json", "error")
    logging.getLogger("psycopg.pool").warning("error connecting in 'pool-1'")
    logging.getLogger("somelib").error("it broke")
    assert [json.loads(line)["message"] for line in capsys.readouterr().err.splitlines()] == ["it broke"]
