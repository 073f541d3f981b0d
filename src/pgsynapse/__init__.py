"""pgsynapse: an event-driven AI worker for PostgreSQL."""

__version__ = "0.1.0"
