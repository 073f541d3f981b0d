"""Numbered, forward-only SQL migrations (package data; applied by ``pgsynapse migrate``)."""
