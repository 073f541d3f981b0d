"""The project's own exception types; database errors are wrapped once, at the boundary."""


class PgsynapseError(Exception):
    """Base class of every error pgsynapse raises on purpose."""


class ConfigError(PgsynapseError):
    """An invalid setting. The message names the setting and fits on one line."""


class DatabaseError(PgsynapseError):
    """The database is unreachable, lacks pgvector, or refuses what pgsynapse needs."""


class ModelError(PgsynapseError):
    """The embedding model cannot be loaded or does not match its registered version."""


class InputError(PgsynapseError):
    """A row's content cannot be processed; recorded on the row, never retried."""
