"""The project's own exception types; database errors are wrapped once, at the boundary."""


class PgsynapseError(Exception):
    """Base class of every error pgsynapse raises on purpose."""


class ConfigError(PgsynapseError):
    """An invalid setting. The message names the setting and fits on one line."""


class DatabaseError(PgsynapseError):
    """The database is unreachable, lacks pgvector, or refuses what pgsynapse needs."""


class SchemaMissing(DatabaseError):
    """The database has no pgsynapse schema at all: `pgsynapse migrate` makes it. The CLI exits 78 for it, but 69 for
    `run --no-migrate`, which systemd restarts until the owner's `migrate` has run."""


class DatabaseSetupError(DatabaseError):
    """The database answers but cannot serve pgsynapse (no pgvector, a missing privilege): restarting cannot
    fix it, so the CLI exits 78 like a configuration error. (A schema behind this release stays a plain
    :class:`DatabaseError`, exit 69: another process's ``migrate`` may fix it, so a restart may help; one missing
    at all is :class:`SchemaMissing`.)"""


class DatabaseConfigError(DatabaseSetupError):
    """A connection string that cannot work as written: libpq rejects one of its options, or the server refuses its
    login (a wrong password, an unknown role) or has no database of its name. Exit 78 like its parent; a
    :class:`DatabaseError` still, so that a running worker's reconnect loops keep trying (a password rotated under
    it)."""


class ModelError(PgsynapseError):
    """The embedding model cannot be loaded or does not match its registered version."""


class InputError(PgsynapseError):
    """A row's content cannot be processed; recorded on the row, never retried."""


class RegistryError(PgsynapseError):
    """A model registry change that is not allowed in the current state (or names no model); the message says
    why."""


class EndpointBusy(RuntimeError):
    """An endpoint's HTTP 429 (rate limited) or 503 (overloaded), with the wait it asked for in seconds
    (``Retry-After``; None when it said none): the worker tries the job again no sooner (listener/writer.py). A
    RuntimeError like the endpoint's other failures: the job's error, retried."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Terminated(Exception):
    """SIGTERM stopped ``ask`` or ``sql-ask`` while its own worker answered (the question left pending for the next
    worker): the command exits 143 (128 + SIGTERM), as a shell reports a command SIGTERM ended."""
