"""Every line on stderr is one event of the chosen format: pgsynapse's and the standard library's records alike."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from pgsynapse import cli
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


def test_a_library_s_info_chatter_is_left_out_unless_debug(capsys, restore_logging):
    # onnxruntime's optimizer logs under its own module names (fusion_base, onnx_model_bert, ...) at info
    configure_logging("json", "info")
    logging.getLogger("fusion_base").info("Fused Gelu: 6")
    logging.getLogger("fusion_base").warning("a fusion failed")
    get_logger("pgsynapse.test").info("model_exported")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["event"], e.get("message")) for e in events] == [("library_log", "a fusion failed"),
                                                                ("model_exported", None)]
    configure_logging("json", "debug")
    logging.getLogger("fusion_base").info("Fused Gelu: 6")
    assert json.loads(capsys.readouterr().err.splitlines()[0])["message"] == "Fused Gelu: 6"


def test_a_crash_with_json_logs_is_one_fatal_error_event(capsys, monkeypatch, restore_logging):
    """An error no command expects (a bug: `pgsynapse search` of a text with a byte that is not UTF-8 was one) came
    out as Python's traceback, thirty plain lines in a JSON log. With JSON logs it is one fatal_error event that
    holds the traceback; console logs keep Python's."""
    def crash(args, settings):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(cli, "_dispatch", crash)
    assert cli.main(["--log-format", "json", "--database-url", "postgresql://x/y", "status"]) == 1
    [event] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {"event": "fatal_error", "level": "error", "exit_code": 1,
            "error": "RuntimeError: a bug over two lines"}.items() <= event.items()
    assert event["exception"].startswith("Traceback") and "in crash" in event["exception"]
    with pytest.raises(RuntimeError):
        cli.main(["--log-format", "console", "--database-url", "postgresql://x/y", "status"])
