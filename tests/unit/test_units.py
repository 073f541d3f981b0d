"""Pure functions: no database, no model weights."""

from __future__ import annotations

import psycopg
import pytest

from pgsynapse.cli_args import build_parser
from pgsynapse.config import load_settings
from pgsynapse.export import SCHEMES
from pgsynapse.handlers.base import describe, isolate
from pgsynapse.listener.wakeup import JobNotice, Wakeups
from pgsynapse.listener.worker import Worker
from pgsynapse.listener.writer import backoff_delay, transient
from pgsynapse.queries import q
from pgsynapse.textextract import html_to_text
from pgsynapse.tokens import length_batches


def test_isolate_bisects_to_the_poisoned_items():
    calls = []

    def fn(items):
        calls.append(list(items))
        if any(i % 10 == 3 for i in items):
            raise ValueError(f"bad in {items}")
        return [i * 2 for i in items]

    out = isolate(fn, list(range(16)))
    assert [o for o in out if not isinstance(o, Exception)] == [i * 2 for i in range(16) if i % 10 != 3]
    errors = {i: o for i, o in zip(range(16), out) if isinstance(o, Exception)}
    assert set(errors) == {3, 13}
    assert str(errors[3]) == "bad in [3]"
    assert len(calls) < 16 * 2  # bisection, not one call per item after every failure


def test_isolate_rejects_a_wrong_result_count():
    out = isolate(lambda items: [1], [1, 2])
    assert all(isinstance(o, RuntimeError) for o in out) is False  # bisected: singles succeed
    assert out == [1, 1]


def test_backoff_doubles_and_caps():
    assert [backoff_delay(a, 2.0, 10.0) for a in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]


@pytest.mark.parametrize(("sqlstate", "expected"), [
    ("08006", True), ("57P01", True), ("40P01", True), ("40001", True),
    # the server ended the transaction of a silent worker, or one that lasted too long (db.bounded_transaction):
    # psycopg raises these as InternalError (class 25), not OperationalError
    ("25P03", True), ("25P04", True),
    ("23505", False), ("22P02", False), ("25P02", False),
])
def test_transient_write_errors_are_the_connection_s_not_the_rows(sqlstate, expected):
    assert transient(psycopg.errors.lookup(sqlstate)("")) is expected


def test_a_broken_connection_without_a_sqlstate_is_transient():
    assert transient(psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"))
    assert not transient(ValueError("not a database error"))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [('{"kind": "embed", "n": 3}', JobNotice("embed", 3)), ('{"kind": "answer"}', JobNotice("answer", 1)),
     ("embed", None), ('{"n": 1}', None), ('{"kind": ""}', None), ('{"kind": 5}', None)],
)
def test_job_notice_payload_is_validated(payload, expected):
    assert JobNotice.parse(payload) == expected


def test_describe_is_one_line():
    assert describe(ValueError("a\n  b")) == "ValueError: a b"
    assert describe(KeyError()) == "KeyError"


def test_html_to_text_strips_tags_scripts_and_keeps_blocks():
    title, text = html_to_text(
        "<html><head><title>T  1</title><style>x{}</style></head><body><h1>Head</h1>"
        "<p>One <b>bold</b>&amp;more</p><script>alert(1)</script><pre>a\n  b</pre></body></html>")
    assert title == "T 1"
    assert text == "Head\n\nOne bold&more\n\na\nb"


def test_named_queries_load():
    assert "FOR UPDATE SKIP LOCKED" in q("claim_jobs")
    with pytest.raises(KeyError):
        q("no_such_query")


@pytest.mark.anyio
async def test_a_stopped_wakeup_never_waits():
    import anyio

    w = Wakeups(["embed"])
    w.stop()
    with anyio.fail_after(5):
        assert await w.wait("embed", 3600) is True
        assert await w.wait("embed", 3600) is True  # and again: a loop that checks late still returns


def test_cli_scheme_choices_are_the_export_schemes_in_order():
    """The CLI lists the INT8 schemes literally (parsing must not import numpy); they must stay export.SCHEMES,
    in the order the export tries them."""
    import argparse

    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action.choices[name]

    export = sub(sub(build_parser(), "model"), "export")
    [scheme] = [a for a in export._actions if a.dest == "scheme"]
    assert tuple(scheme.choices) == SCHEMES


def test_length_batches_bound_padding_and_cover_every_text_once():
    lengths = [256, 12, 250, 240, 256, 3, 100, 95, 91, 256, 230, 231] * 7
    batches = length_batches(lengths, 8)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 8 and lengths[b[0]] == longest
        assert all(longest - lengths[i] <= 0.1 * longest for i in b), [lengths[i] for i in b]
    # longest first, full batches where the lengths allow (21 texts of 256: the first batch is 8 of them)
    assert [lengths[i] for i in batches[0]] == [256] * 8
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded / sum(lengths) < 1.05
    assert length_batches([], 8) == [] and length_batches([5], 8) == [[0]]


def test_the_batch_writer_follows_settings_a_sighup_reloads():
    url = "postgresql://nowhere.invalid/db"
    worker = Worker(load_settings(environ={}, database_url=url), url, handlers={})
    assert worker.writer.settings.max_attempts == 5
    worker.settings = worker.settings.model_copy(update={"max_attempts": 2, "retry_backoff_seconds": 0.5})
    assert (worker.writer.settings.max_attempts, worker.writer.settings.retry_backoff_seconds) == (2, 0.5)


def test_a_loop_is_stuck_idle_past_its_poll_and_busy_past_its_batch_deadline():
    from pgsynapse.listener.batches import Batch, LoopState

    url = "postgresql://nowhere.invalid/db"
    worker = Worker(load_settings(environ={}, database_url=url, poll_interval=5, stall_seconds=300,
                                  batch_deadline_seconds=600), url, handlers={})
    idle, busy, solo, waiting = LoopState(tick=0.0), LoopState(tick=0.0), LoopState(tick=0.0), LoopState(tick=0.0)
    busy.batch = Batch("embed", [], deadline=1.0 + 600)  # claimed at 1.0
    solo.batch = Batch("embed", [], solo=True)  # waits for its turn: its deadline starts when it runs alone
    waiting.waiting = True  # waits for that solo job
    worker.stats.loops = {1: idle, 2: busy, 3: solo, 4: waiting}
    idle.tick = 400.0
    # a batch computing for 399 s (past poll_interval + stall_seconds, within its deadline) is busy, not stuck
    assert worker.stalled_loop(now=400.0) is None
    assert worker.stats.tick_age(now=400.0) == 400.0
    # past its deadline it is (a model call that never returns), however recently the other loops came round
    assert worker.stalled_loop(now=602.0) == (1.0, "batch past its deadline")
    busy.batch = None
    busy.tick = 602.0
    # an idle loop silent past poll_interval + stall_seconds is stuck (a hung claim query)
    assert worker.stalled_loop(now=705.5) == (0.5, "dispatcher loop silent past poll_interval + stall_seconds")
    worker.stopping.set()  # the drain is bounded by the service manager's stop timeout
    assert worker.stalled_loop(now=705.5) is None
