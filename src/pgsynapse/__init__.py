"""pgsynapse: an event-driven AI worker for PostgreSQL."""

# first, so that every pgsynapse process has it before transformers is imported: offline, no progress bars
from pgsynapse import hf_env as _hf_env  # noqa: F401

__version__ = "0.1.0"
