"""Every line on stderr is one event of the chosen format: pgsynapse's and the standard library's records alike."""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import pytest
import structlog

from pgsynapse import cli
from pgsynapse.logs import configure_logging, get_logger

ROOT = Path(__file__).resolve().parents[2]


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


def _warnings_and_errors(*patterns: str) -> dict[str, str]:
    """The events the code logs at warning and above: {event: where}."""
    found = {}
    for pattern in patterns:
        for path in sorted(ROOT.glob(pattern)):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
                    continue
                func = node.func.body if isinstance(node.func, ast.IfExp) else node.func  # (log.error if ...)(...)
                if isinstance(func, ast.Attribute) and func.attr in ("warning", "error", "exception", "critical"):
                    found[node.args[0].value] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return found


def test_every_warning_and_error_of_the_worker_is_in_the_log_event_table():
    """An operator meets `watchdog_withheld`, `claim_failed` or `batch_crashed` in the journal: docs/operations.md
    said nothing of them (it had no table of log events). Every event the worker logs at warning and above is in its
    "Log events" table, and every event the table names is logged."""
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "### Log events" in text, "docs/operations.md has no table of log events"
    section = text.split("### Log events", 1)[1]
    table = section[section.index("| event |"):].split("\n\n", 1)[0].splitlines()[2:]
    documented = {m for row in table for m in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    logged = _warnings_and_errors("listener/*.py", "src/pgsynapse/daemon.py", "src/pgsynapse/metrics.py",
                                  "src/pgsynapse/sdnotify.py", "src/pgsynapse/replica.py", "src/pgsynapse/cli.py",
                                  "src/pgsynapse/app.py")
    missing = {event: where for event, where in logged.items() if event not in documented}
    assert not missing, f"not in docs/operations.md's log event table: {missing}"
    source = "".join(p.read_text() for d in ("src", "listener", "handlers") for p in (ROOT / d).rglob("*.py"))
    assert not {e for e in documented if f'"{e}"' not in source}, "documented, never logged"
