"""Partial answers, streamed to the row while a generator writes them.

The answer handler's compute runs in a worker thread and must never wait on the database between tokens: each
piece goes on an in-process queue (never blocks), and one writer thread with its own autocommit connection drains
it (the connection is kept while questions keep coming, closed after IDLE_SECONDS without any). For each question
it writes the text so far to ``questions.answer`` (status stays ``pending``) and sends a
``streaming`` NOTIFY on ``pgsynapse_answers`` in the same statement, the first piece at once, then at most every
``stream_interval_ms`` (pieces that arrive meanwhile go out together). Pieces still queued when the answer is done
are dropped: the final write carries the whole answer.

The write has the final write's stale-write guard (status pending, same text): a question edited, deleted or
answered meanwhile gets no partial text, and its stream stops: the generator's next piece raises
:class:`~pgsynapse.answerers.base.AnswerStopped`, which ends the generation (nobody reads that answer). A partial
write that waits on the final write's row lock finds the row answered and writes nothing, so no ``streaming``
NOTIFY follows the final one.

Payload: ``{"id", "status": "streaming", "seq", "offset", "delta"}``: ``seq`` counts this stream's NOTIFYs from 1,
``offset`` is the length (characters) of the text before ``delta``; ``delta`` is null when it would not fit in a
NOTIFY (the reader then reads ``answer``). A new attempt of the job starts again at seq 1, offset 0.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import psycopg

from pgsynapse.answerers.base import AnswerStopped
from pgsynapse.db import NO_PREPARE
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

MAX_DELTA_BYTES = 6000  # NOTIFY payloads stop at 8000 bytes; the rest of the payload is small
RECONNECT_SECONDS = 1.0
IDLE_SECONDS = 30.0  # the writer's connection stays open this long after the last stream (no connect per question)


@dataclass
class _State:
    question_id: int
    text_hash: str | None
    text: str = ""
    written: int = 0  # characters written so far
    seq: int = 0
    last_write: float = float("-inf")
    dead: bool = False  # the row changed (or went): no more writes
    stopped: threading.Event = field(default_factory=threading.Event)  # set with dead, read by the generator


class Stream:
    """One question's partial answer: call it with each piece (from any thread; never blocks), then ``close``.
    A piece given after the row changed raises :class:`AnswerStopped`; ``pieces`` counts those given."""

    def __init__(self, writer: StreamWriter, key: int, stopped: threading.Event,
                 abandoned: threading.Event | None = None) -> None:
        self._writer, self._key, self._stopped, self._abandoned = writer, key, stopped, abandoned
        self.pieces = 0

    def __call__(self, piece: str) -> None:
        self.pieces += 1
        if self._stopped.is_set():
            raise AnswerStopped("the question was edited, deleted or answered while its answer was generated")
        if self._abandoned is not None and self._abandoned.is_set():
            raise AnswerStopped("the worker stopped while the answer was generated")
        if piece:
            self._writer._queue.put((self._key, piece))

    def close(self) -> None:
        self._writer._queue.put((self._key, None))


class StreamWriter:
    def __init__(self, url: str, interval_ms: float) -> None:
        self.url = url
        self.interval = interval_ms / 1000.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._keys = itertools.count(1)
        self.writes = 0  # partial writes that reached a row (for tests and logs)

    def open(self, question_id: int, text_hash: str | None, *, abandoned: threading.Event | None = None) -> Stream:
        """The stream of one question's answer; ``abandoned``, once set, stops it too (its worker stops)."""
        key = next(self._keys)
        state = _State(question_id, text_hash)
        with self._lock:
            self._queue.put((key, state))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="answer-stream", daemon=True)
                self._thread.start()
        return Stream(self, key, state.stopped, abandoned)

    # -- the writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        states: dict[int, _State] = {}
        conn: psycopg.Connection | None = None
        retry_at = 0.0
        try:
            while True:
                due = [s.last_write + self.interval for s in states.values() if not s.dead and len(s.text) > s.written]
                timeout = max(0.0, min(due) - time.monotonic()) if due else None if states else IDLE_SECONDS
                items = []
                try:
                    items.append(self._queue.get(timeout=timeout))
                    while True:
                        items.append(self._queue.get_nowait())
                except queue.Empty:
                    pass
                if not items and not states:
                    with self._lock:  # idle: the connection is closed, the thread ends
                        if self._queue.empty():
                            self._thread = None  # an open() from now on starts a new thread
                            return
                    continue
                for key, item in items:
                    if isinstance(item, _State):
                        states[key] = item
                    elif item is None:
                        states.pop(key, None)
                    elif key in states:
                        states[key].text += item
                now = time.monotonic()
                for s in states.values():
                    if s.dead or len(s.text) <= s.written or now < s.last_write + self.interval:
                        continue
                    if conn is None:
                        if now < retry_at:
                            continue
                        try:
                            conn = psycopg.connect(self.url, autocommit=True, **NO_PREPARE)
                        except psycopg.Error as exc:
                            log.warning("answer_stream_connect_failed", error=str(exc).strip()[:200])
                            retry_at = now + RECONNECT_SECONDS
                            continue
                    try:
                        self._write(conn, s)
                    except psycopg.Error as exc:
                        log.warning("answer_stream_write_failed", question=s.question_id, error=str(exc).strip()[:200])
                        conn.close()
                        conn, retry_at = None, now + RECONNECT_SECONDS
        finally:
            if conn is not None:
                conn.close()

    def _write(self, conn: psycopg.Connection, s: _State) -> None:
        delta = s.text[s.written:]
        seq = s.seq + 1
        row = conn.execute(q("stream_answer", "answers.sql"), {
            "id": s.question_id, "text_hash": s.text_hash, "text": s.text, "seq": seq, "offset": s.written,
            "delta": delta if len(delta.encode()) <= MAX_DELTA_BYTES else None}).fetchone()
        s.last_write = time.monotonic()
        if row is None:
            s.dead = True  # edited, deleted or answered meanwhile
            s.stopped.set()
            log.info("answer_stream_superseded", question=s.question_id, seq=seq)
            return
        s.seq, s.written = seq, len(s.text)
        self.writes += 1
