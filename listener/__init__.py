"""The long-running side: LISTEN connection, wake-ups, job claiming, the worker loop and shutdown."""
