"""The partition tests' reader of the server's side of the protocol (tests/chaos/partition.py): it must find the
points where the server waits on its client inside a statement, whatever the chunks the bytes arrive in, and
nothing else."""

from __future__ import annotations

from tests.chaos.partition import ServerStream


def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (4 + len(body)).to_bytes(4, "big") + body


START = b"N" + _msg(b"R", b"\0\0\0\0") + _msg(b"S", b"server_version\x0018\x00") + _msg(b"Z", b"I")
QUERY = _msg(b"1") + _msg(b"2") + _msg(b"T", b"\0\0") + _msg(b"D", b"\0\0") + _msg(b"C", b"SELECT 1\0")
COPY_IN = _msg(b"G", b"\0\0\0")
PIPELINE = _msg(b"1") + _msg(b"2") + _msg(b"C", b"INSERT 0 1\0")


def _found(stream: bytes, chunk: int) -> list[str]:
    s = ServerStream()
    return [w for i in range(0, len(stream), chunk) for w in s.feed(stream[i:i + chunk])]


def test_whole_statements_leave_no_wait_in_any_chunking():
    # a statement, a transaction's statements each with its ReadyForQuery, a multi-statement simple query
    stream = START + QUERY + _msg(b"Z", b"I") + QUERY + _msg(b"Z", b"T") + QUERY + _msg(b"Z", b"T") \
        + _msg(b"C", b"UPDATE 2\0") + _msg(b"C", b"UPDATE 1\0") + _msg(b"Z", b"I")
    for chunk in (1, 2, 3, 7, len(stream)):
        assert _found(stream, chunk) == []


def test_copy_from_stdin_and_pipelined_statements_are_found_in_any_chunking():
    stream = START + COPY_IN + _msg(b"C", b"COPY 3\0") + _msg(b"Z", b"T") \
        + PIPELINE + PIPELINE + PIPELINE + _msg(b"Z", b"I")
    for chunk in (1, 2, 5, len(stream)):
        assert _found(stream, chunk) == ["COPY FROM STDIN", "pipeline", "pipeline"]
